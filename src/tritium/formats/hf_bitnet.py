"""Hugging Face BitNet checkpoints, both ways: `export_hf_bitnet` writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with its own BitNet quantizer, `import_hf_bitnet`
reads such a folder (the layout of ``microsoft/bitnet-b1.58-2B-4T``) into a tritium model.

**The layout.** ``config.json`` is the model's transformers config plus ``quantization_config``
``{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}`` and the list
``modules_to_not_convert`` of the linear layers that stay in full precision. transformers replaces every
other ``nn.Linear`` by its ``BitLinear``, whose state is ``weight``, uint8 ``(N / 4, K)`` (four ternary rows
per byte row, layout ``"hf_bitnet"`` of `tritium.formats.codecs`), ``weight_scale`` ``(1,)`` in the model's
dtype, and ``bias`` when the layer has one. ``model.safetensors`` holds those and every other tensor of
the model; the tokenizer files sit next to it.

**What maps.** transformers' ``BitLinear`` computes, per token, ``a = max(absmax(x), 1e-5)``,
``q_x = round(x * 127 / a)`` and ``y = (q_x @ q_w^T) / (weight_scale * 127 / a) + bias``. A tritium layer
computes ``y = (q_x @ q_w^T) * (a / 127 * s) + bias`` with the same ``q_x``, so a ternary layer maps when:

* its weight scale is one number per tensor ``s``, stored as ``weight_scale = 1 / s`` (transformers divides
  by it). How ``s`` was measured (absmean, absmedian, absmax) does not matter once the layer is frozen.
  Per-channel and group scales do not map: transformers' ``BitLinear`` holds one ``weight_scale``;
* it quantizes activations to 8 bits per token (the same absmax formula and ``[-127, 127]`` range, round
  half to even) and has finished its warm-up (``lambda_ = 1``);
* its input norm is None (``use_rms_norm: false``; the model's own norms feed the layer: BitNet's
  ``attn_sub_norm`` and ``ffn_sub_norm`` before ``o_proj`` and ``down_proj``, the block norms elsewhere),
  or ``"rmsnorm"`` in every ternary layer (``use_rms_norm: true``, ``rms_norm_eps: 1e-6``, unit
  ``rms_norm.weight``). tritium's ``"layernorm"`` subtracts the mean and has no counterpart;
* ``out_features`` is a multiple of 4 (transformers allocates ``N // 4`` packed rows).

The model must be a ``BitNetForCausalLM``, ``LlamaForCausalLM``, ``MistralForCausalLM`` or
``Qwen2ForCausalLM`` (transformers applies the BitNet quantizer to any of them: it runs the model's own
graph with ``BitLinear`` layers); its full-precision linear layers (``lm_head`` by default) are listed in
``modules_to_not_convert``. Anything else is refused with `HFExportError`, one line saying why.

**What differs numerically** (transformers' forward against tritium's, float32): transformers computes the
activation scale as ``127 * fl(1 / a)``, tritium as ``fl(127 / a)`` (see `tritium.quant`): the two differ in
the last bit for about a third of the tokens, which moves ``x * 127 / a`` across a rounding tie for about
one element in 1.7 million (measured on Gaussian activations), one integer step. The rescale is one
division against two multiplications, each rounded: a few float32 ulps. So the logits agree to float
rounding (about 1e-7 of the largest logit) except after an activation that these roundings move across a
rounding tie: one integer step, which moves later positions by up to about 1e-2 of the largest logit
(``tests/test_hf_bitnet.py`` has the measured numbers).

**Round trips.** The weight scale crosses as a float32 reciprocal, which is not always invertible: the
export stores the exact tritium scales in the safetensors metadata (``tritium.weight_scales``, used by the
import when they still give the stored ``weight_scale``), and `import_hf_bitnet` keeps each layer's stored
``weight_scale`` as the layer attribute ``hf_weight_scale`` (used by the export while the layer's scale is
unchanged). So tritium -> HF -> tritium gives identical frozen layers, and HF -> tritium -> HF identical
tensors (in float32: the import upcasts bf16/fp16 checkpoints exactly).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic, kernels, quant
from ..config import BitConfig
from ..nn import BitConv1D, BitLinear, TernaryLinear
from . import ExportError, TritiumFormatError, codecs
from .gguf import PRESET

#: transformers ``model_type`` -> the model class exported and imported.
ARCHITECTURES = {"bitnet": "BitNetForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
#: The quantization config every export writes (``modules_to_not_convert`` is added per model).
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
#: The input norm eps of tritium's ``"rmsnorm"`` (`tritium.quant.input_norm`).
RMS_NORM_EPS = 1e-6
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: The safetensors metadata key holding the exact float32 tritium scale of every ternary layer.
SCALES_KEY = "tritium.weight_scales"
#: Bounds on what an imported folder may hold (its files are untrusted).
MAX_JSON_BYTES = 16 * 2**20
MAX_TOKENIZER_BYTES = 256 * 2**20
MAX_SHARDS = 1024
MAX_WIDTH = 2**20
MAX_VOCAB = 2**24
MAX_PATTERN_CHARS = 1000
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
#: Files an export writes (a folder holding only these may be replaced by a new export).
_EXPORT_FILES = frozenset({"config.json", "generation_config.json", WEIGHTS_NAME, INDEX_NAME, "tokenizer.json",
                           "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                           "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                           "tokenizer.model"})
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PLAIN_PATTERN = re.compile(r"[A-Za-z0-9_.]+")
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")


class HFExportError(ExportError):
    """A model, tokenizer or output folder that cannot be written as a Hugging Face BitNet checkpoint (one
    line, why)."""


# ------------------------------------------------------------------------------------------------ scales


def hf_weight_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' ``weight_scale`` ``(1,)`` in ``dtype`` for a tritium scale ``s``: ``1 / s``, correctly
    rounded (the float64 quotient rounded once to float32, bfloat16 or float16 is the correctly rounded
    quotient in that type)."""
    return (1.0 / scale.detach().double().cpu().reshape(1)).to(dtype)


def tritium_scale(weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 tritium scale ``(1,)`` of transformers' ``weight_scale``: ``1 / weight_scale``, correctly
    rounded."""
    return (1.0 / weight_scale.detach().double().cpu().reshape(1)).float()


# ------------------------------------------------------------------------------------------------ export


@dataclass
class _Ternary:
    """A ternary layer as exported: int8 codes ``(N, K)``, float32 scale ``(1,)``, bias, input norm and the
    ``weight_scale`` it was imported with (or None)."""

    q: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    norm: str | None
    stored: torch.Tensor | None


_HINT = "quantize with tritium.formats.gguf.PRESET (ternary, one scale per tensor, 8-bit activations, norm=None)"


def _ternary(name: str, layer: nn.Module) -> _Ternary:
    """The codes, scale and bias of a ternary layer that maps onto transformers' BitLinear."""
    where = f"cannot export {name!r} as HF BitNet"
    if isinstance(layer, BitLinear):
        granularity, norm, how = layer.config.granularity, layer.config.norm, ""
    elif isinstance(layer, TernaryLinear):
        granularity, norm, how = ("channel" if layer.per_channel else "tensor"), layer.norm, "it was frozen with "
    else:
        raise HFExportError(f"{where}: it is a {type(layer).__name__}, not a ternary linear layer; {_HINT}")
    if granularity != "tensor":
        raise HFExportError(f"{where}: {how}granularity={granularity!r} (transformers' BitLinear has one "
                            f"weight_scale per tensor, no per-channel or group scales); {_HINT}")
    if norm not in (None, "rmsnorm"):
        raise HFExportError(f"{where}: {how}norm={norm!r} (transformers' BitLinear has no mean-subtracting "
                            f"input norm; None or 'rmsnorm' map); {_HINT}")
    frozen = layer
    if isinstance(layer, BitLinear):
        try:
            frozen = TernaryLinear.from_bitlinear(layer, name)
        except ValueError as e:
            raise HFExportError(f"{where}: {e}; {_HINT}") from None
    if frozen.weight_packed.device.type == "meta":
        raise HFExportError(f"{where}: its weights are on the meta device (load them first)")
    n, k = frozen.out_features, frozen.in_features
    if n % 4:
        raise HFExportError(f"{where}: out_features={n} is not a multiple of 4 (transformers' BitLinear stores "
                            "N / 4 packed rows)")
    q = kernels.unpack(frozen.weight_packed.cpu(), n, k)
    scale = frozen.weight_scale.detach().float().cpu().reshape(1).clone()
    if not (torch.isfinite(scale).all() and scale.item() > 0):
        raise HFExportError(f"{where}: its weight scale {scale.item()} is not a positive finite number")
    bias = None if frozen.bias is None else frozen.bias.detach().float().cpu()
    stored = getattr(layer, "hf_weight_scale", None)
    if not (isinstance(stored, torch.Tensor) and stored.numel() == 1 and stored.is_floating_point()
            and torch.equal(tritium_scale(stored), scale)):
        stored = None  # absent, or the layer's scale changed since it was imported
    return _Ternary(q, scale, bias, frozen.norm, stored)


@dataclass
class _Plan:
    """What an export writes: config, tensors (safetensors) and their metadata."""

    config: Any
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _dtype_of(model: nn.Module) -> torch.dtype:
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype if embed is not None else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise HFExportError(f"cannot export as HF BitNet: the model's dtype is {dtype}; float32, bfloat16 or "
                            "float16 map")
    return dtype


def _plan(model: nn.Module) -> _Plan:
    """Everything to write, after checking that ``model`` maps onto transformers' BitNet quantizer."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if cls not in ARCHITECTURES.values() or ARCHITECTURES.get(getattr(config, "model_type", None)) != cls:
        raise HFExportError(f"cannot export a {cls} as HF BitNet: supported models are "
                            f"{', '.join(ARCHITECTURES.values())}")
    dtype = _dtype_of(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = (isinstance(head, nn.Linear) and not isinstance(head, BitLinear) and embed is not None
            and head.weight is embed.weight)
    ternary: dict[str, _Ternary] = {}
    keep: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, (BitLinear, TernaryLinear)):
            ternary[name] = _ternary(name, module)
            continue
        if isinstance(module, BitConv1D):
            raise HFExportError(f"cannot export {name!r} as HF BitNet: it is a {type(module).__name__}, which "
                                "transformers' BitNet quantizer has no counterpart for")
        if isinstance(module, nn.Linear):
            keep.append(name)
        if any(name == t or name.startswith(t + ".") for t in ternary):
            continue
        state = list(module.named_parameters(recurse=False)) + [
            (b, t) for b, t in module.named_buffers(recurse=False) if b not in module._non_persistent_buffers_set]
        for pname, t in state:
            if t is None:
                continue
            full = f"{name}.{pname}" if name else pname
            if tied and module is head:
                continue
            if t.device.type == "meta":
                raise HFExportError(f"cannot export {full!r} as HF BitNet: it is on the meta device")
            tensors[full] = t.detach().cpu().to(dtype) if t.is_floating_point() else t.detach().cpu()
    if not ternary:
        raise HFExportError(f"cannot export the {cls} as HF BitNet: it has no ternary layer; {_HINT}")
    norms = {layer.norm for layer in ternary.values()}
    if len(norms) > 1:
        raise HFExportError("cannot export as HF BitNet: some ternary layers have input norm 'rmsnorm', others "
                            "none (transformers' use_rms_norm applies to every BitLinear)")
    norm = norms.pop()
    scales: dict[str, str] = {}
    for name, layer in ternary.items():
        ws = layer.stored.to(dtype).reshape(1) if layer.stored is not None else hf_weight_scale(layer.scale, dtype)
        live = bool(layer.q.ne(0).any())
        if not (torch.isfinite(ws).all() and ws.item() > 0):
            if live:
                raise HFExportError(f"cannot export {name!r} as HF BitNet: its weight_scale 1/{layer.scale.item():.6g} "
                                    f"lies outside {_DTYPE_NAMES[dtype]}'s range")
            ws = torch.ones(1, dtype=dtype)  # all codes zero: the scale is irrelevant
        tensors[f"{name}.weight"] = codecs.pack("hf_bitnet", layer.q)
        tensors[f"{name}.weight_scale"] = ws
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(dtype)
        if norm == "rmsnorm":
            tensors[f"{name}.rms_norm.weight"] = torch.ones(layer.q.shape[1], dtype=dtype)
        scales[name] = float(layer.scale.item()).hex()
    cfg = copy.deepcopy(config)
    cfg.architectures = [cls]
    cfg.tie_word_embeddings = bool(tied)
    cfg.dtype = dtype
    quantization = dict(QUANTIZATION_CONFIG, modules_to_not_convert=keep)
    if norm == "rmsnorm":
        quantization.update(use_rms_norm=True, rms_norm_eps=RMS_NORM_EPS)
    cfg.quantization_config = quantization
    # a shared tensor is written once per name: safetensors refuses aliases
    seen: set[int] = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            tensors[key] = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[key] = tensors[key].contiguous()
    metadata = {"format": "pt", SCALES_KEY: json.dumps(scales, separators=(",", ":"))}
    return _Plan(cfg, tensors, metadata)


def _write_tokenizer(folder: Path, tokenizer: object, config: Any) -> None:
    """The tokenizer files of a ``tokenizers.Tokenizer`` or transformers tokenizer, written into ``folder``."""
    if hasattr(tokenizer, "save_pretrained") and hasattr(tokenizer, "backend_tokenizer"):
        tokenizer.save_pretrained(str(folder))
        return
    to_str = getattr(tokenizer, "to_str", None)
    if not callable(to_str) or not callable(getattr(tokenizer, "id_to_token", None)):
        raise HFExportError(f"cannot export the tokenizer: a {type(tokenizer).__name__} is neither a "
                            "tokenizers.Tokenizer nor a transformers fast tokenizer")
    (folder / "tokenizer.json").write_text(to_str(), encoding="utf-8")
    spec: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int):
        spec["model_max_length"] = limit
    for key in ("bos", "eos", "pad"):
        i = getattr(config, f"{key}_token_id", None)
        i = i[0] if isinstance(i, list) and i else i
        token = tokenizer.id_to_token(i) if isinstance(i, int) and i >= 0 else None
        if token is not None:
            spec[f"{key}_token"] = token
    (folder / "tokenizer_config.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")


def _replaceable(out: Path) -> None:
    """Raise unless ``out`` is absent, or a folder holding only files an export writes."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise HFExportError(f"cannot write {os.fspath(out)}: it exists and is not a folder")
    for entry in os.scandir(out):
        if entry.name not in _EXPORT_FILES or not entry.is_file(follow_symlinks=False):
            raise HFExportError(f"cannot write {os.fspath(out)}: it holds {entry.name!r}, which an export does not "
                                "write (choose a new or empty folder)")


def write_folder(out: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Create or replace the folder ``out`` with what ``fill(tmp)`` writes into a temporary folder, atomically.

    The temporary folder lies next to ``out``; its files are synced, it is renamed into place and the parent
    folder is synced. An existing ``out`` (only one holding nothing but files an export writes; anything
    else raises `HFExportError`) is renamed aside first and removed after the new folder is in place. If
    ``fill`` raises, ``out`` is unchanged and no temporary folder is left.
    """
    out = Path(os.path.abspath(os.fspath(out)))
    _replaceable(out)
    mode = (os.stat(out).st_mode & 0o777) if out.is_dir() else 0o777 & ~atomic.umask()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.", suffix=".tmp", dir=out.parent))
    old = tmp.with_suffix(".old")
    try:
        fill(tmp)
        for entry in os.scandir(tmp):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, mode)
        atomic.fsync_dir(tmp)
        if out.exists():
            _replaceable(out)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.fsync_dir(out.parent)


def export_hf_bitnet(model: nn.Module, out_dir: str | os.PathLike, tokenizer: object | None = None) -> None:
    """Write ``model`` as a Hugging Face BitNet checkpoint folder ``out_dir``, atomically.

    ``model`` is a transformers ``BitNetForCausalLM``, ``LlamaForCausalLM``, ``MistralForCausalLM`` or
    ``Qwen2ForCausalLM`` whose ternary layers map onto transformers' ``BitLinear`` (see the module docstring;
    quantize with `PRESET`), QAT (`BitLinear`) or frozen (`TernaryLinear`); it is not changed. The folder holds
    ``config.json`` (with the BitNet ``quantization_config``), ``generation_config.json``,
    ``model.safetensors`` (tensors in the model's dtype) and, with ``tokenizer`` (a ``tokenizers.Tokenizer``
    or a transformers fast tokenizer), its ``tokenizer.json`` and ``tokenizer_config.json``.
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it (transformers needs ``accelerate`` for it).

    ``out_dir`` is written as a temporary folder renamed into place; an existing ``out_dir`` is replaced only
    if it holds nothing but files an export writes. Raises `HFExportError` (one line, why) for a model,
    tokenizer or folder that does not map.
    """
    if not isinstance(model, nn.Module):
        raise HFExportError(f"cannot export a {type(model).__name__} as HF BitNet: expected a transformers model")
    from safetensors.torch import save_file

    plan = _plan(model)
    generation = getattr(model, "generation_config", None)

    def fill(folder: Path) -> None:
        (folder / "config.json").write_text(plan.config.to_json_string(use_diff=True), encoding="utf-8")
        if generation is not None and callable(getattr(generation, "to_json_string", None)):
            (folder / "generation_config.json").write_text(generation.to_json_string(use_diff=True),
                                                           encoding="utf-8")
        save_file(plan.tensors, str(folder / WEIGHTS_NAME), metadata=plan.metadata)
        if tokenizer is not None:
            _write_tokenizer(folder, tokenizer, plan.config)

    write_folder(out_dir, fill)


# ------------------------------------------------------------------------------------------------ import


def _native():
    from . import native

    return native


def _fail(path: str | os.PathLike, msg: str) -> TritiumFormatError:
    return TritiumFormatError(_native()._printable(f"{os.fspath(path)}: {msg}"))


def _read_small(path: Path, limit: int, what: str) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes."""
    with _native()._open(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise _fail(path, f"{what} is {size} bytes, more than {limit}")
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise _fail(path, f"{what} grew past {limit} bytes while reading")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def _read_json(path: Path, what: str) -> dict:
    value = _native()._loads(path, _read_small(path, MAX_JSON_BYTES, what), what)
    if not isinstance(value, dict):
        raise _fail(path, f"{what} is not a JSON object")
    return value


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    header: Any  # the file's `tritium.formats.native.SafetensorsHeader`


def _safetensors_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The validated tensor entries and the metadata of a safetensors file (no tensor data is read)."""
    native = _native()
    try:
        header = native.read_safetensors_header(path)
    except TritiumFormatError as e:
        raise TritiumFormatError(native._printable(e)) from None
    entries = {name: _Entry(path, dtype, shape, header) for name, (dtype, shape) in header.tensors.items()}
    return entries, header.metadata


def _read(entry: _Entry, name: str) -> torch.Tensor:
    """The tensor ``name`` read into fresh memory (no memory map)."""
    native = _native()
    try:
        with native._open(entry.file) as f:
            return native._reader(entry.file, entry.header, f)(name)
    except TritiumFormatError as e:
        raise TritiumFormatError(native._printable(e)) from None


def _shard_name(path: Path, value: object) -> str:
    if not (isinstance(value, str) and value.endswith(".safetensors") and 0 < len(value) <= 255
            and os.path.basename(value) == value and "\\" not in value and not value.startswith(".")):
        raise _fail(path, f"weight_map names the file {_native()._q(value)}; a shard must be a "
                          "*.safetensors file in the same folder")
    return value


def _tensors(folder: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Every tensor entry of the folder's safetensors weights (one file or an index of shards), and the
    metadata of the first file."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if index.exists() and not single.exists():
        spec = _read_json(index, INDEX_NAME)
        weight_map = spec.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _fail(index, "'weight_map' must be a non-empty object")
        files = sorted({_shard_name(index, v) for v in weight_map.values()})
        if len(files) > MAX_SHARDS:
            raise _fail(index, f"{len(files)} shards, more than {MAX_SHARDS}")
    elif single.exists():
        files, weight_map = [WEIGHTS_NAME], None
    else:
        pickles = sorted(e.name for e in os.scandir(folder) if e.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise _fail(folder, f"holds only pickle weights ({pickles[0]}); tritium never unpickles: convert them "
                                "to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise _fail(folder, f"has no {WEIGHTS_NAME} (or {INDEX_NAME})")
    entries: dict[str, _Entry] = {}
    meta: dict[str, str] | None = None
    for file in files:
        found, file_meta = _safetensors_header(folder / file)
        meta = file_meta if meta is None else meta
        for name, entry in found.items():
            if name in entries:
                raise _fail(folder / file, f"tensor {_native()._q(name)} is also stored in {entries[name].file.name}")
            if weight_map is not None and weight_map.get(name) != file:
                raise _fail(folder / INDEX_NAME, f"tensor {_native()._q(name)} is stored in {file}, the weight_map "
                                                 f"says {_native()._q(weight_map.get(name))}")
            entries[name] = entry
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise _fail(folder / INDEX_NAME, f"weight_map names tensor {_native()._q(missing[0])}, which no shard "
                                             "stores")
    return entries, meta or {}


@dataclass
class _Quantization:
    not_convert: list[str] | None
    norm: str | None


def _quantization(path: Path, config: dict) -> _Quantization:
    """The checked BitNet ``quantization_config`` of a ``config.json``."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "bitnet":
        got = q.get("quant_method") if isinstance(q, dict) else q
        raise _fail(path, f"not a BitNet checkpoint: quantization_config.quant_method is {_native()._q(got)}, "
                          "not 'bitnet'")
    linear_class = q.get("linear_class", "bitlinear")
    if linear_class != "bitlinear":
        raise _fail(path, f"linear_class {_native()._q(linear_class)} is not supported (tritium reads "
                          "'bitlinear' checkpoints: packed ternary weights with one weight_scale per tensor)")
    if q.get("quantization_mode", "offline") not in ("offline", "online"):
        raise _fail(path, f"quantization_mode {_native()._q(q.get('quantization_mode'))} is not 'offline'")
    use_rms = q.get("use_rms_norm", False)
    if not isinstance(use_rms, bool):
        raise _fail(path, f"use_rms_norm {_native()._q(use_rms)} is not a boolean")
    norm = None
    if use_rms:
        eps = q.get("rms_norm_eps", 1e-6)
        if eps != RMS_NORM_EPS:
            raise _fail(path, f"use_rms_norm with rms_norm_eps={_native()._q(eps)} does not map: tritium's rmsnorm "
                              f"has eps {RMS_NORM_EPS}")
        norm = "rmsnorm"
    patterns = q.get("modules_to_not_convert")
    if patterns is not None:
        if not isinstance(patterns, list) or len(patterns) > _native().MAX_TENSORS:
            raise _fail(path, "modules_to_not_convert must be a list of module names")
        for p in patterns:
            if not isinstance(p, str) or len(p) > MAX_PATTERN_CHARS or not _PLAIN_PATTERN.fullmatch(p):
                raise _fail(path, f"modules_to_not_convert entry {_native()._q(p)} is not a plain module name "
                                  "(tritium does not evaluate other regular expressions)")
    return _Quantization(patterns, norm)


def _converted(model: nn.Module, patterns: list[str] | None) -> set[str]:
    """The names of the ``nn.Linear`` layers transformers' BitNet quantizer replaces by ``BitLinear``."""
    if patterns is None:  # transformers' defaults: the output embedding, tied weights, the last parameter
        skip = set()
        head = model.get_output_embeddings()
        skip.update(n for n, m in model.named_modules() if head is not None and m is head)
        names = [n for n, _ in model.named_parameters()]
        if names:
            skip.add(names[-1].rsplit(".", 1)[0])
        if getattr(model.config, "tie_word_embeddings", False):
            skip.update(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        patterns = sorted(skip)
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)}


def _config(folder: Path) -> tuple[str, dict, _Quantization]:
    """The model class, config dict and quantization of a folder's ``config.json``."""
    path = folder / "config.json"
    if not path.exists():
        raise _fail(folder, "has no config.json")
    config = _read_json(path, "config.json")
    model_type = config.get("model_type")
    cls = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise _fail(path, f"model_type {_native()._q(model_type)} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    arch = config.get("architectures")
    if arch is not None and arch != [cls]:
        raise _fail(path, f"architectures {_native()._q(arch)} is not [{cls!r}]")
    for key in _WIDTH_KEYS + ("vocab_size",):
        v = config.get(key)
        hi = MAX_VOCAB if key == "vocab_size" else MAX_WIDTH
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi):
            raise _fail(path, f"{key} = {_native()._q(v)} must be an integer in [1, {hi}]")
    return cls, config, _quantization(path, config)


def _tokenizer(folder: Path) -> Any:
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    text = _read_small(path, MAX_TOKENIZER_BYTES, "tokenizer.json")
    try:
        return _native()._tokenizer_from_str(folder, text, "tokenizer.json")
    except TritiumFormatError as e:
        raise TritiumFormatError(_native()._printable(e)) from None


def _qat_layer(name: str, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               config: BitConfig) -> BitLinear:
    """A `BitLinear` whose latent weight ``q * c`` quantizes back to ``q`` and scale ``s`` under ``config``:
    ``c = s`` for absmax and absmedian, ``c = s * numel / nnz`` for absmean (so that ``mean |w| = s``).
    ValueError when it does not (absmedian with half the weights or more zero: the median is 0)."""
    n, k = q.shape
    s = scale.reshape(())
    nnz = int(q.ne(0).sum())
    c = s * (q.numel() / nnz) if config.measure == "absmean" and nnz else s
    layer = BitLinear(k, n, bias is not None, config, device="meta")
    layer.weight = nn.Parameter(q.float() * c.float())
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    if nnz:
        q2, s2 = quant.quantize_weight(layer.weight.detach(), config)
        if not torch.equal(q2.to(torch.int8), q) or not torch.allclose(s2.reshape(()), s, rtol=1e-5, atol=0.0):
            raise ValueError(f"cannot import {name!r} for QAT with measure={config.measure!r}: no latent weight "
                             f"q * c gives back its codes and scale under that measure ({nnz} of {q.numel()} weights "
                             "are non-zero); use measure='absmean' or 'absmax'")
    return layer


def import_hf_bitnet(path: str | os.PathLike, mode: str = "frozen",
                     config: BitConfig | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a Hugging Face BitNet checkpoint folder.

    The folder holds ``config.json`` with a BitNet ``quantization_config`` (``linear_class`` "bitlinear", as
    `export_hf_bitnet` writes, the layout of ``microsoft/bitnet-b1.58-2B-4T``) of a ``BitNetForCausalLM``,
    ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``, ``model.safetensors`` (or an index
    and its shards) and optionally ``tokenizer.json``. Every layer transformers' quantizer would turn into a
    ``BitLinear`` becomes, with ``mode="frozen"``, a `TernaryLinear` on tritium's kernels (scale
    ``1 / weight_scale``); with ``mode="qat"``, a `BitLinear` with ``config`` (default: `PRESET` with
    ``measure="absmean"``, BitNet b1.58's) whose float32 latent weight quantizes back to the stored codes and
    scale, to continue quantization-aware training. The other tensors are float32.

    Files are untrusted: only safetensors are read (never a pickle), each tensor into fresh memory; headers,
    JSON, tokenizer and widths are bounded. Anything malformed or unsupported (missing, extra or misshapen
    tensors, wrong dtypes, invalid packed codes, a non-positive or non-finite ``weight_scale``, truncated
    files, a folder with only ``pytorch_model.bin``) raises `TritiumFormatError` with one line saying why.
    ValueError for a bad ``mode`` or ``config``.
    """
    from ..models.transformers import from_config

    if mode not in ("frozen", "qat"):
        raise ValueError(f"mode={mode!r} is not supported; choose 'frozen' or 'qat'")
    folder = Path(path)
    if not folder.is_dir():
        raise TritiumFormatError(_native()._printable(f"{os.fspath(path)}: not a folder (a Hugging Face "
                                                      "checkpoint is a folder with config.json)"))
    cls, config_dict, quantization = _config(folder)
    norm = quantization.norm
    if mode == "qat":
        cfg = PRESET.replace(measure="absmean", norm=norm) if config is None else config
        if not isinstance(cfg, BitConfig):
            raise TypeError(f"config must be a BitConfig, got {type(cfg).__name__}")
        bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in
               (("weight_bits", 1.58), ("granularity", "tensor"), ("act_bits", 8), ("lambda_", 1.0), ("norm", norm))
               if getattr(cfg, k) != v]
        if bad:
            raise ValueError("config does not compute what the checkpoint computes: " + "; ".join(bad))
    elif config is not None:
        raise ValueError("config applies to mode='qat' only")
    entries, meta = _tensors(folder)
    exact = _exact_scales(folder, meta)
    try:
        model = from_config(cls, config_dict, max_blocks=len(entries))
    except ValueError as e:
        raise _fail(folder / "config.json", str(e)) from None
    converted = _converted(model, quantization.not_convert)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    if tied and head_name in converted:
        raise _fail(folder / "config.json", f"{head_name!r} is quantized but tied to the input embedding")
    native = _native()
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...], kinds: tuple[str, ...]) -> torch.Tensor:
        entry = entries.get(name)
        if entry is None:
            raise _fail(folder, f"tensor {native._q(name)} is missing")
        if entry.dtype not in kinds:
            raise _fail(entry.file, f"tensor {native._q(name)} is {entry.dtype}; expected {' or '.join(kinds)}")
        if entry.shape != shape:
            raise _fail(entry.file, f"tensor {native._q(name)} has shape {list(entry.shape)}, the model needs "
                                    f"{list(shape)}")
        used.add(name)
        return _read(entry, name)

    def floats(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return get(name, shape, _FLOAT_DTYPES).float()

    for mname, module in list(model.named_modules()):
        if mname in converted:
            n, k = module.out_features, module.in_features
            where = f"{folder / WEIGHTS_NAME}: {mname}"
            if n % 4:
                raise _fail(folder, f"{mname!r} has out_features={n}, not a multiple of 4 (transformers' BitLinear "
                                    "stores N / 4 packed rows)")
            packed = get(f"{mname}.weight", codecs.packed_shape("hf_bitnet", n, k), ("U8",))
            q = codecs.unpack("hf_bitnet", packed, n, k, where=native._printable(where))
            key = f"{mname}.weight_scale"  # one number, (1,) as transformers' buffer, or a scalar
            stored = get(key, () if key in entries and entries[key].shape == () else (1,), _FLOAT_DTYPES[:3])
            stored = stored.reshape(1)
            if not (torch.isfinite(stored).all() and stored.item() > 0):
                raise _fail(folder, f"{mname}.weight_scale is {stored.item()}, not a positive finite number")
            scale = tritium_scale(stored)
            if not torch.isfinite(scale).all() or scale.item() == 0:
                raise _fail(folder, f"{mname}.weight_scale {stored.item():.6g} gives a scale outside float32's range")
            if mname in exact and torch.equal(hf_weight_scale(exact[mname], stored.dtype), stored):
                scale = exact[mname]
            bias = floats(f"{mname}.bias", (n,)) if module.bias is not None else None
            if norm == "rmsnorm":
                w = floats(f"{mname}.rms_norm.weight", (k,))
                if not torch.all(w == 1):
                    raise _fail(folder, f"{mname}.rms_norm.weight is not all ones: a learned input norm does not map "
                                        "onto tritium's parameter-free rmsnorm")
            if mode == "frozen":
                if k > kernels.MAX_K:
                    raise _fail(folder, f"{mname!r} has in_features={k}, more than the kernels take "
                                        f"({kernels.MAX_K}); import with mode='qat'")
                layer: nn.Module = TernaryLinear(k, n, bias is not None, norm=norm, per_channel=False)
                layer.weight_packed = kernels.pack(q).contiguous()
                layer.weight_scale = scale.clone()
                if bias is not None:
                    layer.bias = bias.contiguous()
            else:
                layer = _qat_layer(mname, q, scale, bias, cfg)
            layer.hf_weight_scale = stored
            parent, _, leaf = mname.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)
            continue
        if any(mname.startswith(c + ".") for c in converted):
            continue
        if module is head and tied:
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            module._parameters[pname] = nn.Parameter(floats(full, tuple(p.shape)), requires_grad=p.requires_grad)
        for bname, b in list(module.named_buffers(recurse=False)):
            full = f"{mname}.{bname}" if mname else bname
            if bname not in module._non_persistent_buffers_set and full in entries:
                module._buffers[bname] = floats(full, tuple(b.shape)) if b.is_floating_point() else \
                    get(full, tuple(b.shape), (entries[full].dtype,))
    if tied:
        head.weight = embed.weight
        if head_name is not None and f"{head_name}.weight" in entries:  # a tied head stored anyway must agree
            if not torch.equal(floats(f"{head_name}.weight", tuple(embed.weight.shape)), embed.weight.detach()):
                raise _fail(folder, f"{head_name}.weight differs from the input embedding it is tied to")
    extra = sorted(set(entries) - used)
    if extra:
        raise _fail(folder, f"tensor {native._q(extra[0])} has no place in the {cls}")
    for mname, module in list(model.named_modules()):  # computed buffers (rotary tables) are not stored
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            try:
                fresh = type(module)(config=model.config)
            except Exception:
                raise _fail(folder, f"no value for the buffers of {mname!r}") from None
            parent, _, leaf = mname.rpartition(".")
            setattr(model.get_submodule(parent), leaf, fresh)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise _fail(folder, f"no value for {name!r}")
    model.config.dtype = torch.float32
    model.config._name_or_path = os.fspath(path)
    return model.eval(), _tokenizer(folder)


def _exact_scales(folder: Path, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The exact tritium scales an export stored in the safetensors metadata (empty when absent or invalid:
    they are only a refinement of ``1 / weight_scale``)."""
    text = meta.get(SCALES_KEY)
    if text is None:
        return {}
    try:
        value = _native()._loads(folder, text, f"metadata {SCALES_KEY!r}")
    except TritiumFormatError:
        return {}
    out = {}
    if isinstance(value, dict):
        for name, h in value.items():
            try:
                s = torch.tensor([float.fromhex(h)], dtype=torch.float32)
            except (TypeError, ValueError, OverflowError):
                continue
            if torch.isfinite(s).all() and s.item() > 0 and float(s.item()) == float.fromhex(h):
                out[name] = s
    return out


__all__ = ["ARCHITECTURES", "HFExportError", "PRESET", "QUANTIZATION_CONFIG", "export_hf_bitnet",
           "hf_weight_scale", "import_hf_bitnet", "tritium_scale", "write_folder"]
