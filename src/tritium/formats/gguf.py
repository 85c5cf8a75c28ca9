"""GGUF export of ternary decoders for llama.cpp, in its TQ2_0 or TQ1_0 types.

`export_gguf` writes a transformers ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
``BitNetForCausalLM`` whose linear layers are ternary (`BitLinear` during training or `TernaryLinear` after
`tritium.freeze`) as one GGUF file: the seven linear layers of every block in ``TQ2_0`` (2 bits per weight
plus one fp16 scale per 256 weights, 2.06 bits) or ``TQ1_0`` (base-3, 1.69 bits); the token embedding, the
norms and a full-precision output head in F32 (or F16 for the embedding and head). Tensor names and
metadata keys are those of the ``gguf`` package (the llama.cpp project's own writer), mapped as llama.cpp's
``convert_hf_to_gguf.py`` maps them, including its row permutation of the query and key weights for the
``llama`` graph's rotary layout; the TQ blocks are packed by `tritium.formats.codecs`, byte for byte as the
``gguf`` package's quantizers pack them.

**BitNet** (``BitNetForCausalLM``) maps onto llama.cpp's ``bitnet`` graph: the Llama block plus an RMSNorm
before ``o_proj`` (``blk.N.attn_sub_norm``) and before ``down_proj`` (``blk.N.ffn_sub_norm``), the token
embedding as output head. Measured against llama.cpp (llama-cpp-python 0.3.36; ``tests/test_gguf.py``):
its rotary embedding rotates the halves of a head as transformers does, so the query and key rows keep
their order (with the ``llama`` permutation the trained test model scores cosine 0.92 and top-1 77% instead
of 0.99995 and 99%); and its feed-forward activation is SiLU whatever the file says
(``bitnet.hidden_activation`` is not read), so only ``hidden_act="silu"`` maps: transformers' default
``"relu2"`` (BitNet b1.58's) is refused. The head must be tied to the embedding
(``tie_word_embeddings=True``) and the layers have no biases.

**Which models map onto llama.cpp's graph.** llama.cpp's Llama graph multiplies each linear layer's input
as it is: it has no place for `BitLinear`'s parameter-free input norm. A model maps when every linear layer
in the blocks is ternary with ``norm=None`` (the model's own RMSNorms already feed q/k/v and gate/up),
8-bit activations, a per-tensor or per-channel scale (a TQ block lies inside one row, so each block
stores its row's scale) and a finished warm-up (``lambda_ = 1``). `PRESET` is that config;
``tritium.quantize(model, PRESET)`` makes a model exportable from the start, and the default exclusion
keeps ``lm_head`` in full precision (a head quantized with the same config, ``exclude=[]``, is written in the
TQ type too). The input width of every linear layer must be a multiple of 256 (the TQ block). Anything
else (another norm, group scales, 1/2/4-bit or float layers in the blocks, rope scaling, sliding-window
layers of Qwen2, another activation or an untied head for BitNet, other architectures) is refused with one
line saying why (`GGUFExportError`).

**What differs numerically** between the exported model in llama.cpp and the same model in tritium:

* Activations: tritium quantizes each token's input to a layer with one absmax scale per token
  (``s_x = absmax / 127``); llama.cpp quantizes to Q8_K, one absmax scale per block of 256 values of a
  token (the same formula, ``[-127, 127]``, round half to even). Where a layer's input is 256 wide the two
  agree up to the last bit of the scale; wider inputs get finer (per-block) scales in llama.cpp.
* Weight scale: tritium keeps a float32 scale per tensor (or channel); TQ2_0/TQ1_0 store it once per 256
  weights as fp16, a relative rounding of at most 2^-11 (0.05%) that scales the layer's output. Scales
  outside fp16's normal range are refused.
* Everything else runs in llama.cpp's own float32 kernels (RMSNorm, rotary embedding, softmax), with its
  KV cache in F16 by default (``type_k``/``type_v`` select F32), and in the F16 option the embedding and
  head are rounded to fp16.
* A Mistral model's sliding window is not part of llama.cpp's ``llama`` graph: the file's context length
  is capped at the window, within which full and sliding-window attention agree.

The tokenizer, when given (a Hugging Face ``tokenizers.Tokenizer`` or a transformers fast tokenizer), is
written as llama.cpp's ``gpt2`` BPE vocabulary (byte-level BPE with the GPT-2 pre-tokenizer): tokens,
merges, token types (special added tokens as control tokens) and the model config's BOS/EOS ids. Other
tokenizers are refused; without one the file has no vocabulary (``tokenizer.ggml.model = "none"``) and
llama.cpp runs it on token ids.

`import_gguf` reads such a file back (TQ2_0/TQ1_0 layers as frozen `TernaryLinear`, the rest as float32,
the ``gpt2`` vocabulary as a tokenizer; a ``bitnet`` file's optional per-tensor ``.scale`` tensors are folded
into the layers' scales); `tritium.info.describe_gguf` summarizes one for ``tritium info``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import atomic, kernels
from ..config import BitConfig
from ..nn import BitLinear, TernaryLinear
from . import ExportError, codecs

#: The `BitConfig` whose layers map onto llama.cpp's graph: ternary, absmedian per tensor, 8-bit
#: activations, no input norm. Use ``tritium.quantize(model, PRESET)``.
PRESET = BitConfig(norm=None)
QTYPES = ("tq2_0", "tq1_0")
FLOAT_TYPES = ("f32", "f16")
#: transformers class name -> llama.cpp architecture.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "BitNetForCausalLM": "bitnet"}
#: The feed-forward activation of each llama.cpp graph (llama.cpp's bitnet graph computes SiLU and does not
#: read ``bitnet.hidden_activation``: measured with llama-cpp-python 0.3.36 in ``tests/test_gguf.py``).
ACTIVATIONS = {"llama": "silu", "qwen2": "silu", "bitnet": "silu"}
BLOCK = 256  # weights per TQ2_0 / TQ1_0 block (QK_K)
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The norms of llama.cpp's bitnet graph that the ``gguf`` package's tensor map does not name (its names are
#: those of the first BitNet checkpoints): transformers' name inside a block -> GGUF name inside ``blk.N``.
_SUB_NORMS = {"self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
_MODEL_ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "bitnet": "BITNET"}  # gguf.MODEL_ARCH member names
_FP16_MIN, _FP16_MAX = 2.0**-14, 65504.0


class GGUFExportError(ExportError):
    """A model, tokenizer or option that cannot be written as a GGUF file for llama.cpp (one line, why)."""


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'tritium[gguf]'") from e
    return gguf


@dataclass
class _Ternary:
    """A ternary linear layer as exported: int8 codes ``(N, K)``, float32 scale ``(N,)``, bias or None."""

    q: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


def _ternary(name: str, layer: nn.Module) -> _Ternary:
    """The codes, row scales and bias of a ternary layer that maps onto llama.cpp's graph."""
    hint = "quantize the model with tritium.formats.gguf.PRESET (norm=None) and train it"
    if isinstance(layer, BitLinear):
        cfg = layer.config
        if cfg.norm is not None:  # the other conditions are those of freezing, checked by from_bitlinear
            raise GGUFExportError(
                f"cannot export {name!r} (config {cfg.spec!r}) to GGUF: norm={cfg.norm!r} (llama.cpp's graph has "
                f"no input norm inside a linear layer); {hint}"
            )
        try:
            layer = TernaryLinear.from_bitlinear(layer, name)
        except ValueError as e:
            raise GGUFExportError(f"cannot export {name!r} to GGUF: {e}; {hint}") from None
    elif isinstance(layer, TernaryLinear):
        if layer.norm is not None:
            raise GGUFExportError(
                f"cannot export {name!r} to GGUF: it was frozen with norm={layer.norm!r}, and llama.cpp's graph "
                f"has no input norm inside a linear layer; {hint}")
    else:
        raise GGUFExportError(f"cannot export {name!r} to GGUF: it is a {type(layer).__name__}, not a ternary "
                              f"layer; {hint}")
    if layer.weight_packed.device.type == "meta":
        raise GGUFExportError(f"cannot export {name!r} to GGUF: its weights are on the meta device (load them first)")
    n, k = layer.out_features, layer.in_features
    if k % BLOCK:
        raise GGUFExportError(f"cannot export {name!r} to GGUF: in_features={k} is not a multiple of {BLOCK} "
                              "(the TQ2_0/TQ1_0 block along each row)")
    q = kernels.unpack(layer.weight_packed.cpu(), n, k)
    scale = layer.weight_scale.detach().float().cpu().reshape(-1).expand(n).clone()
    used = scale[(q != 0).any(dim=1)]
    bad = used[~((used.abs() >= _FP16_MIN) & (used.abs() <= _FP16_MAX))]
    if bad.numel():
        raise GGUFExportError(f"cannot export {name!r} to GGUF: weight scale {bad[0].item():.6g} lies outside "
                              f"fp16's normal range [{_FP16_MIN:.3g}, {_FP16_MAX:g}] (TQ blocks store fp16 scales)")
    bias = None if layer.bias is None else layer.bias.detach().float().cpu()
    return _Ternary(q, scale, bias)


def _rope(config: Any) -> float:
    """The rope theta of a config with plain rotary embeddings; GGUFExportError for rope scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    if isinstance(params, dict):
        rope_type = params.get("rope_type", "default")
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    else:
        scaling = getattr(config, "rope_scaling", None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = getattr(config, "rope_theta", 10000.0)
    if rope_type != "default":
        raise GGUFExportError(f"cannot export to GGUF: rope type {rope_type!r} is not supported (plain rotary "
                              "embeddings only)")
    return float(theta)


def _tensor_names(arch: str, n_layers: int) -> Any:
    """``name(transformers tensor name) -> GGUF tensor name or None`` for a llama.cpp architecture."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _MODEL_ARCHS[arch]), n_layers)

    def name(tensor: str) -> str | None:
        found = names.get_name(tensor, try_suffixes=(".weight", ".bias"))
        sub = re.fullmatch(r"model\.layers\.(\d{1,4})\.(\w+\.\w+)\.weight", tensor) if arch == "bitnet" else None
        if found is None and sub and int(sub[1]) < n_layers and sub[2] in _SUB_NORMS:
            found = f"blk.{int(sub[1])}.{_SUB_NORMS[sub[2]]}.weight"
        return found

    return name


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder rows of a query/key projection from transformers' rotate-half layout to llama.cpp's pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass
class _Plan:
    arch: str
    config: Any
    ternary: dict[str, _Ternary]  # transformers tensor name (".weight") -> layer
    floats: dict[str, torch.Tensor]  # transformers tensor name -> float tensor
    head_dim: int
    context: int


def _plan(model: nn.Module) -> _Plan:
    """Everything to write, after checking that the model maps onto llama.cpp's graph."""
    cls = type(model).__name__
    arch = ARCHITECTURES.get(cls)
    if arch is None:
        raise GGUFExportError(f"cannot export a {cls} to GGUF: supported architectures are "
                              f"{', '.join(ARCHITECTURES)}")
    config = model.config
    act = getattr(config, "hidden_act", "silu")
    if act != ACTIVATIONS[arch]:
        why = " and does not read the activation from the file" if arch == "bitnet" else ""
        raise GGUFExportError(f"cannot export to GGUF: hidden_act={act!r} (llama.cpp's {arch} graph computes "
                              f"{ACTIVATIONS[arch]}{why})")
    _rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if arch in ("qwen2", "bitnet") and head_dim * heads != config.hidden_size:
        raise GGUFExportError(f"cannot export to GGUF: llama.cpp's {arch} graph needs heads x head_dim = hidden "
                              f"size, got {heads} x {head_dim} != {config.hidden_size}")
    context = int(config.max_position_embeddings)
    if arch == "qwen2":
        types = getattr(config, "layer_types", None) or []
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in types:
            raise GGUFExportError("cannot export to GGUF: Qwen2 sliding-window layers are not supported")
    window = getattr(config, "sliding_window", None) if cls == "MistralForCausalLM" else None
    if isinstance(window, int) and window > 0:
        context = min(context, window)
    ternary: dict[str, _Ternary] = {}
    floats: dict[str, torch.Tensor] = {}
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = isinstance(head, nn.Linear) and not isinstance(head, BitLinear) and embed is not None \
        and head.weight is embed.weight
    if arch == "bitnet" and not tied:
        raise GGUFExportError("cannot export to GGUF: llama.cpp's bitnet graph uses the token embedding as the output "
                              "head, and this model's head is not tied to it (tie_word_embeddings=True)")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (BitLinear, TernaryLinear)):
            ternary[name + ".weight"] = _ternary(name, module)
            if arch == "bitnet" and ternary[name + ".weight"].bias is not None:
                raise GGUFExportError(f"cannot export {name!r} to GGUF: llama.cpp's bitnet graph has no biases "
                                      "(attention_bias=False)")
        elif leaf in _LINEARS:
            raise GGUFExportError(
                f"cannot export {name!r} to GGUF: it is a {type(module).__name__}, not a ternary layer; quantize "
                "the model with tritium.formats.gguf.PRESET (norm=None) and train it")
        elif isinstance(module, nn.Linear) and module is not head:
            raise GGUFExportError(f"cannot export {name!r} to GGUF: llama.cpp's {arch} graph has no such layer")
        else:
            for pname, p in module.named_parameters(recurse=False):
                if p.device.type == "meta":
                    raise GGUFExportError(f"cannot export {name}.{pname} to GGUF: it is on the meta device")
                floats[f"{name}.{pname}" if name else pname] = p.detach().float().cpu()
    if tied:
        floats = {k: v for k, v in floats.items() if not k.startswith(_name_of(model, head) + ".")}
    return _Plan(arch, config, ternary, floats, head_dim, context)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _tokenizer_json(tokenizer: object) -> dict:
    from .native import tokenizer_json

    try:
        return json.loads(tokenizer_json(tokenizer))
    except TypeError as e:
        raise GGUFExportError(f"cannot export the tokenizer to GGUF: {e}") from None


def _components(node: dict | None) -> list[dict]:
    """The parts of a tokenizer component (a pre-tokenizer, decoder, ...) that may be a Sequence."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = next((k for k in ("pretokenizers", "decoders", "normalizers", "processors") if k in node), None)
        return [c for sub in node.get(key, []) for c in _components(sub)]
    return [node]


def _backend(tokenizer: object):
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _add_tokenizer(writer: Any, gguf: Any, tokenizer: object, vocab_size: int, config: Any) -> None:
    """Write a byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    why = None
    pre = _components(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE":
        why = f"its model is {model.get('type')!r}, not byte-level BPE"
    elif spec.get("normalizer"):
        why = "it has a normalizer"
    elif len(pre) != 1 or pre[0].get("type") != "ByteLevel" or not pre[0].get("use_regex", True) \
            or pre[0].get("add_prefix_space", False):
        why = "its pre-tokenizer is not GPT-2's ByteLevel (with its regex, without a prefix space)"
    elif model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        why = "its BPE uses byte fallback or subword affixes"
    if why:
        raise GGUFExportError(f"cannot export the tokenizer to GGUF: {why}; llama.cpp's gpt2 vocabulary is supported "
                              "(or export without a tokenizer)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for i, t in added.items():
        vocab[t["content"]] = i
    too_big = [i for i in vocab.values() if i >= vocab_size]
    if too_big:
        raise GGUFExportError(f"cannot export the tokenizer to GGUF: token id {max(too_big)} does not fit the model's "
                              f"vocabulary of {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    backend = _backend(tokenizer)
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < vocab_size and value in by_id:
            ids[key] = value
    if "bos_token_id" in ids:
        writer.add_bos_token_id(ids["bos_token_id"])
    if "eos_token_id" in ids:
        writer.add_eos_token_id(ids["eos_token_id"])
    if "pad_token_id" in ids:
        writer.add_pad_token_id(ids["pad_token_id"])
    with_special = backend.encode("a").ids
    plain = backend.encode("a", add_special_tokens=False).ids
    bos = ids.get("bos_token_id")
    writer.add_add_bos_token(bool(bos is not None and len(with_special) > len(plain) and with_special[0] == bos))
    writer.add_add_eos_token(False)


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    qtype: str = "tq2_0",
    tokenizer: object | None = None,
    float_type: str = "f32",
) -> None:
    """Write a ternary Llama, Mistral, Qwen2 or BitNet decoder as a GGUF file for llama.cpp, atomically.

    ``model`` is a transformers ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
    ``BitNetForCausalLM`` (SiLU, tied head) quantized with `PRESET` (a QAT model of `BitLinear` layers, or
    frozen with `tritium.freeze`). ``qtype`` is ``"tq2_0"`` or ``"tq1_0"`` for the linear layers;
    ``float_type`` (``"f32"`` or ``"f16"``) is the type of the token embedding and a full-precision output
    head (norms stay F32). ``tokenizer`` (optional) is a byte-level BPE ``tokenizers.Tokenizer`` or
    transformers fast tokenizer, written as llama.cpp's ``gpt2`` vocabulary. Raises `GGUFExportError` (one
    line, saying why) for a model, tokenizer or option that does not map onto llama.cpp's graph (see the
    module docstring), ImportError without the ``gguf`` package.
    """
    qtype, float_type = str(qtype).lower(), str(float_type).lower()
    if qtype not in QTYPES:
        raise GGUFExportError(f"qtype={qtype!r} is not supported; choose one of {', '.join(QTYPES)}")
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type={float_type!r} is not supported; choose one of {', '.join(FLOAT_TYPES)}")
    if not isinstance(model, nn.Module):
        raise GGUFExportError(f"cannot export a {type(model).__name__} to GGUF: expected a transformers model")
    gguf = _gguf()
    plan = _plan(model)
    config = plan.config
    q_type = gguf.GGMLQuantizationType.TQ2_0 if qtype == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    file_type = gguf.LlamaFileType.MOSTLY_TQ2_0 if qtype == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0
    arch = getattr(gguf.MODEL_ARCH, _MODEL_ARCHS[plan.arch])
    n_layers = int(config.num_hidden_layers)
    names = _tensor_names(plan.arch, n_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(config.num_key_value_heads or heads)
    vocab_size = int(model.get_input_embeddings().num_embeddings)

    def gguf_name(name: str) -> str:
        new = names(name)
        if new is None:
            raise GGUFExportError(f"cannot export {name!r} to GGUF: llama.cpp's {plan.arch} graph has no such tensor")
        return new

    def permuted(name: str, t: torch.Tensor) -> torch.Tensor:
        if plan.arch != "llama":
            return t
        if ".q_proj." in name:
            return _permute(t, heads)
        if ".k_proj." in name:
            return _permute(t, kv_heads)
        return t

    tensors: list[tuple[str, np.ndarray, Any]] = []
    for name, layer in plan.ternary.items():
        packed = codecs.pack(qtype, permuted(name, layer.q), permuted(name, layer.scale))  # = gguf's quantizer
        tensors.append((gguf_name(name), packed.numpy(), q_type))
        if layer.bias is not None:
            bias_name = name.removesuffix(".weight") + ".bias"
            tensors.append((gguf_name(bias_name), permuted(bias_name, layer.bias).contiguous().numpy(), None))
    for name, t in plan.floats.items():
        t = permuted(name, t).contiguous()
        if t.dim() == 2 and float_type == "f16":
            if not torch.isfinite(t.half()).all():
                raise GGUFExportError(f"cannot export {name!r} as F16: it has values outside fp16's range")
            tensors.append((gguf_name(name), t.half().numpy(), None))
        else:
            tensors.append((gguf_name(name), t.numpy(), None))

    def write(tmp) -> None:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        source = str(getattr(config, "_name_or_path", "") or "").rstrip("/")
        writer.add_name(os.path.basename(source) or type(model).__name__)
        writer.add_vocab_size(vocab_size)
        writer.add_context_length(plan.context)
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        if plan.arch in ("llama", "bitnet"):
            writer.add_rope_dimension_count(plan.head_dim)
        if plan.head_dim * heads != config.hidden_size:
            writer.add_key_length(plan.head_dim)
            writer.add_value_length(plan.head_dim)
        writer.add_rope_freq_base(_rope(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is None:
            writer.add_tokenizer_model("none")
        else:
            _add_tokenizer(writer, gguf, tokenizer, vocab_size, config)
        for gname, data, raw in tensors:
            if raw is None:
                writer.add_tensor(gname, data)
            else:
                writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic.write_with(path, write)


# ------------------------------------------------------------------------------------------------ import

#: Bounds on what an imported GGUF file may declare (the file is untrusted), checked while its header is read,
#: so that time and memory stay proportional to the file's size.
MAX_FILE_BYTES = 2**40
MAX_GGUF_TENSORS = 2**17
#: Metadata key/value pairs (a llama.cpp model has about 40).
MAX_GGUF_FIELDS = 2**16
#: Values in all metadata arrays together (a 128k-token vocabulary with its merges and types: about 540,000).
MAX_GGUF_ARRAY_ITEMS = 2**22
#: Nesting of metadata arrays (an array of arrays of scalars: 2).
MAX_GGUF_DEPTH = 2
MAX_GGUF_DIMS = 4
MAX_LAYERS = 4096
MAX_WIDTH = 2**20
#: llama.cpp architecture -> the transformers class an imported file becomes (a Mistral file imports as Llama).
IMPORT_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "bitnet": "BitNetForCausalLM"}
_TQ_CODECS = {"TQ2_0": "tq2_0", "TQ1_0": "tq1_0"}  # GGML type -> `tritium.formats.codecs` layout
_FLOAT_NAMES = ("F32", "F16", "BF16")
_GGUF_VERSIONS = (2, 3)
_GGUF_ALIGNMENT = 32
_VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_TYPED = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}
_MALFORMED = object()  # the value of a metadata field whose strings are not UTF-8


def _format_error(path: str | os.PathLike, msg: str) -> Exception:
    from .native import TritiumFormatError, _printable

    return TritiumFormatError(_printable(f"{os.fspath(path)}: {msg}"))


@dataclass
class _GGUFTensor:
    """One tensor of a GGUF file: ``shape`` in ggml order (row length first), ``data`` a read-only view of
    its bytes (typed for F32/F16/F64 and the integer types, uint8 rows of blocks for the others)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


@dataclass
class _GGUFFile:
    """The parsed header of a GGUF file: metadata values by key and the tensors in file order."""

    fields: dict[str, Any]
    tensors: list[_GGUFTensor]
    big_endian: bool


class _Header:
    """A cursor over the header bytes of a GGUF file that refuses to read past its end."""

    def __init__(self, path: str | os.PathLike, buf: Any, size: int) -> None:
        self.path, self.buf, self.size, self.pos, self.order = path, buf, size, 0, "<"

    def fail(self, msg: str) -> Exception:
        return _format_error(self.path, f"malformed GGUF file ({msg})")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"{what} runs past the end of the file")
        self.pos += n
        return self.pos - n

    def num(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(self.order + fmt, self.buf, self.take(struct.calcsize("<" + fmt), what))[0]

    def text(self, what: str) -> Any:
        n = self.num("Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start: start + n]).decode("utf-8")
        except UnicodeDecodeError:
            return _MALFORMED


def _parse_gguf(path: str | os.PathLike, buf: Any, size: int) -> _GGUFFile:
    """The metadata and tensor table of a GGUF file held in ``buf`` (``size`` bytes), with every count,
    length, type, shape and offset checked against the file and the MAX_GGUF_* bounds."""
    gguf = _gguf()
    h = _Header(path, buf, size)
    h.take(4, "the magic")
    version = h.num("I", "the version")
    if version & 0xFFFF == 0:  # written on a big-endian host
        h.order, version = ">", struct.unpack("<I", struct.pack(">I", version))[0]
    if version not in _GGUF_VERSIONS:
        raise h.fail(f"version {version} is not supported; supported: {', '.join(map(str, _GGUF_VERSIONS))}")
    n_tensors, n_fields = h.num("Q", "the tensor count"), h.num("Q", "the metadata count")
    if n_tensors > MAX_GGUF_TENSORS:
        raise _format_error(path, f"{n_tensors} tensors exceeds MAX_GGUF_TENSORS ({MAX_GGUF_TENSORS})")
    if n_fields > MAX_GGUF_FIELDS:
        raise _format_error(path, f"{n_fields} metadata fields exceeds MAX_GGUF_FIELDS ({MAX_GGUF_FIELDS})")
    items = 0

    def value(vtype: int, depth: int, key: str) -> Any:
        nonlocal items
        what = f"metadata {key!r}"
        fmt = _VALUE_FORMATS.get(vtype)
        if fmt is not None:
            return h.num(fmt, what)
        if vtype == _STRING:
            return h.text(what)
        if vtype != _ARRAY:
            raise h.fail(f"{what} has the unknown value type {vtype}")
        if depth >= MAX_GGUF_DEPTH:
            raise h.fail(f"{what} nests arrays deeper than MAX_GGUF_DEPTH ({MAX_GGUF_DEPTH})")
        itype, count = h.num("I", what), h.num("Q", what)
        items += count
        if items > MAX_GGUF_ARRAY_ITEMS:
            raise _format_error(path, f"{what}: the metadata arrays hold {items} values, more than "
                                      f"MAX_GGUF_ARRAY_ITEMS ({MAX_GGUF_ARRAY_ITEMS})")
        fmt = _VALUE_FORMATS.get(itype)
        if fmt is not None:
            start = h.take(count * struct.calcsize("<" + fmt), what)
            return list(struct.unpack_from(f"{h.order}{count}{fmt}", buf, start))
        least = {_STRING: 8, _ARRAY: 12}.get(itype)
        if least is None:
            raise h.fail(f"{what} is an array of the unknown value type {itype}")
        if count * least > size - h.pos:
            raise h.fail(f"{what} runs past the end of the file")
        out = [value(itype, depth + 1, key) for _ in range(count)]
        return _MALFORMED if any(v is _MALFORMED for v in out) else out

    fields: dict[str, Any] = {}
    alignment = _GGUF_ALIGNMENT
    for _ in range(n_fields):
        key = h.text("a metadata key")
        if key is _MALFORMED:
            raise h.fail("a metadata key is not UTF-8")
        if key in fields:
            raise h.fail(f"metadata {key!r} appears twice")
        vtype = h.num("I", f"metadata {key!r}")
        fields[key] = value(vtype, 0, key)
        if key == "general.alignment":
            alignment = fields[key]
            if vtype != _UINT32 or alignment < 1 or alignment & (alignment - 1):
                raise h.fail(f"general.alignment = {alignment!r} is not a UINT32 power of two")
    infos = []
    for _ in range(n_tensors):
        name = h.text("a tensor name")
        if name is _MALFORMED:
            raise h.fail("a tensor name is not UTF-8")
        n_dims = h.num("I", f"tensor {name!r}")
        if n_dims > MAX_GGUF_DIMS:
            raise h.fail(f"tensor {name!r} has {n_dims} dimensions, more than {MAX_GGUF_DIMS}")
        dims = tuple(h.num("Q", f"tensor {name!r}") for _ in range(n_dims))
        raw, offset = h.num("I", f"tensor {name!r}"), h.num("Q", f"tensor {name!r}")
        infos.append((name, dims, raw, offset))
    data_start = h.pos + (-h.pos) % alignment
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors, names = [], set()
    for name, dims, raw, offset in infos:
        if name in names:
            raise _format_error(path, f"tensor {name!r} appears twice")
        names.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(raw)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _format_error(path, f"tensor {name!r} has the unknown type {raw}") from None
        if not all(1 <= d < 2**63 for d in dims):
            raise _format_error(path, f"tensor {name!r} has dimensions {list(dims)}, each must lie in [1, 2**63)")
        row = dims[0] if dims else 1
        if row % block:
            raise _format_error(path, f"tensor {name!r} has rows of {row} values, not a multiple of the "
                                      f"{qtype.name} block of {block}")
        n_elements = math.prod(dims)
        n_bytes = n_elements // block * type_size
        if offset % alignment:
            raise _format_error(path, f"tensor {name!r} starts at offset {offset}, not a multiple of the "
                                      f"alignment {alignment}")
        if offset > size - data_start or n_bytes > size - data_start - offset:
            raise _format_error(path, f"tensor {name!r} extends past the end of the file (truncated?)")
        start = data_start + offset
        shape = tuple(reversed(dims))
        typed = _TYPED.get(qtype.name)
        if typed is not None:
            view = data[start: start + n_bytes].view(np.dtype(h.order + typed)).reshape(shape)
        else:
            view = data[start: start + n_bytes].reshape(*shape[:-1], row // block * type_size)
        tensors.append(_GGUFTensor(name, qtype, dims, n_elements, n_bytes, start, view))
    return _GGUFFile(fields, tensors, h.order == ">")


def _read_gguf(path: str | os.PathLike) -> _GGUFFile:
    """The parsed header of a regular GGUF file of bounded size (its tensors memory-mapped, read-only);
    `TritiumFormatError` for anything else."""
    from .native import _open

    with _open(path) as f:  # regular files only, opened without blocking on a FIFO or device
        size = os.fstat(f.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise _format_error(path, f"{size} bytes exceeds MAX_FILE_BYTES ({MAX_FILE_BYTES})")
        if size < 24:
            raise _format_error(path, "file is too short to be a GGUF file")
        if f.read(4) != b"GGUF":
            raise _format_error(path, "not a GGUF file (no GGUF magic)")
        try:
            buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise _format_error(path, f"cannot read ({e})") from None
    return _parse_gguf(path, buf, size)


def _field(path: str | os.PathLike, reader: _GGUFFile, key: str, kind: type, default: Any = None) -> Any:
    """The value of metadata ``key`` as ``kind`` (int, float, bool, str or list), or ``default`` when absent."""
    if key not in reader.fields:
        if default is None:
            raise _format_error(path, f"metadata {key!r} is missing")
        return default
    value = reader.fields[key]
    if value is _MALFORMED:
        raise _format_error(path, f"metadata {key!r} is malformed")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = isinstance(value, list) if kind is list else isinstance(value, bool) if kind is bool else (
        isinstance(value, str) if kind is str else number and (kind is float or float(value).is_integer()))
    if not ok:
        raise _format_error(path, f"metadata {key!r} is not a {kind.__name__}")
    return kind(value) if kind in (int, float) else value


def _dim(path: str | os.PathLike, reader: _GGUFFile, key: str, hi: int = MAX_WIDTH, default: Any = None) -> int:
    v = _field(path, reader, key, int, default)
    if not 1 <= v <= hi:
        raise _format_error(path, f"metadata {key!r} = {v} lies outside [1, {hi}]")
    return v


def _tq_ternary(path: str | os.PathLike, name: str, t: _GGUFTensor, n: int, k: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """int8 codes ``(n, k)`` and float32 row scales ``(n,)`` of a TQ2_0/TQ1_0 tensor (a row without a non-zero
    weight gets scale 1; a negative block scale negates its codes)."""
    from .native import _printable

    packed = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(n, -1))
    where = _printable(f"{os.fspath(path)}: tensor {name!r}")
    q, d = codecs.unpack_scaled(_TQ_CODECS[t.tensor_type.name], packed, n, k, where=where)
    if not torch.isfinite(d).all():  # llama.cpp multiplies every block by its scale, all-zero blocks too
        raise _format_error(path, f"tensor {name!r} has a non-finite block scale")
    blocks = q.reshape(n, k // BLOCK, BLOCK)
    live = blocks.ne(0).any(dim=-1) & d.ne(0)  # blocks with a non-zero weight; the scale of the others is free
    blocks = blocks * torch.where(live, torch.sign(d), 0).to(torch.int8).unsqueeze(-1)
    d = d.abs()
    first = torch.where(live.any(dim=1), d.gather(1, live.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1), 1.0)
    if (live & d.ne(first.unsqueeze(1))).any():
        raise _format_error(path, f"tensor {name!r}: block scales vary within a row; tritium stores one scale "
                                  "per row")
    return blocks.reshape(n, k), first


def _scaled(path: str | os.PathLike, name: str, t: _GGUFTensor, q: torch.Tensor,
            scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and row scales of a layer whose output llama.cpp multiplies by the one-number tensor ``t``."""
    if t.tensor_type.name != "F32" or t.n_elements != 1:
        raise _format_error(path, f"tensor {name!r} is {t.tensor_type.name} {list(t.shape)}; a layer's scale is one "
                                  "F32 number")
    s = float(np.asarray(t.data).reshape(-1)[0])
    if not (math.isfinite(s) and s != 0):
        raise _format_error(path, f"tensor {name!r} is {s}, not a finite non-zero number")
    scaled = (scale * abs(s)).float()
    if not torch.isfinite(scaled).all() or (scaled == 0).any():
        raise _format_error(path, f"tensor {name!r} ({s}) takes a weight scale outside float32's range")
    return (q if s > 0 else -q), scaled


def _unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `_permute`: llama.cpp's rotary row order back to transformers'."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _config_from(path: str | os.PathLike, reader: Any) -> tuple[str, Any]:
    """The llama.cpp architecture and the transformers config a GGUF file describes."""
    import transformers

    arch = _field(path, reader, "general.architecture", str)
    if arch not in IMPORT_CLASSES:
        raise _format_error(path, f"architecture {arch!r} is not supported; supported: {', '.join(IMPORT_CLASSES)}")
    names = {t.name for t in reader.tensors}
    hidden = _dim(path, reader, f"{arch}.embedding_length")
    heads = _dim(path, reader, f"{arch}.attention.head_count", 2**16)
    kv_heads = _dim(path, reader, f"{arch}.attention.head_count_kv", 2**16, heads)
    head_dim = _dim(path, reader, f"{arch}.attention.key_length", MAX_WIDTH, max(hidden // heads, 1))
    value_dim = _dim(path, reader, f"{arch}.attention.value_length", MAX_WIDTH, head_dim)
    if value_dim != head_dim or heads % kv_heads or head_dim % 2:
        raise _format_error(path, f"attention shape not supported: {heads} heads, {kv_heads} kv heads, key length "
                                  f"{head_dim}, value length {value_dim}")
    if arch == "bitnet" and heads * head_dim != hidden:
        raise _format_error(path, f"llama.cpp's bitnet graph needs heads x key length = embedding length, got "
                                  f"{heads} x {head_dim} != {hidden}")
    act = _field(path, reader, "bitnet.hidden_activation", str, "silu") if arch == "bitnet" else "silu"
    if act != "silu":
        raise _format_error(path, f"bitnet.hidden_activation {act!r} is not supported (llama.cpp's bitnet graph "
                                  "computes silu; versions that read this key differ on other values)")
    if arch in ("llama", "bitnet"):
        rope_dim = _dim(path, reader, f"{arch}.rope.dimension_count", MAX_WIDTH, head_dim)
        if rope_dim != head_dim:
            raise _format_error(path, f"partial rotary embeddings (rope dimension {rope_dim} of {head_dim}) are "
                                      "not supported")
    if _field(path, reader, f"{arch}.rope.scaling.type", str, "none") not in ("none", "linear") or \
            f"{arch}.rope.scaling.factor" in reader.fields:
        raise _format_error(path, "rope scaling is not supported")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise _format_error(path, "tensor 'token_embd.weight' is missing")
    vocab = _dim(path, reader, f"{arch}.vocab_size", 2**24, int(embed.shape[-1]) if len(embed.shape) == 2 else 1)
    theta = _field(path, reader, f"{arch}.rope.freq_base", float, 10000.0)
    eps = _field(path, reader, f"{arch}.attention.layer_norm_rms_epsilon", float)
    if not (np.isfinite(theta) and theta > 0 and np.isfinite(eps) and eps > 0):
        raise _format_error(path, f"rope theta {theta} or rms eps {eps} is not a positive number")
    kw: dict[str, Any] = dict(
        hidden_size=hidden, num_hidden_layers=_dim(path, reader, f"{arch}.block_count", MAX_LAYERS),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=_dim(path, reader, f"{arch}.feed_forward_length"), vocab_size=vocab,
        max_position_embeddings=_dim(path, reader, f"{arch}.context_length", 2**24),
        rope_theta=theta, rms_norm_eps=eps, hidden_act="silu",
        tie_word_embeddings="output.weight" not in names or arch == "bitnet",
    )
    for key in ("bos", "eos", "pad"):
        value = _field(path, reader, f"tokenizer.ggml.{key}_token_id", int, -1)
        kw[f"{key}_token_id"] = value if 0 <= value < vocab else None
    if arch == "llama":
        kw["attention_bias"] = "blk.0.attn_q.bias" in names
        kw["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    elif arch == "qwen2":
        kw["use_sliding_window"] = False
    else:
        kw["attention_bias"] = False
        del kw["head_dim"]  # heads x head_dim = hidden, checked above
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "bitnet": transformers.BitNetConfig}[arch]
    try:
        config = config_class(**kw)
    except Exception as e:  # any check of transformers' own config
        reason = " ".join(str(e).split())[:200]
        raise _format_error(path, f"the model shape is not a valid {arch} config ({reason})") from None
    config._name_or_path = _field(path, reader, "general.name", str, "")
    return arch, config


def _tokenizer_from(path: str | os.PathLike, reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` for a ``gpt2`` vocabulary (byte-level BPE), else None."""
    if _field(path, reader, "tokenizer.ggml.model", str, "none") != "gpt2":
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    gguf = _gguf()
    tokens = _field(path, reader, "tokenizer.ggml.tokens", list)
    types = _field(path, reader, "tokenizer.ggml.token_type", list, [])
    merges = _field(path, reader, "tokenizer.ggml.merges", list, [])
    if types and len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens + merges):
        raise _format_error(path, "the gpt2 vocabulary is malformed (tokens, types or merges)")
    vocab, added = {}, []
    for i, tok in enumerate(tokens):
        kind = types[i] if types else int(gguf.TokenType.NORMAL)
        if kind == gguf.TokenType.UNUSED:
            continue
        if tok in vocab:
            raise _format_error(path, f"the gpt2 vocabulary has token {tok!r} twice")
        vocab[tok] = i
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            added.append((i, AddedToken(tok, special=kind == gguf.TokenType.CONTROL, normalized=False)))
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise _format_error(path, "the gpt2 vocabulary has a malformed merge")
    bos = _field(path, reader, "tokenizer.ggml.bos_token_id", int, -1)
    add_bos = _field(path, reader, "tokenizer.ggml.add_bos_token", bool, False) and 0 <= bos < len(tokens) \
        and vocab.get(tokens[bos]) == bos
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        for _, token in sorted(added, key=lambda x: x[0]):
            tok.add_special_tokens([token]) if token.special else tok.add_tokens([token])
        if add_bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in tokenizers derives from BaseException
        raise _format_error(path, f"the gpt2 vocabulary is malformed ({' '.join(str(e).split())[:200]})") from None
    return tok


def import_gguf(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a GGUF file in TQ2_0 or TQ1_0.

    The inverse of `export_gguf` for llama.cpp's ``llama``, ``qwen2`` and ``bitnet`` graphs: a ``llama`` file
    becomes a transformers ``LlamaForCausalLM`` (a Mistral export too), a ``qwen2`` file a
    ``Qwen2ForCausalLM``, a ``bitnet`` file a ``BitNetForCausalLM`` (SiLU, head tied to the embedding; a file
    whose ``bitnet.hidden_activation`` is not ``silu`` is refused). Linear layers in TQ2_0/TQ1_0 become frozen
    `TernaryLinear` (``norm=None``) whose codes and fp16 block scales are the file's (one scale per tensor
    when all rows share it, else per row; query/key rows back in transformers' rotary order; a ``bitnet``
    layer's optional ``.scale`` tensor, one F32 number, multiplies its scale); the embedding, norms, biases and
    head are float32. A ``gpt2`` vocabulary
    comes back as a byte-level BPE tokenizer, any other as None. The file is untrusted: its header is read
    by a bounded reader (every count, length, shape and offset checked against the file's size and the
    ``MAX_GGUF_*`` bounds before anything is allocated, so that time and memory stay proportional to the
    file), and anything malformed or unsupported (another architecture or tensor type, a big-endian file,
    non-finite block scales or block scales that vary within a row, missing, extra or misshapen tensors)
    raises `tritium.formats.TritiumFormatError` with one line saying why; ImportError without the ``gguf``
    package.
    """
    from ..models.transformers import from_config

    gguf = _gguf()
    reader = _read_gguf(path)
    if reader.big_endian:
        raise _format_error(path, "big-endian GGUF files are not supported")
    arch, config = _config_from(path, reader)
    gtensors: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name in gtensors:
            raise _format_error(path, f"tensor {t.name!r} appears twice")
        gtensors[t.name] = t
    n_layers = config.num_hidden_layers
    if n_layers > len(gtensors):
        raise _format_error(path, f"{n_layers} blocks but only {len(gtensors)} tensors")
    try:
        model = from_config(IMPORT_CLASSES[arch], config.to_dict())
    except ValueError as e:
        raise _format_error(path, str(e)) from None
    names = _tensor_names(arch, n_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    used: set[str] = set()

    def tensor(name: str, shape: tuple[int, ...]) -> Any:
        gname = names(name)
        t = gtensors.get(gname) if gname else None
        if t is None:
            raise _format_error(path, f"tensor {gname or name!r} is missing")
        got = tuple(int(x) for x in reversed(list(t.shape)))
        if got != shape:
            raise _format_error(path, f"tensor {gname!r} has shape {list(got)}, the model needs {list(shape)}")
        used.add(gname)
        return gname, t

    def unpermuted(name: str, t: torch.Tensor) -> torch.Tensor:
        if arch == "llama" and ".q_proj." in name:
            return _unpermute(t, heads)
        if arch == "llama" and ".k_proj." in name:
            return _unpermute(t, kv_heads)
        return t

    def floats(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gname, t = tensor(name, shape)
        if t.tensor_type.name not in _FLOAT_NAMES:
            raise _format_error(path, f"tensor {gname!r} is {t.tensor_type.name}; tritium imports F32, F16 or BF16 "
                                      "here")
        try:
            data = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
            data = data.reshape(shape).copy()
        except ValueError:
            raise _format_error(path, f"tensor {gname!r} does not hold {list(shape)} values") from None
        return unpermuted(name, torch.from_numpy(data))

    head = model.get_output_embeddings()
    for mname, module in list(model.named_modules()):
        leaf = mname.rsplit(".", 1)[-1]
        is_head = module is head and not config.tie_word_embeddings
        if module is head and config.tie_word_embeddings:
            continue
        if isinstance(module, nn.Linear) and (leaf in _LINEARS or is_head):
            n, k = module.out_features, module.in_features
            gname, t = tensor(mname + ".weight", (n, k))
            qname = t.tensor_type.name
            if qname not in _TQ_CODECS:
                if is_head and qname in _FLOAT_NAMES:
                    module.weight = nn.Parameter(floats(mname + ".weight", (n, k)))
                    continue
                raise _format_error(path, f"tensor {gname!r} is {qname}; tritium imports linear layers in TQ2_0 or "
                                          "TQ1_0")
            if k % BLOCK:
                raise _format_error(path, f"tensor {gname!r} has {k} columns, not a multiple of {BLOCK}")
            q, scale = _tq_ternary(path, gname, t, n, k)
            q, scale = unpermuted(mname + ".", q), unpermuted(mname + ".", scale)
            sname = gname.removesuffix(".weight") + ".scale"
            if arch == "bitnet" and sname in gtensors:  # llama.cpp multiplies the layer's output by it
                q, scale = _scaled(path, sname, gtensors[sname], q, scale)
                used.add(sname)
            live = scale[(q != 0).any(dim=1)]
            per_channel = bool(live.numel()) and not bool((live == live[0]).all())
            layer = TernaryLinear(k, n, module.bias is not None, norm=None, per_channel=per_channel)
            layer.weight_packed = kernels.pack(q).contiguous()
            layer.weight_scale = scale.contiguous() if per_channel else (live[:1] if live.numel() else
                                                                          torch.ones(1)).clone()
            if module.bias is not None:
                layer.bias = floats(mname + ".bias", (n,)).contiguous()
            parent = model.get_submodule(mname.rpartition(".")[0])
            setattr(parent, leaf, layer)
        else:
            for pname, p in list(module.named_parameters(recurse=False)):
                full = f"{mname}.{pname}" if mname else pname
                module._parameters[pname] = nn.Parameter(floats(full, tuple(p.shape)), requires_grad=p.requires_grad)
    if config.tie_word_embeddings:
        head.weight = model.get_input_embeddings().weight
    model.config._name_or_path = config._name_or_path
    extra = sorted(set(gtensors) - used)
    if extra:
        raise _format_error(path, f"tensor {extra[0]!r} has no place in the {arch} model")
    for mname, module in list(model.named_modules()):  # rotary tables are computed, not stored
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            parent, _, leaf = mname.rpartition(".")
            setattr(model.get_submodule(parent), leaf, type(module)(config=model.config))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise _format_error(path, f"no value for {name!r}")
    tokenizer = _tokenizer_from(path, reader)
    return model.eval(), tokenizer


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic (nothing else is checked)."""
    from .native import TritiumFormatError, _open

    try:
        with _open(path) as f:
            return f.read(4) == b"GGUF"
    except (TritiumFormatError, OSError):
        return False
