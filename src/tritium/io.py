"""Saving and loading frozen models (`save`, `load`) and the ``tritium info FILE`` command.

File format (version 1): one safetensors file. Each `TernaryLinear` named ``L`` stores
``L.weight_packed`` (uint8), ``L.weight_scale`` (float32, ``(1,)`` or ``(N,)``) and ``L.bias`` (float32,
optional). With ``storage="2bit"`` the packed weight is the kernel layout ``(N, ceil(K / 4))``
(4 weights per byte, `pack_2bit`); with ``storage="base3"`` it is ``(ceil(N * K / 5),)``, 5 weights
per byte (`pack_base3`, 1.6 bits per weight). Both are converted to the kernels' layout at load.
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

import argparse
import dataclasses
import json
import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import atomic, kernels, quant
from .args import UsageError, existing_file, output_file
from .config import NORMS, BitConfig
from .nn import BitConv1D, BitLinear, FrozenWeight, TernaryLinear

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
_POW3 = (1, 3, 9, 27, 81)
_BASE3_WEIGHTS = ((torch.arange(243).reshape(-1, 1) // torch.tensor(_POW3)) % 3 - 1).to(torch.int8)  # per byte
_BASE3_CHUNK = 1 << 20

PathLike = str | os.PathLike


class TritiumFormatError(ValueError):
    """A file is not a valid tritium model file (or does not fit the model it is loaded into)."""


# ----------------------------------------------------------------------------------------------- packing


def pack_2bit(q: Tensor) -> Tensor:
    """Ternary int ``(N, K)`` -> uint8 ``(N, ceil(K / 4))``: weight ``k`` at bits ``2 * (k % 4)`` of byte
    ``k // 4``, coded ``w + 1``; unused fields of a row's last byte hold code 1."""
    n, k = q.shape
    codes = torch.nn.functional.pad((q.to(torch.int8) + 1).to(torch.uint8), (0, (-k) % 4), value=1)
    codes = codes.reshape(n, -1, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def pack_base3(q: Tensor) -> Tensor:
    """Ternary ``q`` (any shape) -> uint8 ``(ceil(numel / 5),)``: 5 row-major weights per byte as
    ``sum((w_i + 1) * 3^i)``, zero weights as padding."""
    codes = (q.reshape(-1).to(torch.int16) + 1)
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 5), value=1).reshape(-1, 5)
    return (codes * torch.tensor(_POW3, dtype=torch.int16)).sum(1).to(torch.uint8)


def unpack_stored(name: str, storage: str, p: Tensor, n: int, k: int) -> Tensor:
    """The int8 ``(n, k)`` ternary weight of a stored packed tensor; raises on invalid codes or padding."""
    if storage == "2bit":
        codes = (p.reshape(n, -1, 1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3
        codes = codes.reshape(n, -1)
        if codes.eq(3).any():
            raise TritiumFormatError(f"{name}: packed weight holds the invalid code 3")
        if codes[:, k:].ne(1).any():
            raise TritiumFormatError(f"{name}: packed weight has invalid padding")
        return (codes[:, :k].to(torch.int8) - 1).reshape(n, k)
    if p.ge(243).any():
        raise TritiumFormatError(f"{name}: base-3 packed weight holds a byte >= 243")
    flat = p.reshape(-1)
    q = torch.empty(flat.numel() * 5, dtype=torch.int8)
    for i in range(0, flat.numel(), _BASE3_CHUNK):  # a table lookup per byte, in bounded chunks
        chunk = flat[i: i + _BASE3_CHUNK]
        torch.index_select(_BASE3_WEIGHTS, 0, chunk.to(torch.int32), out=q[5 * i: 5 * (i + chunk.numel())].view(-1, 5))
    if q[n * k:].ne(0).any():
        raise TritiumFormatError(f"{name}: packed weight has invalid padding")
    return q[: n * k].reshape(n, k)


def _check_2bit(name: str, p: Tensor, k: int) -> None:
    """Raise unless the 2-bit packed ``(n, ceil(k / 4))`` weight ``p`` holds codes 0-2 and code-1 padding
    (what `unpack_stored` checks, without unpacking)."""
    if p.bitwise_and(p >> 1).bitwise_and_(0x55).any():
        raise TritiumFormatError(f"{name}: packed weight holds the invalid code 3")
    if k % 4 and p.numel():
        shift = 2 * (k % 4)
        if (p[:, -1] >> shift).ne(0x55 >> shift).any():
            raise TritiumFormatError(f"{name}: packed weight has invalid padding")


def _packed_shape(storage: str, n: int, k: int) -> tuple[int, ...]:
    return (n, (k + 3) // 4) if storage == "2bit" else (-(-n * k // 5),)


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
            put(prefix + "weight_packed", pack_2bit(q) if storage == "2bit" else pack_base3(q))
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
class Header:
    """The validated header of a tritium file: tensor dtypes/shapes, layers, aliases and metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    layers: dict[str, dict]
    aliases: dict[str, str]
    metadata: dict[str, str]
    file_size: int
    offsets: dict[str, int] = field(default_factory=dict)  # file position of each tensor's data
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


def _read_header(path: PathLike, f) -> Header:
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
    return _parse_header(path, raw, n, size)


def _parse_header(path: PathLike, raw: bytes, n: int, size: int) -> Header:
    """The validated `Header` of a file of ``size`` bytes whose ``n``-byte JSON header is ``raw``."""
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
    if meta.get("format") != FORMAT:
        raise _fail(path, f"not a tritium file (metadata format={_q(meta.get('format'))})")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) <= 9) or int(version) < 1:
        raise _fail(path, f"bad format_version {_q(version)}")
    if int(version) > FORMAT_VERSION:
        raise _fail(path, f"format_version {version} is newer than this tritium reads ({FORMAT_VERSION}); "
                          "upgrade tritium")
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
                              f"[0, {data_size}]")
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
    return Header(tensors, layers, aliases, meta, size, starts, model_config)


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
        "weight_packed": ("U8", _packed_shape(storage, n, k)),
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
        _check_2bit(where, p, k)
        packed = p.contiguous()
    else:
        q = unpack_stored(where, rec["storage"], p, n, k)
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


def _reader(path: PathLike, header: Header, f) -> Callable[[str], Tensor]:
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
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("reading the tokenizer stored in a tritium file needs the tokenizers package "
                          "(pip install tokenizers)") from e
    try:
        return Tokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in tokenizers derives from BaseException
        raise _fail(path, f"metadata 'tokenizer' is not a valid tokenizer ({_short(str(e))})") from None


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
            setattr(parent, attr, modules[name])
        elif not isinstance(child, BitLinear) or child.config != BitConfig(**rec["config"]):
            conv1d = isinstance(child, BitConv1D) or type(child).__name__ == "Conv1D"  # (in, out) weight
            new = (BitConv1D if conv1d else BitLinear)(rec["in_features"], rec["out_features"], rec["bias"],
                                                       BitConfig(**rec["config"]), device="meta")
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
            mod._parameters[attr] = params[id(t)]
        else:
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


# ------------------------------------------------------------------------------------------------- info

#: Energy per operation at 45 nm, in pJ (Horowitz, "Computing's energy problem", ISSCC 2014).
ENERGY_PJ = {
    "int8_add": 0.03, "int8_mult": 0.2, "int32_add": 0.1, "int32_mult": 3.1,
    "fp16_add": 0.4, "fp16_mult": 1.1, "fp32_add": 0.9, "fp32_mult": 3.7,
}
ENERGY_SOURCE = "M. Horowitz, \"Computing's energy problem (and what we can do about it)\", ISSCC 2014, 45 nm"


def describe(path: PathLike) -> dict:
    """Per-layer sizes, totals, arithmetic per token and its energy estimate for a tritium file."""
    h = read_header(path)
    rows, owned = [], set()
    for name, rec in sorted(h.layers.items()):
        if rec["kind"] != "ternary":
            continue
        n, k = rec["out_features"], rec["in_features"]
        prefix = f"{name}." if name else ""
        keys = [prefix + t for t in ("weight_packed", "weight_scale", "bias") if prefix + t in h.tensors]
        owned.update(keys)
        weight_bytes = math.prod(h.tensors[prefix + "weight_packed"][1])
        total = sum(math.prod(h.tensors[key][1]) * _DTYPES[h.tensors[key][0]].itemsize for key in keys)
        rows.append({"name": name, "shape": [n, k], "format": f"ternary-{rec['storage']}", "bytes": total,
                     "bits_per_weight": 8 * weight_bytes / (n * k)})
    for key, (dtype, shape) in sorted(h.tensors.items()):
        if key in owned:
            continue
        size = _DTYPES[dtype].itemsize
        rows.append({"name": key, "shape": list(shape), "format": dtype.lower(),
                     "bytes": math.prod(shape) * size, "bits_per_weight": 8.0 * size})
    ternary_weights = sum(r["shape"][0] * r["shape"][1] for r in rows if r["format"].startswith("ternary"))
    ternary_bytes = sum(r["bytes"] for r in rows if r["format"].startswith("ternary"))
    fp_params = sum(math.prod(r["shape"]) for r in rows if not r["format"].startswith("ternary"))
    fp_bytes = sum(r["bytes"] for r in rows if not r["format"].startswith("ternary"))

    # Arithmetic per input token of the linear layers (attention scores, norms, activations not counted).
    ops = {"ternary_adds": 0, "rescale_mults": 0, "act_quant_mults": 0, "bias_adds": 0,
           "fp_linear_mults": 0, "fp_linear_adds": 0}
    dense_macs = 0  # multiply-adds of the same layers at full precision
    for rec in h.layers.values():
        n, k, bias = rec["out_features"], rec["in_features"], rec["bias"]
        dense_macs += n * k
        if rec["kind"] == "ternary":
            ops["ternary_adds"] += n * k
            ops["rescale_mults"] += 2 * n  # acc * (s_x * s_w)
            ops["act_quant_mults"] += k  # x * (127 / absmax)
            ops["bias_adds"] += n if bias else 0
        else:
            ops["fp_linear_mults"] += n * k
            ops["fp_linear_adds"] += n * k + (n if bias else 0)
    bias_total = sum(r["out_features"] for r in h.layers.values() if r["bias"])
    e = ENERGY_PJ
    fp_rest = ops["fp_linear_mults"] * e["fp32_mult"] + ops["fp_linear_adds"] * e["fp32_add"]
    scalar = ((ops["rescale_mults"] + ops["act_quant_mults"]) * e["fp32_mult"]
              + ops["bias_adds"] * e["fp32_add"])
    energy = {
        "ternary_int8_adds": ops["ternary_adds"] * e["int8_add"] + scalar + fp_rest,
        "ternary_int32_adds": ops["ternary_adds"] * e["int32_add"] + scalar + fp_rest,
        "fp32": dense_macs * (e["fp32_mult"] + e["fp32_add"]) + bias_total * e["fp32_add"],
        "fp16": dense_macs * (e["fp16_mult"] + e["fp16_add"]) + bias_total * e["fp16_add"],
        "ternary_layers_only": ops["ternary_adds"] * e["int8_add"] + scalar,
        "ternary_layers_at_fp32": ops["ternary_adds"] * (e["fp32_mult"] + e["fp32_add"])
        + ops["bias_adds"] * e["fp32_add"],
    }
    return {
        "file": os.fspath(path), "file_bytes": h.file_size, "format_version": h.version,
        "model_class": h.metadata.get("model_class"),
        "tokenizer_bytes": len(h.metadata["tokenizer"].encode()) if "tokenizer" in h.metadata else None,
        "layers": rows,
        "totals": {"ternary_weights": ternary_weights, "ternary_bytes": ternary_bytes,
                   "ternary_bits_per_weight": 8 * ternary_bytes / ternary_weights if ternary_weights else 0.0,
                   "fp_params": fp_params, "fp_bytes": fp_bytes},
        "ops_per_token": ops, "energy_pj_per_token": energy,
        "energy_figures_pj": dict(e), "energy_source": ENERGY_SOURCE,
    }


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:g}"


def _printable(s: object) -> str:
    """``s`` with every non-printable character escaped (names in a file must not drive the terminal)."""
    s = str(s)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in s)


def format_info(d: dict) -> str:
    """The human-readable table of `describe` (non-printable characters of names escaped)."""
    out = [f"{_printable(d['file'])}: tritium format v{d['format_version']}, {d['file_bytes']:,} bytes"
           + (f", {_printable(d['model_class'])}" if d["model_class"] else "")
           + (f", tokenizer stored ({d['tokenizer_bytes']:,} bytes of JSON)" if d.get("tokenizer_bytes") else "")]
    out.append(f"{'name':<48} {'shape':>16} {'format':<14} {'bytes':>13} {'bits/w':>7}")
    for r in d["layers"]:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        out.append(f"{_printable(r['name'])[-48:]:<48} {shape:>16} {r['format']:<14} {r['bytes']:>13,} "
                   f"{r['bits_per_weight']:>7.2f}")
    t = d["totals"]
    out.append(f"ternary: {t['ternary_weights']:,} weights in {t['ternary_bytes']:,} bytes "
               f"({t['ternary_bits_per_weight']:.3f} bits/weight incl. scales and bias); "
               f"full precision: {t['fp_params']:,} values in {t['fp_bytes']:,} bytes")
    o, en = d["ops_per_token"], d["energy_pj_per_token"]
    out.append("arithmetic per token (linear layers only; attention, norms and activations not counted):")
    out.append(f"  ternary layers: {_fmt_count(o['ternary_adds'])} integer adds, 0 weight multiplies; "
               f"{_fmt_count(o['rescale_mults'])} fp32 rescale multiplies, "
               f"{_fmt_count(o['act_quant_mults'])} fp32 activation-quantization multiplies, "
               f"{_fmt_count(o['bias_adds'])} fp32 bias adds")
    out.append(f"  full-precision linear layers: {_fmt_count(o['fp_linear_mults'])} fp32 multiplies, "
               f"{_fmt_count(o['fp_linear_adds'])} fp32 adds")
    fig = ", ".join(f"{k} {v} pJ" for k, v in d["energy_figures_pj"].items())
    out.append(f"energy of that arithmetic per token ({fig}; {d['energy_source']}):")
    fp32 = en["fp32"]
    labels = (("frozen, int8 adds", "ternary_int8_adds"), ("frozen, int32 adds", "ternary_int32_adds"),
              ("fp32 model", "fp32"), ("fp16 model", "fp16"))
    for label, key in labels:
        ratio = f"  ({fp32 / en[key]:.1f}x less than fp32)" if key.startswith("ternary") and en[key] else ""
        out.append(f"  {label:<20} {en[key] / 1e6:>10.3f} uJ{ratio}")
    if en["ternary_layers_only"]:
        out.append(f"  ternary layers alone: {en['ternary_layers_only'] / 1e6:.3f} uJ (int8 adds) vs "
                   f"{en['ternary_layers_at_fp32'] / 1e6:.3f} uJ for the same layers at fp32 "
                   f"({en['ternary_layers_at_fp32'] / en['ternary_layers_only']:.1f}x)")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=existing_file, help="a file written by tritium.save")
    parser.add_argument("--json", metavar="PATH", type=output_file,
                        help="also write the description as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """``tritium info``: a tritium or GGUF file described; any other file is a usage error (one line, exit 2)."""
    from .formats import gguf

    gguf_file = gguf.is_gguf(args.file)
    try:
        d = gguf.describe_gguf(args.file) if gguf_file else describe(args.file)
    except (TritiumFormatError, ImportError) as e:
        raise UsageError(_printable(e)) from None
    print(gguf.format_gguf_info(d) if gguf_file else format_info(d))
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(args.json, json.dumps(d, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"--json: cannot write {_printable(args.json)} ({e})") from None
    return 0
