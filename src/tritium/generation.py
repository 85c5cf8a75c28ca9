"""Text generation with a saved model: `load_pretrained`, `generate` and ``tritium generate FILE``.

`load_pretrained` rebuilds the transformers model a file was saved from out of its stored ``model_class``
and ``model_config`` (only the classes of `tritium.models.transformers.MODEL_CLASSES`, looked up by name in
``transformers``), on the meta device, fills it with `tritium.load` and reads the stored tokenizer, if any.
`generate` continues a prompt greedily (by default) or by sampling with a temperature and top-p, exactly as
transformers' own ``generate`` does, and hands each new token to a callback as it is produced. For decoder-only
models it runs its own loop on the model's forward with a `prefix_cache` and groups the frozen layers that read
the same input (`tritium.nn.ternary.share_inputs`); with ``compile=True`` the one-token forward is compiled
(`decode_step`), with ``compile="aot"`` compiled ahead of time (`tritium.aot`). Tokens and logits stay
bit-identical to transformers' ``generate`` on the eager model. The
command streams the text (or, for a prompt given as token ids, the ids) to stdout and reports prefill and
decode tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .args import UsageError, _ranged, comma_list, existing_file, nonnegative_float, nonnegative_int
from .args import positive_int as _positive_int
from .formats.native import PathLike, TritiumFormatError, _printable, load, load_tokenizer, read_header

top_p_value = _ranged(float, lambda x: 0 < x <= 1, "a number > 0 and <= 1", "A number in (0, 1].")


class TooLong(ValueError):
    """The prompt plus the tokens to generate exceed the positions the model handles."""


def token_ids(value: object) -> list[int]:
    """A non-empty comma list of token ids (integers >= 0)."""
    try:
        return [nonnegative_int(x) for x in comma_list(value).split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a comma list of token ids (integers >= 0), got {value!r}") \
            from None


@dataclass
class Generation:
    """What `generate` produced.

    Attributes:
        ids: the generated token ids (the prompt excluded; an end-of-sequence token included).
        text: their decoded text (special tokens skipped), or None without a tokenizer.
        prompt_tokens: the prompt's length in tokens.
        prefill_s: seconds from the start of generation to the first new token (the prompt's forward pass).
        decode_s: seconds for the remaining ``len(ids) - 1`` tokens.
        compile_s: seconds spent compiling the one-token forward before generation (``compile=True``), else 0.
    """

    ids: list[int]
    text: str | None
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first one (nan with fewer than two tokens)."""
        return (len(self.ids) - 1) / self.decode_s if len(self.ids) > 1 and self.decode_s > 0 else math.nan


def load_pretrained(path: PathLike, model: nn.Module | None = None) -> tuple[nn.Module, object | None]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a file written by `tritium.save`, or from a
    llama.cpp GGUF file with TQ2_0/TQ1_0 linear layers (`tritium.formats.gguf.import_gguf`).

    Without ``model`` the architecture is rebuilt from the transformers class and config the file stores;
    a file without them (saved from a model that has no transformers config) raises `TritiumFormatError`
    asking for ``model``, a skeleton of the saved architecture (see `tritium.load`). A malformed file,
    config or tokenizer raises `TritiumFormatError`.
    """
    from .formats.gguf import import_gguf, is_gguf
    from .models.transformers import from_config

    if model is None and is_gguf(path):  # a llama.cpp file: see tritium.formats.gguf.import_gguf
        return import_gguf(path)
    header = read_header(path)
    if model is None:
        model_class, config = header.metadata.get("model_class"), header.model_config
        if model_class is None or config is None:
            raise TritiumFormatError(
                f"{os.fspath(path)}: the file stores no transformers model class and config, so its architecture "
                "cannot be rebuilt; pass a skeleton of the saved model: load_pretrained(path, model=skeleton) "
                "or tritium.load(path, model=skeleton)")
        try:
            model = from_config(model_class, config, max_blocks=len(header.tensors))
        except ValueError as e:
            raise TritiumFormatError(f"{os.fspath(path)}: {e}") from None
    tokenizer = load_tokenizer(path, header)
    return load(path, model=model), tokenizer


class _Streamer:
    """The transformers streamer protocol (``put(ids)``, ``end()``): records the time of each new token and
    hands it, with the text it completes, to ``on_token``."""

    def __init__(self, tokenizer: object | None, on_token: Callable[[int, str], None] | None):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.ids: list[int] = []
        self.start: float | None = None
        self.first: float | None = None
        self.shown = 0  # characters of the decoded text handed out so far

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.start is None:  # the prompt
            self.start = now
            return
        if self.first is None:
            self.first = now
        for tok in value.reshape(-1).tolist():
            self.ids.append(int(tok))
            piece = ""
            if self.tokenizer is not None:
                text = self._text()
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    piece, self.shown = text[self.shown:], len(text)
            if self.on_token is not None:
                self.on_token(int(tok), piece)

    def end(self) -> None:
        if self.tokenizer is not None and self.on_token is not None and self.ids:
            text = self._text()
            if len(text) > self.shown:
                self.on_token(-1, text[self.shown:])
                self.shown = len(text)


def max_positions(model: nn.Module) -> int | None:
    """The number of positions the model's config allows (prompt plus generated tokens), if it says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        n = getattr(config, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def encode(tokenizer: object, prompt: str, model: nn.Module | None = None) -> list[int]:
    """The token ids of ``prompt`` (with the tokenizer's special tokens); an empty prompt becomes the
    model's beginning-of-sequence token when it has one. ValueError if the tokenizer fails."""
    try:
        ids = list(tokenizer.encode(prompt).ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in tokenizers derives from BaseException
        raise ValueError(f"the tokenizer cannot encode the prompt ({' '.join(str(e).split())[:200]})") from None
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if not ids and isinstance(bos, int):
        ids = [bos]
    return ids


def prompt_ids(model: nn.Module, prompt: str | Sequence[int], tokenizer: object | None = None, *,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0) -> list[int]:
    """The token ids `generate` would start from; ValueError for any argument it would refuse."""
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise ValueError(f"{type(model).__name__} does not generate text")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; give token ids instead")
        ids = encode(tokenizer, prompt, model)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    vocab = model.get_input_embeddings().num_embeddings
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    limit = max_positions(model)
    if limit is not None and not getattr(model.config, "is_encoder_decoder", False) \
            and len(ids) + max_new_tokens > limit:
        raise TooLong(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                      f"{limit} positions")
    return ids


# ------------------------------------------------------------------------------------------- fast decoding


def prefix_cache_class() -> type:
    """The class of `prefix_cache` (a transformers ``Cache``; defined on first use, as transformers is imported
    lazily)."""
    global _PrefixCacheClass
    if _PrefixCacheClass is not None:
        return _PrefixCacheClass
    from transformers.cache_utils import Cache, DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's keys and values in buffers of ``max_len`` positions; ``update`` writes the new positions
        in place and returns views of the filled prefix, of exactly the shape `DynamicLayer` returns."""

        def __init__(self, max_len: int) -> None:
            super().__init__()
            self.max_len, self.length = max_len, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            # One position more than can be filled: the filled prefix is never the whole (contiguous) buffer,
            # so compiled code sees one kind of view at every length.
            b, h, _, dk = key_states.shape
            self.device = key_states.device
            self.key_buffer = key_states.new_zeros((b, h, self.max_len + 1, dk))
            self.value_buffer = value_states.new_zeros((b, h, self.max_len + 1, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.length
            end = start + key_states.shape[-2]
            if end > self.max_len:
                raise ValueError(f"PrefixCache holds {self.max_len} positions, {end} needed")
            self.key_buffer[:, :, start:end].copy_(key_states)
            self.value_buffer[:, :, start:end].copy_(value_states)
            self.length = end
            return self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.max_len

        def reset(self) -> None:
            self.length = 0

    class PrefixCache(Cache):
        """A transformers KV cache in preallocated buffers of ``max_len`` positions for ``num_layers`` layers.

        Attention sees exactly the filled prefix, as with ``DynamicCache`` (so the outputs are bit-identical to
        it), without ``DynamicCache``'s copy of the whole cache at every token, and with a fixed memory layout
        that compiled code can reuse; the filled length is a Python int per layer.
        """

        def __init__(self, num_layers: int, max_len: int) -> None:
            super().__init__(layers=[PrefixLayer(max_len) for _ in range(num_layers)])

    _PrefixCacheClass = PrefixCache
    return PrefixCache


_PrefixCacheClass: type | None = None


def prefix_cache(num_layers: int, max_len: int):
    """A transformers KV cache of ``num_layers`` layers in preallocated buffers of ``max_len`` positions whose
    attention sees exactly the filled prefix, as ``DynamicCache``'s does: outputs are bit-identical to it (see
    `prefix_cache_class`)."""
    return prefix_cache_class()(num_layers, max_len)


# Generation-config fields that add logits processors or stopping rules, with their neutral values: the fast
# loop reproduces temperature and top-p only, and leaves anything else to transformers' generate.
_NEUTRAL = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1.0), "top_h": (None,), "min_p": (None,),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "watermarking_config": (None,),
    "renormalize_logits": (None, False), "max_time": (None,), "stop_strings": (None,), "forced_decoder_ids": (None,),
    "prompt_lookup_num_tokens": (None,), "num_return_sequences": (None, 1), "cache_implementation": (None,),
}


def _cache_key(model: nn.Module) -> str | None:
    """The forward's keyword for the KV cache (``cache`` since transformers 5), or None without one."""
    import inspect

    params = inspect.signature(model.forward).parameters
    key = next((k for k in ("cache", "past_key_values") if k in params), None)
    return key if key is not None and "logits_to_keep" in params else None


def fast_path(model: nn.Module) -> str | None:
    """None when `generate` can decode ``model`` with its own loop (a decoder-only transformers model whose layers
    all attend to the full context, with a plain generation config), else why not."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    if _cache_key(model) is None:
        return "the forward takes no cache and logits_to_keep"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return f"layer types {sorted(set(types))} (sliding-window or other attention)"
    if types is None and getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "sliding-window attention"
    gen = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL.items():
        if getattr(gen, name, None) not in neutral:
            return f"generation_config.{name}={getattr(gen, name)!r}"
    return None


def _num_layers(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_hidden_layers", None) or text.n_layer)


# ATen ops whose Inductor code is bit-identical to the eager ATen kernel for every input: single IEEE-rounded
# arithmetic per element (no fused multiply-add: Inductor compiles with -ffp-contract=off), comparisons,
# selection and data movement, and their in-place forms. Every other op (reductions such as sum, since a
# float32 mean is a sum and one division, `mean_as_sum`; transcendental functions such as exp, sin, cos, silu;
# matmuls, attention, the tritium kernels) runs as its eager ATen kernel inside the compiled graph, so compiled
# and eager forwards agree bit for bit.
@functools.cache
def exact_ops() -> frozenset:
    aten, prims = torch.ops.aten, torch.ops.prims
    return frozenset({
        aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
        aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.where.self, aten.clone.default, aten.copy.default,
        aten.copy_.default, aten._to_copy.default, prims.convert_element_type.default, aten.embedding.default,
        aten.expand.default, aten.permute.default, aten.slice.Tensor, aten.slice_scatter.default, aten.select.int,
        aten.select_scatter.default, aten.unsqueeze.default, aten.squeeze.dim, aten.view.default,
        aten.reshape.default, aten._unsafe_view.default, aten.cat.default, prims.iota.default, aten.full.default,
        aten.scalar_tensor.default, aten.arange.default, aten.arange.start, aten.arange.start_step, aten.eq.Tensor,
        aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar, aten.le.Tensor,
        aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.logical_not.default,
        aten.logical_and.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.alias.default,
        aten.t.default, aten.transpose.int, aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default,
        aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten.masked_fill.Scalar,
    })


@contextlib.contextmanager
def eager_lowerings(eager: frozenset):
    """While active, Inductor calls every op in ``eager`` as its eager ATen kernel (an explicit fallback) instead
    of generating code for it. The lowering table is Inductor's own, so it is restored on exit."""
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    # Ops without a lowering are called as eager kernels (Inductor's implicit fallback).
    saved = {op: lowering.lowerings.pop(op) for op in eager if op in lowering.lowerings}
    realized, fallbacks = set(lowering.needs_realized_inputs), set(lowering.fallbacks)
    for op in eager:  # explicit fallbacks: Inductor's implicit ones refuse ops that have a decomposition if $CI
        constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        lowering.make_fallback(op, layout_constraint=constraint, warn=False, override_decomp=True)
    try:
        yield
    finally:
        for op in eager:
            lowering.lowerings.pop(op, None)
        lowering.lowerings.update(saved)
        for current, before in ((lowering.needs_realized_inputs, realized), (lowering.fallbacks, fallbacks)):
            for op in set(current) - before:
                current.discard(op)


def eager_ops(graph: torch.fx.Graph, exact: frozenset) -> frozenset:
    """The ops of ``graph`` that must run as eager kernels: all but ``exact`` and ``pow(x, 2)`` when every power
    in the graph is a square (which Inductor and ATen both compute as ``x * x``)."""
    square = torch.ops.aten.pow.Tensor_Scalar
    nodes = [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    squares = all(n.args[1] == 2 for n in nodes if n.target is square)
    return frozenset(n.target for n in nodes if n.target not in exact and not (n.target is square and squares))


def exact_decompositions(exact: frozenset) -> dict:
    """Inductor's decompositions of the ``exact`` ops, and `mean_as_sum`."""
    from torch._inductor.decomposition import select_decomp_table

    table = {op: fn for op, fn in select_decomp_table().items() if op in exact}
    table[torch.ops.aten.mean.dim] = mean_as_sum
    return table


def mean_as_sum(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None, sum_op=None):
    """``mean.dim`` of a float32 tensor as ATen's CPU kernel computes it: the eager sum, then a division by the
    number of elements reduced (a single IEEE division, which compiled code may fuse into the next kernel; the
    sum stays an eager op). NotImplemented (no decomposition) for other dtypes and devices."""
    if x.dtype != torch.float32 or dtype is not None or x.device.type != "cpu" or not dim:
        return NotImplemented
    dims = [d % x.dim() for d in dim]
    count = math.prod(x.shape[d] for d in dims)
    total = (sum_op or torch.ops.aten.sum.dim_IntList)(x, dims, keepdim)
    return torch.ops.aten.div.Tensor(total, count)


# Inductor options of exact compilation: no pattern-matcher rewrites, no shape or alignment asserts, and
# generated loops single-threaded below 65536 elements (decode sizes).
EXACT_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "pattern_matcher": False,
                 "cpp.min_chunk_size": 1 << 16}


def _exact_backend(gm, example_inputs):
    """``torch.compile`` backend: Inductor, generating code only for `exact_ops` (and for ``pow(x, 2)`` when
    every power in the graph is a square, which both compute as ``x * x``); every other op is called as its
    eager ATen kernel. A graph pass checks the result and fails the compilation if any other op appears."""
    from torch._inductor import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass

    exact = exact_ops()

    class Check(CustomGraphPass):
        """Fails the compilation when a graph pass has introduced an op that is neither exact nor eager."""

        allowed: frozenset = frozenset()

        def __call__(self, graph) -> None:
            for node in graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                        and node.target not in self.allowed:
                    raise RuntimeError(f"tritium exact compile: a graph pass introduced {node.target}")

        def uuid(self) -> str:  # part of the compile caches' keys: these graphs are compiled apart from others
            return "tritium-exact-ops-3:" + ",".join(sorted(map(str, exact)))

    check = Check()

    def inner(graph_module, inputs, **kwargs):
        eager = eager_ops(graph_module.graph, exact)
        check.allowed = exact | eager | {torch.ops.aten.pow.Tensor_Scalar}
        with eager_lowerings(eager):
            return compile_fx.compile_fx_inner(graph_module, inputs, **kwargs)

    options = {**EXACT_OPTIONS, "post_grad_custom_post_pass": check}
    return compile_fx.compile_fx(gm, example_inputs, inner_compile=inner, decompositions=exact_decompositions(exact),
                                 config_patches=options)


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_step(model: nn.Module, compile: bool = False) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """``step(ids, cache) -> logits``: ``model``'s forward on ``ids`` ``(1, n)`` with ``cache``, the last position's
    logits ``(1, 1, vocab)``.

    With ``compile=True`` it is ``torch.compile``'d once per model (fullgraph, dynamic shapes: one graph serves
    every cache length, without recompiling per token) with a backend under which every op that Inductor
    could compute differently from eager (reductions, transcendental functions, matmuls, attention) runs as its
    eager ATen kernel: its logits are bit-identical to the eager forward's. The compiled step does not guard on
    the model's modules: changing their structure or attributes afterwards (not their tensors' values) needs a
    new model object.
    """
    key = _cache_key(model)
    ref = weakref.ref(model)

    def step(ids: torch.Tensor, cache: object) -> torch.Tensor:
        return ref()(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits

    if not compile:
        return step
    compiled = _STEPS.get(model)
    if compiled is None:
        from . import kernels

        kernels.load_cpp_op()  # frozen layers then reach the kernels without re-entering Python
        # No guards on the model's modules (their attributes are read once, when compiling): the decode loop
        # evaluates fewer guards per token. Later changes to the model's modules are not seen by this step.
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.7
        options = {"guard_filter_fn": skip} if skip is not None else None
        compiled = _STEPS[model] = torch.compile(step, backend=_exact_backend, fullgraph=True, dynamic=True,
                                                 options=options)
    return compiled


_SHARED: weakref.WeakSet = weakref.WeakSet()


def _share_inputs(model: nn.Module) -> None:
    """Group the frozen layers of ``model`` that read the same input, once per model (one forward on a token)."""
    from .nn.ternary import TernaryLinear, share_inputs

    if model in _SHARED or not any(isinstance(m, TernaryLinear) for m in model.modules()):
        return
    _SHARED.add(model)
    device = model.get_input_embeddings().weight.device
    try:
        share_inputs(model, input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    except Exception:  # a forward that needs more than token ids: its layers keep computing on their own
        pass


def _logits_processors(temperature: float, top_p: float) -> list:
    """transformers' warpers for sampling at ``temperature`` with ``top_p``, as its ``generate`` builds them."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return processors


def _eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _decode(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
            streamer: _Streamer, step: Callable) -> None:
    """Prefill ``ids`` eagerly, then decode with ``step`` (see `decode_step`), choosing each token as
    transformers' ``generate`` does (argmax, or the warpers, softmax and ``torch.multinomial``)."""
    device = model.get_input_embeddings().weight.device
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    eos, processors = _eos_ids(model), _logits_processors(temperature, top_p) if temperature > 0 else None
    compiled = step is _STEPS.get(model)
    seen = prompt
    streamer.put(prompt.cpu())
    if isinstance(step, _aot().AotDecoder):
        step.reset()
        logits, advance = step.prefill(prompt), step.step
    else:
        cache = prefix_cache(_num_layers(model), len(ids) + max_new_tokens)
        logits = decode_step(model)(prompt, cache)

        def advance(token: torch.Tensor) -> torch.Tensor:
            return step(token, cache)
    with contextlib.ExitStack() as stack:
        for i in range(max_new_tokens):
            scores = logits[:, -1].to(copy=True, dtype=torch.float32)
            if processors is None:
                token = torch.argmax(scores, dim=-1)
            else:
                for proc in processors:
                    scores = proc(seen, scores)
                token = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            streamer.put(token.cpu())
            if int(token) in eos or i == max_new_tokens - 1:
                break
            if processors is not None:
                seen = torch.cat([seen, token[:, None]], dim=-1)
            if compiled and i == 2:
                # The first two compiled steps ran with their guards (a cache length of 1 has a graph of its
                # own); from here on only the cache length changes, so the guards are skipped.
                stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
            logits = advance(token[:, None])


def _aot():
    from . import aot

    return aot


_AOT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _aot_decoder(model: nn.Module, positions: int):
    """The model's `tritium.aot.AotDecoder` with room for ``positions`` (built, or rebuilt larger, on demand: its
    cache is rounded up to a multiple of 128 positions, within the model's limit, so that it is rebuilt rarely)."""
    decoder = _AOT.get(model)
    if decoder is None or decoder.max_len < positions:
        size = -(-positions // 128) * 128
        limit = max_positions(model)
        _AOT[model] = decoder = _aot().AotDecoder(model, min(size, limit) if limit else size)
    return decoder


@torch.inference_mode()
def _warm_up(model: nn.Module, step: Callable) -> None:
    """Compile ``step`` on a scratch cache: a two-token prefill and two decode steps (one graph for every cache
    length from 2 on)."""
    cache = prefix_cache(_num_layers(model), 4)
    device = model.get_input_embeddings().weight.device
    decode_step(model)(torch.zeros((1, 2), dtype=torch.long, device=device), cache)
    for _ in range(2):
        step(torch.zeros((1, 1), dtype=torch.long, device=device), cache)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt: str | Sequence[int],
    tokenizer: object | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[int, str], None] | None = None,
    compile: bool | str = False,
) -> Generation:
    """Continue ``prompt`` (text, which needs ``tokenizer``, or token ids) as transformers' ``generate`` does.

    ``temperature=0`` (the default) decodes greedily, exactly as ``model.generate(..., do_sample=False)``;
    ``temperature > 0`` samples from the softmax at that temperature, restricted to the smallest set of
    tokens whose probability reaches ``top_p``. ``seed`` makes sampling reproducible (the global torch
    random state is left as it was). Generation stops after ``max_new_tokens`` tokens or at the model's
    end-of-sequence token. ``on_token(id, text)`` is called for every new token as soon as it exists, with
    the text it completes (``""`` while a character is incomplete, or without a tokenizer), and once more
    with id -1 for text still held back at the end. Raises ValueError for bad arguments.

    Decoder-only models (see `fast_path`) are decoded by a loop on their forward with a `prefix_cache`, their
    frozen layers that read the same input grouped (`tritium.nn.ternary.share_inputs`, once per model);
    ``compile=True`` (or ``"jit"``) compiles the one-token forward first with torch.compile (`decode_step`; the
    time is ``compile_s``); ``compile="aot"`` compiles it ahead of time with AOTInductor
    (`tritium.aot.AotDecoder`, kept per model and reused; faster per token, as exact). Tokens, and with a seed
    sampled tokens, are the same as ``model.generate``'s; other models run ``model.generate`` (``compile`` is
    then ignored).
    """
    if compile not in (False, True, "jit", "aot"):
        raise ValueError(f"compile must be False, True, 'jit' or 'aot', got {compile!r}")
    ids = prompt_ids(model, prompt, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p)
    streamer = _Streamer(tokenizer, on_token)
    compile_s = 0.0
    if fast_path(model) is None:
        _share_inputs(model)
        t0 = time.perf_counter()
        try:
            if compile == "aot":
                step = _aot_decoder(model, len(ids) + max_new_tokens)
            else:
                step = decode_step(model, bool(compile))
                if compile:
                    _warm_up(model, step)
        except Exception as e:  # a model the compiler cannot take: decode eagerly instead
            warnings.warn(f"tritium.generate: compiling the forward failed ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}); decoding eagerly", stacklevel=2)
            step = decode_step(model)
            if compile != "aot":  # not again for this model
                _STEPS[model] = step
        if compile:
            compile_s = time.perf_counter() - t0
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            _decode(model, ids, max_new_tokens, temperature, top_p, streamer, step)
        streamer.end()
    else:
        _hf_generate(model, ids, max_new_tokens, temperature, top_p, seed, streamer)
    done = time.perf_counter()
    first = streamer.first if streamer.first is not None else done
    start = streamer.start if streamer.start is not None else first
    text = streamer._text() if tokenizer is not None else None
    return Generation(streamer.ids, text, len(ids), first - start, done - first, compile_s)


def _hf_generate(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None, streamer: _Streamer) -> None:
    """transformers' ``model.generate`` with the same choice of tokens, streaming into ``streamer``."""
    config = model.generation_config
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    kwargs: dict = {"max_new_tokens": max_new_tokens, "min_new_tokens": 0, "num_beams": 1, "pad_token_id": pad}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kwargs.update(do_sample=False)
    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)


# -------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=existing_file, help="a file written by tritium.save from a transformers model")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt (needs a tokenizer stored in FILE)")
    prompt.add_argument("--ids", metavar="ID,ID,...", type=token_ids,
                        help="the prompt as token ids; the generated ids are printed")
    parser.add_argument("--max-new-tokens", metavar="N", type=_positive_int, default=64,
                        help="tokens to generate at most (default 64; fewer at an end-of-sequence token)")
    parser.add_argument("--temperature", metavar="T", type=nonnegative_float, default=0.0,
                        help="0 (default): greedy; > 0: sample at this temperature")
    parser.add_argument("--top-p", metavar="P", type=top_p_value, default=None,
                        help="sample from the smallest set of tokens with this total probability (needs "
                             "--temperature > 0; default 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=None, help="seed for sampling")
    parser.add_argument("--compile", nargs="?", const="jit", default=False, choices=["jit", "aot"],
                        help="compile the one-token forward first: jit (the default when given without a value; "
                             "torch.compile) or aot (AOTInductor: faster per token); takes "
                             "seconds to a minute, then decodes with bit-identical logits")


def _writer(stream, escape: bool) -> Callable[[str], None]:
    def write(text: str) -> None:
        if escape:  # a terminal: show control characters instead of executing them
            text = "".join(c if c in "\n\t" or c.isprintable() else _printable(c) for c in text)
        stream.write(text)
        stream.flush()

    return write


def run(args: argparse.Namespace) -> int:
    """``tritium generate``: a bad file or argument is a usage error (one line, exit 2)."""
    if args.top_p is not None and args.temperature == 0:
        raise UsageError("--top-p: needs sampling (--temperature > 0)")
    try:
        model, tokenizer = load_pretrained(args.file)
    except TritiumFormatError as e:
        raise UsageError(_printable(e)) from None
    if not model.can_generate():
        raise UsageError(f"{_printable(args.file)}: a {type(model).__name__} does not generate text")
    if args.prompt is not None and tokenizer is None:
        raise UsageError(f"{_printable(args.file)} stores no tokenizer: give the prompt as token ids "
                         "(--ids 1,2,3), or save the model with tritium.save(model, path, tokenizer=...)")
    write = _writer(sys.stdout, sys.stdout.isatty())
    as_ids = args.prompt is None
    count = 0

    def on_token(tok: int, piece: str) -> None:
        nonlocal count
        if as_ids:
            if tok >= 0:
                write(("," if count else "") + str(tok))
                count += 1
        elif piece:
            write(piece)

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_p": 1.0 if args.top_p is None else args.top_p}
    try:
        ids = prompt_ids(model, args.ids if as_ids else args.prompt, tokenizer, **options)
    except TooLong as e:
        raise UsageError(f"--max-new-tokens: {_printable(e)}") from None
    except ValueError as e:
        raise UsageError(f"{'--ids' if as_ids else '--prompt'}: {_printable(e)}") from None
    try:
        g = generate(model, ids, tokenizer, seed=args.seed, on_token=on_token, compile=args.compile, **options)
        write("\n")
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    compiled = f"compile: {g.compile_s:.1f} s; " if args.compile else ""
    print(f"{compiled}prefill: {g.prompt_tokens} tokens in {1e3 * g.prefill_s:.1f} ms ({g.prefill_tokens_per_s:.1f} "
          f"tokens/s); decode: {max(len(g.ids) - 1, 0)} tokens in {g.decode_s:.3f} s ({g.decode_tokens_per_s:.1f} "
          "tokens/s)", file=sys.stderr)
    return 0
