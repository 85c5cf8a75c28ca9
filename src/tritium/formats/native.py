"""The native tritium file format: saving and loading frozen models (`save`, `load`).

File format (version 1): one safetensors file. Each `TernaryLinear` named ``L`` stores
``L.weight_packed`` (uint8), ``L.weight_scale`` (float32, ``(1,)`` or ``(N,)``) and ``L.bias`` (float32,
optional). With ``storage="2bit"`` the packed weight is the kernel layout ``(N, ceil(K / 4))``
(4 weights per byte); with ``storage="base3"`` it is ``(ceil(N * K / 5),)``, 5 weights per byte (1.6 bits
per weight). Both layouts are defined in `tritium.formats.codecs`; both are converted to the kernels' layout
at load.
Every other parameter and buffer (non-persistent buffers included) is stored as is under its qualified
name; tied tensors are stored once. The safetensors metadata holds ``format`` ("tritium"),
``format_version``, ``layers`` (JSON: per layer its kind, shape, norm, scale granularity, storage and
`BitConfig`), ``aliases`` (JSON: tied name -> stored name), for transformers models ``model_class`` and
``model_config``, and, when saved with one, ``tokenizer`` (a Hugging Face ``tokenizers`` JSON).

Loading never unpickles: `load` validates the whole header first, then reads each tensor's bytes into
fresh memory (no memory map, so loading a file costs no more than its tensors). Any malformed, truncated
or hostile file raises `TritiumFormatError`, and so does anything that is not a regular file (a FIFO, a
folder, a device), refused without blocking. The header (JSON) is bounded so that time and memory stay
proportional to the file's size:

* `MAX_HEADER_BYTES` (64 MiB): the header length (a Llama-70B file needs about 0.2 MiB);
* `MAX_TENSORS` (131,072): stored tensors, and also layer records and aliases (a Llama-70B has 723
  tensors, a frozen 671B mixture of experts with 256 experts per layer about 90,000);
* `MAX_JSON_ITEMS` (4,194,304): JSON values (counted as commas and opening brackets) in the header and in
  each JSON metadata string;
* at most 8 dimensions per tensor, each below 2**31, integers of at most 30 digits, no duplicate keys.

`save` runs the same validation on what it is about to write and raises ValueError instead of writing a
file that `load` would refuse (a NaN or infinite scale, too many tensors, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import atomic, kernels, quant
from ..config import NORMS, BitConfig
from ..nn import BitConv1D, BitLinear, FrozenWeight, TernaryLinear
from . import TritiumFormatError, codecs

FORMAT = "tritium"
FORMAT_VERSION = 1
STORAGES = ("2bit", "base3")
MAX_HEADER_BYTES = 64 * 2**20
MAX_TENSORS = 2**17
MAX_JSON_ITEMS = 2**22
MAX_DIM = 2**31 - 1
MAX_NDIM = 8
_MAX_INT_DIGITS = 30

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _name, _dtype in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                      ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                      ("F8_E5M2FNUZ", "float8_e5m2fnuz")):
    if hasattr(torch, _dtype):
        _DTYPES[_name] = getattr(torch, _dtype)
del _name, _dtype

PathLike = str | os.PathLike

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MAX_DIM", "MAX_HEADER_BYTES", "MAX_JSON_ITEMS", "MAX_NDIM", "MAX_TENSORS",
    "STORAGES", "Checkpoint", "Header", "PathLike", "SafetensorsHeader", "TritiumFormatError", "load", "load_tokenizer",
    "read_header", "read_safetensors_header", "save", "tokenizer_json",
]


# ------------------------------------------------------------------------------------------------- save


def _config_dict(cfg: BitConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["granularity"] = list(cfg.granularity) if isinstance(cfg.granularity, tuple) else cfg.granularity
    return d


def _layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, TernaryLinear):
        return "ternary"
    if isinstance(module, BitLinear):
        return "bitlinear"
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return "linear"
    return None


def _collect(model: nn.Module, storage: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata to save."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    storages: set[int] = set()

    def put(key: str, t: Tensor) -> None:
        if t.is_meta:
            raise ValueError(f"cannot save {key!r}: it is on the meta device (never loaded)")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t

    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        kind = _layer_kind(m)
        if kind == "ternary":
            n, k = m.out_features, m.in_features
            layers[mname] = {
                "kind": kind, "in_features": k, "out_features": n, "bias": m.bias is not None,
                "norm": m.norm, "scale": "channel" if m.per_channel else "tensor", "storage": storage,
            }
            q = kernels.unpack(m.weight_packed.cpu(), n, k)
            if q.gt(1).any():
                raise ValueError(f"cannot save layer {mname!r}: its packed weight holds the invalid code 3 "
                                 "(the file would not load)")
            put(prefix + "weight_packed", codecs.pack(storage, q))
            put(prefix + "weight_scale", m.weight_scale.float())
            if m.bias is not None:
                put(prefix + "bias", m.bias.float())
            continue
        if kind == "bitlinear":
            layers[mname] = {"kind": kind, "in_features": m.in_features, "out_features": m.out_features,
                             "bias": m.bias is not None, "config": _config_dict(m.config)}
        elif kind == "linear":
            out_f, in_f = m.weight.shape if isinstance(m, nn.Linear) else m.weight.shape[::-1]
            layers[mname] = {"kind": kind, "in_features": int(in_f), "out_features": int(out_f),
                             "bias": m.bias is not None}
        named = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        for name, t in named:
            if t is None:
                continue
            key = prefix + name
            if id(t) in seen:
                aliases[key] = seen[id(t)]
                continue
            seen[id(t)] = key
            put(key, t)

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        meta["model_class"] = type(model).__name__
        meta["model_config"] = config.to_json_string(use_diff=False)
    return tensors, meta


def tokenizer_json(tokenizer: object) -> str:
    """The JSON of a Hugging Face ``tokenizers.Tokenizer`` or of a transformers fast tokenizer (its backend
    tokenizer); TypeError for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if not callable(to_str):
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer or a transformers fast tokenizer, "
                        f"not {type(tokenizer).__name__}")
    text = to_str()
    if not isinstance(text, str):
        raise TypeError(f"{type(tokenizer).__name__}.to_str() returned {type(text).__name__}, not a JSON string")
    return text


def save(model: nn.Module, path: PathLike, storage: str = "2bit", tokenizer: object | None = None) -> None:
    """Save ``model`` (usually frozen with `tritium.freeze`) to one safetensors file, atomically.

    Ternary layers are stored packed: ``storage="2bit"`` (the kernel layout, 2 bits per weight plus row
    padding to a multiple of 4) or ``"base3"`` (1.6 bits per weight, repacked at load). All other
    parameters and buffers are stored in their own dtype. The file is written to a temporary file in the
    same directory, synced and renamed over ``path`` (see `tritium.atomic`: a new file gets the mode a
    plain ``open`` gives, 0666 less the umask), so an interrupted save leaves any old file intact.

    ``tokenizer`` (a ``tokenizers.Tokenizer`` or a transformers fast tokenizer) is stored as JSON in the
    metadata; `load_tokenizer` reads it back and ``tritium generate`` uses it.

    Raises ValueError, naming the layer or tensor and the reason, and writes nothing if `load` would refuse
    the file: a ternary layer with a NaN, infinite or non-positive scale (a NaN latent weight) or an
    invalid packed code, more than `MAX_TENSORS` tensors, a header above `MAX_HEADER_BYTES`, ...
    """
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is not supported; choose one of {STORAGES}")
    from safetensors.torch import save as st_save

    tensors, meta = _collect(model, storage)
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer_json(tokenizer)
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"cannot save {os.fspath(path)}: {len(tensors)} tensors, more than the "
                         f"{MAX_TENSORS} a file may hold (MAX_TENSORS)")
    blob = st_save(tensors, metadata=meta)
    where = f"cannot save {os.fspath(path)}"
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        if n > MAX_HEADER_BYTES:
            raise _fail(where, f"the header would be {n} bytes, more than MAX_HEADER_BYTES ({MAX_HEADER_BYTES})")
        header = _parse_header(where, blob[8: 8 + n], n, len(blob))
        for name, rec in header.layers.items():
            if rec["kind"] == "ternary":
                _check_ternary(where, name, rec, tensors.__getitem__, repack=False)
    except TritiumFormatError as e:
        raise ValueError(f"{e} (the file would not load)") from None
    atomic.write_bytes(path, blob)


# ------------------------------------------------------------------------------------------------- load


@dataclass
class SafetensorsHeader:
    """The validated header of any safetensors file: tensor dtypes and shapes, where their data lies, and the
    string metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    file_size: int
    offsets: dict[str, int] = field(default_factory=dict)  # file position of each tensor's data


@dataclass
class Header(SafetensorsHeader):
    """The validated header of a tritium file: tensor dtypes/shapes, layers, aliases and metadata."""

    layers: dict[str, dict] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    model_config: dict | None = None  # the ``model_config`` metadata, parsed

    @property
    def version(self) -> int:
        return int(self.metadata["format_version"])


@dataclass
class Checkpoint:
    """What `load` returns without a model.

    Attributes:
        modules: the ternary layers as ready `TernaryLinear` modules, by qualified name.
        tensors: every other stored tensor by qualified name (tied names map to the same tensor).
        layers: the per-layer records of the file (kind, shape, norm, scale, storage, config).
        model_class, model_config: the transformers class name and config dict, if the file has them.
    """

    modules: dict[str, TernaryLinear] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    model_class: str | None = None
    model_config: dict | None = None


def _fail(path: PathLike, msg: str) -> TritiumFormatError:
    return TritiumFormatError(f"{os.fspath(path)}: {msg}")


def _q(v: object, limit: int = 80) -> str:
    """``repr(v)``, shortened to about ``limit`` characters (names and values in a file may be huge)."""
    if isinstance(v, (list, dict)) and len(v) > limit:
        return f"<{type(v).__name__} of {len(v)} items>"
    try:
        r = repr(v)
    except (RecursionError, ValueError):
        return f"<{type(v).__name__}>"
    return r if len(r) <= limit else f"{r[: limit - 15]}... ({len(r)} chars)"


def _short(s: str, limit: int = 200) -> str:
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} chars)"


def _object(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {_q(dup)}")
    return d


def _parse_int(s: str) -> int:
    if len(s) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s)} digits")
    return int(s)


def _loads(path: PathLike, text: str, what: str) -> object:
    """``json.loads(text)``, refusing more than `MAX_JSON_ITEMS` values, duplicate keys and huge integers."""
    items = text.count(",") + text.count("{") + text.count("[")
    if items > MAX_JSON_ITEMS:
        raise _fail(path, f"{what} holds up to {items} JSON values, more than MAX_JSON_ITEMS ({MAX_JSON_ITEMS})")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_parse_int)
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"{what} is not valid JSON ({_short(str(e))})") from None


def _json(path: PathLike, meta: dict, key: str) -> dict:
    value = _loads(path, meta.get(key, "{}"), f"metadata {key!r}")
    if not isinstance(value, dict):
        raise _fail(path, f"metadata {key!r} must be a JSON object")
    if len(value) > MAX_TENSORS:
        raise _fail(path, f"metadata {key!r} has {len(value)} entries, more than MAX_TENSORS ({MAX_TENSORS})")
    return value


def _int(path: PathLike, where: str, v: object, lo: int = 1, hi: int = MAX_DIM) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, f"{where} = {_q(v)} must be an integer in [{lo}, {hi}]")
    return v


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _open(path: PathLike):
    """``path`` opened for binary reading; anything but a regular file is refused without blocking."""
    flags = os.O_RDONLY
    for flag in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, flag, 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as e:
        raise TritiumFormatError(f"{os.fspath(path)}: cannot read ({e})") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _fail(path, f"cannot read: {_file_kind(mode)}, not a regular file")
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except OSError as e:
        os.close(fd)
        raise TritiumFormatError(f"{os.fspath(path)}: cannot read ({e})") from e
    except BaseException:
        os.close(fd)
        raise


def read_header(path: PathLike) -> Header:
    """Read and validate the header of a tritium file without reading its tensors."""
    with _open(path) as f:
        return _read_header(path, f)


def read_safetensors_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate the header of any safetensors file without reading its tensors.

    The checks and bounds are those of a tritium file's header (`MAX_HEADER_BYTES`, `MAX_TENSORS`,
    `MAX_JSON_ITEMS`, `MAX_NDIM`, `MAX_DIM`, tensor data that tiles the rest of the file exactly); anything
    malformed, and anything that is not a regular file, raises `TritiumFormatError`.
    """
    with _open(path) as f:
        return _read_safetensors(path, f)


def _read_header(path: PathLike, f) -> Header:
    return _tritium_header(path, _read_safetensors(path, f, _check_format))


def _read_safetensors(path: PathLike, f,
                      check_metadata: Callable[[PathLike, dict], None] | None = None) -> SafetensorsHeader:
    """The validated header of the safetensors file open as ``f`` (see `_parse_safetensors`)."""
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, "file is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _fail(path, f"header length {n} exceeds the file or MAX_HEADER_BYTES ({MAX_HEADER_BYTES})")
        raw = f.read(n)
    except OSError as e:
        raise TritiumFormatError(f"{os.fspath(path)}: cannot read ({e})") from e
    if len(raw) != n:
        raise _fail(path, "the header is truncated (the file changed while loading?)")
    return _parse_safetensors(path, raw, n, size, check_metadata)


def _parse_header(path: PathLike, raw: bytes, n: int, size: int) -> Header:
    """The validated `Header` of a tritium file of ``size`` bytes whose ``n``-byte JSON header is ``raw``."""
    return _tritium_header(path, _parse_safetensors(path, raw, n, size, _check_format))


def _check_format(path: PathLike, meta: dict) -> None:
    """Raise unless the metadata is a tritium file's of a version this tritium reads."""
    if meta.get("format") != FORMAT:
        raise _fail(path, f"not a tritium file (metadata format={_q(meta.get('format'))})")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) <= 9) or int(version) < 1:
        raise _fail(path, f"bad format_version {_q(version)}")
    if int(version) > FORMAT_VERSION:
        raise _fail(path, f"format_version {version} is newer than this tritium reads ({FORMAT_VERSION}); "
                          "upgrade tritium")


def _parse_safetensors(path: PathLike, raw: bytes, n: int, size: int,
                       check_metadata: Callable[[PathLike, dict], None] | None = None) -> SafetensorsHeader:
    """The validated header of a safetensors file of ``size`` bytes whose ``n``-byte JSON header is ``raw``;
    ``check_metadata(path, metadata)`` runs before the tensors are checked."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    header = _loads(path, text, "header")
    del text
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    if check_metadata is not None:
        check_metadata(path, meta)
    if len(header) > MAX_TENSORS:
        raise _fail(path, f"the file holds {len(header)} tensors, more than MAX_TENSORS ({MAX_TENSORS})")
    data_size = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    starts: dict[str, int] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _fail(path, f"tensor {_q(name)}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _fail(path, f"tensor {_q(name)}: unsupported dtype {_q(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise _fail(path, f"tensor {_q(name)}: bad shape {_q(shape)}")
        if not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
            raise _fail(path, f"tensor {_q(name)}: dimensions {_q(shape)} must be integers in [0, {MAX_DIM}]")
        shape = tuple(shape)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and 0 <= o <= data_size for o in offsets)):
            raise _fail(path, f"tensor {_q(name)}: data_offsets {_q(offsets)} must be two integers in "
                              f"[0, {data_size}] (truncated file?)")
        a, b = offsets
        itemsize = _DTYPES[dtype].itemsize
        if math.prod(max(d, 1) for d in shape) > 2**62 // itemsize:
            raise _fail(path, f"tensor {_q(name)}: shape {list(shape)} is too large")
        nbytes = math.prod(shape) * itemsize
        if b - a != nbytes:
            raise _fail(path, f"tensor {_q(name)}: {b - a} bytes of data for shape {list(shape)} {dtype}")
        spans.append((a, b))
        tensors[name] = (dtype, shape)
        starts[name] = 8 + n + a
    del header
    spans.sort()
    end = 0
    for a, b in spans:
        if a != end:
            raise _fail(path, "tensor data overlaps or has gaps")
        end = b
    if end != data_size:
        raise _fail(path, f"file has {data_size} bytes of tensor data, the header describes {end} "
                          "(truncated or padded file)")
    return SafetensorsHeader(tensors, meta, size, starts)


def _tritium_header(path: PathLike, st: SafetensorsHeader) -> Header:
    """The tritium `Header` of a safetensors header whose metadata is a tritium file's (`_check_format`)."""
    tensors, meta = st.tensors, st.metadata
    layers = _json(path, meta, "layers")
    aliases = _json(path, meta, "aliases")
    owned = set()
    for name, rec in layers.items():
        _check_layer(path, name, rec, tensors)
        if rec["kind"] == "ternary":
            prefix = f"{name}." if name else ""
            owned.update(prefix + t for t in ("weight_packed", "weight_scale", "bias"))
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in tensors or target in owned or alias in tensors \
                or alias in owned:
            raise _fail(path, f"alias {_q(alias)} -> {_q(target)} does not name a stored tensor")
    model_config = None
    if "model_config" in meta:
        model_config = _loads(path, meta["model_config"], "metadata 'model_config'")
        if not isinstance(model_config, dict):
            raise _fail(path, "metadata 'model_config' must be a JSON object")
    if "tokenizer" in meta:
        tok = _loads(path, meta["tokenizer"], "metadata 'tokenizer'")
        if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
            raise _fail(path, "metadata 'tokenizer' must be a tokenizer JSON object with a 'model' object")
        del tok
    return Header(tensors, meta, st.file_size, st.offsets, layers=layers, aliases=aliases, model_config=model_config)


def _check_layer(path: PathLike, name: str, rec: object, tensors: dict) -> None:
    if not isinstance(rec, dict):
        raise _fail(path, f"layer {_q(name)}: record is not an object")
    kind = rec.get("kind")
    if kind not in ("ternary", "bitlinear", "linear"):
        raise _fail(path, f"layer {_q(name)}: unknown kind {_q(kind)}")
    max_k = kernels.MAX_K if kind == "ternary" else MAX_DIM
    k = _int(path, f"layer {_q(name)} in_features", rec.get("in_features"), 1, max_k)
    n = _int(path, f"layer {_q(name)} out_features", rec.get("out_features"))
    if not isinstance(rec.get("bias"), bool):
        raise _fail(path, f"layer {_q(name)}: bias must be true or false")
    if kind == "bitlinear":
        if not isinstance(rec.get("config"), dict):
            raise _fail(path, f"layer {_q(name)}: config must be a JSON object")
        try:
            quant.check_group(BitConfig(**rec["config"]), k)
        except Exception as e:  # noqa: BLE001 - any failure of the config's own validation
            raise _fail(path, f"layer {_q(name)}: bad config ({_short(str(e))})") from None
    if kind != "ternary":
        return
    norm, scale = rec.get("norm", ""), rec.get("scale")
    if not (norm is None or isinstance(norm, str)) or norm not in NORMS or scale not in ("tensor", "channel"):
        raise _fail(path, f"layer {_q(name)}: bad norm {_q(rec.get('norm'))} or scale {_q(scale)}")
    storage = rec.get("storage")
    if storage not in STORAGES:
        raise _fail(path, f"layer {_q(name)}: unknown storage {_q(storage)}")
    expect = {
        "weight_packed": ("U8", codecs.packed_shape(storage, n, k)),
        "weight_scale": ("F32", (n if scale == "channel" else 1,)),
    }
    if rec["bias"]:
        expect["bias"] = ("F32", (n,))
    elif (f"{name}.bias" if name else "bias") in tensors:
        raise _fail(path, f"layer {_q(name)}: a bias is stored for a layer without bias")
    for t, want in expect.items():
        key = f"{name}.{t}" if name else t
        if key not in tensors:
            raise _fail(path, f"layer {_q(name)}: tensor {_q(key)} is missing")
        if tensors[key] != want:
            raise _fail(path, f"layer {_q(name)}: tensor {_q(key)} is {tensors[key][0]} "
                              f"{list(tensors[key][1])}, expected {want[0]} {list(want[1])}")


def _check_ternary(path: PathLike, name: str, rec: dict, get: Callable[[str], Tensor],
                   repack: bool = True) -> tuple[Tensor, Tensor]:
    """The kernel-layout packed weight (the stored one unless ``repack``) and the scale of ternary layer
    ``name``; raises on invalid codes or padding and on scales that are not finite and positive."""
    n, k = rec["out_features"], rec["in_features"]
    prefix = f"{name}." if name else ""
    p = get(prefix + "weight_packed")
    where = f"{os.fspath(path)}: layer {_q(name)}"
    if rec["storage"] == "2bit":  # the kernel layout: check it in place
        codecs.check("2bit", p, n, k, where)
        packed = p.contiguous()
    else:
        q = codecs.unpack(rec["storage"], p, n, k, where)
        packed = kernels.pack(q).contiguous() if repack else p
    scale = get(prefix + "weight_scale")
    if not scale.gt(0).logical_and_(scale.lt(math.inf)).all():
        raise _fail(path, f"layer {_q(name)}: weight scale must be finite and positive (NaN or infinite "
                          "weights?)")
    return packed, scale


def _ternary_module(path: PathLike, name: str, rec: dict, get: Callable[[str], Tensor]) -> TernaryLinear:
    packed, scale = _check_ternary(path, name, rec, get)
    m = TernaryLinear(rec["in_features"], rec["out_features"], rec["bias"], rec["norm"], rec["scale"] == "channel",
                      device="meta")
    m.weight_packed, m.weight_scale = packed, scale
    if rec["bias"]:
        m.bias = get(f"{name}.bias" if name else "bias")
    return m


def _reader(path: PathLike, header: SafetensorsHeader, f) -> Callable[[str], Tensor]:
    """``get(key)``: the tensor ``key`` read from the open file ``f`` into fresh memory (no mmap)."""

    def get(key: str) -> Tensor:
        dtype, shape = header.tensors[key]
        t = torch.empty(shape, dtype=torch.uint8 if dtype == "BOOL" else _DTYPES[dtype])
        if t.numel():
            buf = t.view(-1).view(torch.uint8)
            try:
                f.seek(header.offsets[key])
                got = f.readinto(buf.numpy())
            except OSError as e:
                raise _fail(path, f"cannot read tensor {_q(key)} ({e})") from e
            if got != buf.numel():
                raise _fail(path, f"tensor {_q(key)} is truncated (the file changed while loading?)")
        return t.ne(0) if dtype == "BOOL" else t

    return get


def load(path: PathLike, model: nn.Module | None = None) -> nn.Module | Checkpoint:
    """Load a file written by `save`.

    With ``model`` (a skeleton of the saved model's architecture, on any device, ``meta`` included):
    every layer the file stores as ternary is replaced by a `TernaryLinear` (the skeleton may hold
    `nn.Linear`, `BitLinear` or `TernaryLinear` there), layers stored as `BitLinear` become `BitLinear`,
    and every other parameter and buffer is replaced by the stored tensor (keeping the file's dtype), so
    no float weight is ever materialized for a ternary layer. Tied tensors are re-tied. Returns the model
    in eval mode (``model.eval()``: dropout off), as transformers' ``from_pretrained`` does; call
    ``.train()`` to fine-tune it. Raises `TritiumFormatError` if the file names a module or tensor the
    skeleton lacks, a shape differs, or a parameter or buffer of the skeleton is not in the file.

    Without ``model``: returns a `Checkpoint` with the frozen layers as modules, the other tensors,
    the layer records and, if stored, the transformers class name and config (to build a skeleton from).

    Any malformed file, and anything that is not a regular file, raises `TritiumFormatError`.
    """
    with _open(path) as f:
        header = _read_header(path, f)
        get = _reader(path, header, f)
        owned = set()
        modules: dict[str, TernaryLinear] = {}
        for name, rec in header.layers.items():
            if rec["kind"] == "ternary":
                modules[name] = _ternary_module(path, name, rec, get)
                prefix = f"{name}." if name else ""
                owned.update(prefix + t for t in ("weight_packed", "weight_scale", "bias"))
        tensors = {k: get(k) for k in header.tensors if k not in owned}
    tensors.update({alias: tensors[target] for alias, target in header.aliases.items()})
    if model is None:
        return Checkpoint(modules, tensors, header.layers, header.metadata.get("model_class"), header.model_config)
    return _into(path, model, header, modules, tensors).eval()


def load_tokenizer(path: PathLike, header: Header | None = None):
    """The ``tokenizers.Tokenizer`` stored in a file by ``save(..., tokenizer=...)``, or None if it has none.

    ``header`` (the file's `read_header`) saves reading the header again. A stored tokenizer that
    ``tokenizers`` cannot build raises `TritiumFormatError`; ImportError if ``tokenizers`` is not installed.
    """
    header = read_header(path) if header is None else header
    text = header.metadata.get("tokenizer")
    if text is None:
        return None
    return _tokenizer_from_str(path, text, "metadata 'tokenizer'")


def _tokenizer_from_str(path: PathLike, text: str, what: str):
    """The ``tokenizers.Tokenizer`` of a tokenizer JSON text (``what`` of ``path``); `TritiumFormatError` when
    ``tokenizers`` cannot build it, ImportError without ``tokenizers``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(f"reading {what} needs the tokenizers package (pip install tokenizers)") from e
    try:
        return Tokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in tokenizers derives from BaseException
        raise _fail(path, f"{what} is not a valid tokenizer ({_short(' '.join(str(e).split()))})") from None


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The registered submodule ``name`` of ``model`` (``""``: the model itself), or None."""
    mod: nn.Module | None = model
    for atom in name.split(".") if name else ():
        mod = mod._modules.get(atom) if isinstance(mod, nn.Module) else None
    return mod if isinstance(mod, nn.Module) else None


def _resolve(path: PathLike, model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the submodule ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = _submodule(model, parent_name)
    child = _submodule(parent, attr) if parent is not None and attr else None
    if parent is None or child is None:
        raise _fail(path, f"the model has no module {_q(name)}")
    return parent, attr, child


def _is_pyg_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear" and type(module).__module__.startswith("torch_geometric.")


def _check_linear(path: PathLike, name: str, child: nn.Module, rec: dict) -> None:
    if isinstance(child, (TernaryLinear, BitLinear)):
        shape = (child.out_features, child.in_features)
    elif isinstance(child, nn.Linear):
        shape = tuple(child.weight.shape)
    elif type(child).__name__ == "Conv1D":
        shape = tuple(child.weight.shape)[::-1]
    elif _is_pyg_linear(child):
        shape = (child.out_channels, child.in_channels)
    else:
        raise _fail(path, f"module {_q(name)} is a {type(child).__name__}, the file stores a linear layer")
    if shape != (rec["out_features"], rec["in_features"]):
        raise _fail(path, f"module {_q(name)} has shape {shape}, the file stores "
                          f"({rec['out_features']}, {rec['in_features']})")


def _into(path: PathLike, model: nn.Module, header: Header, modules: dict, tensors: dict) -> nn.Module:
    """Fill ``model`` (see `load`); when the file does not fit it, every change is undone before the error."""
    undo: list[tuple[dict, str, object]] = []  # (a module's __dict__-like table, key, previous value)
    try:
        return _fill(path, model, header, modules, tensors, undo)
    except BaseException:
        for table, key, old in reversed(undo):
            table[key] = old
        raise


def _fill(path: PathLike, model: nn.Module, header: Header, modules: dict, tensors: dict, undo: list) -> nn.Module:
    for name, rec in header.layers.items():
        if rec["kind"] == "linear":
            continue
        if not name:
            raise _fail(path, "a file whose root module is a single layer loads without a model")
        parent, attr, child = _resolve(path, model, name)
        _check_linear(path, name, child, rec)
        if rec["kind"] == "ternary":
            weight = getattr(child, "weight", None)  # the frozen layer reports the skeleton's weight dtype
            if isinstance(weight, (Tensor, FrozenWeight)) and weight.dtype.is_floating_point:
                modules[name]._weight_dtype = weight.dtype
            undo.append((parent._modules, attr, parent._modules[attr]))
            setattr(parent, attr, modules[name])
        elif not isinstance(child, BitLinear) or child.config != BitConfig(**rec["config"]):
            conv1d = isinstance(child, BitConv1D) or type(child).__name__ == "Conv1D"  # (in, out) weight
            new = (BitConv1D if conv1d else BitLinear)(rec["in_features"], rec["out_features"], rec["bias"],
                                                       BitConfig(**rec["config"]), device="meta")
            undo.append((parent._modules, attr, parent._modules[attr]))
            setattr(parent, attr, new)
    params: dict[int, nn.Parameter] = {}
    for key, t in tensors.items():
        mod_name, _, attr = key.rpartition(".")
        mod = _submodule(model, mod_name)
        if mod is None:
            raise _fail(path, f"the model has no module {_q(mod_name)} for tensor {_q(key)}")
        if attr in mod._parameters and mod._parameters[attr] is not None:
            old = mod._parameters[attr]
        elif attr in mod._buffers and mod._buffers[attr] is not None:
            old = mod._buffers[attr]
        else:
            raise _fail(path, f"tensor {_q(key)} is not a parameter or buffer of the model")
        if tuple(old.shape) != tuple(t.shape):
            raise _fail(path, f"tensor {_q(key)} has shape {list(t.shape)}, the model has {list(old.shape)}")
        if attr in mod._parameters:
            if id(t) not in params:
                params[id(t)] = nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point())
            undo.append((mod._parameters, attr, old))
            mod._parameters[attr] = params[id(t)]
        else:
            undo.append((mod._buffers, attr, old))
            mod._buffers[attr] = t
    stored = set(tensors)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, TernaryLinear) and name in modules:
            continue
        prefix = f"{name}." if name else ""
        named = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        missing = [prefix + k for k, t in named if t is not None and prefix + k not in stored]
        if missing:
            raise _fail(path, f"the file has no tensor for {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model


def _printable(s: object) -> str:
    """``s`` with every non-printable character escaped (names in a file must not drive the terminal)."""
    s = str(s)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in s)

