"""Ahead-of-time compiled decoding: a transformers decoder's one-token forward on tritium's prefix KV cache,
compiled by AOTInductor into a shared library that Python calls once per token, with neither torch.compile's entry
(guards, input gathering) nor a Python wrapper around the generated kernels.

Exactness: the logits are bit-identical to the eager model's (with transformers' ``DynamicCache``, as
`tritium.generation.prefix_cache` is). As in `tritium.generation.decode_step`, Inductor generates code only for the
exact ops (`tritium.generation.exact_ops`) and runs every other op as its eager ATen kernel. The compiled code
calls those through C functions: AOTInductor's own C shims for most ATen ops, and tritium's
(``kernels/csrc/op.cpp``) for the frozen layers' op and for SiLU, cos, sin and sum, which have none (AOTInductor
would otherwise call them through its much slower generic proxy executor). One graph serves every cache length:
the filled length is a dynamic dimension of the export.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import generation, kernels

# C prototypes of tritium's C shims (kernels/csrc/op.cpp), as AOTInductor's generated code calls them.
_SHIMS = {
    "ternary_linears_native": "AOTITorchError aoti_torch_cpu_ternary_linears_native(AtenTensorHandle x, "
    "const AtenTensorHandle* packed, int64_t packed_len, const int64_t* n, int64_t n_len, int64_t k, "
    "const AtenTensorHandle* sw, int64_t sw_len, const AtenTensorHandle** bias, int64_t bias_len, "
    "const char** norm, ...)",
    **{f"eager_{name}": f"AOTITorchError aoti_torch_cpu_eager_{name}(AtenTensorHandle x, AtenTensorHandle* ret0)"
       for name in ("silu", "cos", "sin")},
    "eager_sum": "AOTITorchError aoti_torch_cpu_eager_sum(AtenTensorHandle x, const int64_t* dim, "
    "int64_t dim_len, int32_t keepdim, AtenTensorHandle* ret0)",
}


def _use_shims(graph: torch.fx.Graph) -> None:
    """Route SiLU, cos and sin to tritium's ops with C shims (the same ATen kernels), and drop export's metadata
    asserts (checks with no result, which AOTInductor would call through its proxy executor). Means become
    tritium's sum and a division (`generation.mean_as_sum`)."""
    aten, tritium = torch.ops.aten, torch.ops.tritium
    unary = {aten.silu.default: tritium.eager_silu.default, aten.cos.default: tritium.eager_cos.default,
             aten.sin.default: tritium.eager_sin.default}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
        elif node.target in unary:
            node.target = unary[node.target]


@contextlib.contextmanager
def _exact_compilation(graph: torch.fx.Graph):
    """Inductor as the exact backend configures it, for AOTInductor: exact ops and their decompositions only."""
    from torch._inductor import compile_fx

    exact = generation.exact_ops()
    decompositions = generation.exact_decompositions(exact)
    decompositions[torch.ops.aten.mean.dim] = functools.partial(generation.mean_as_sum,
                                                                sum_op=torch.ops.tritium.eager_sum.default)
    saved = compile_fx.select_decomp_table
    compile_fx.select_decomp_table = lambda: decompositions
    try:
        with generation.eager_lowerings(generation.eager_ops(graph, exact)):
            yield
    finally:
        compile_fx.select_decomp_table = saved


@contextlib.contextmanager
def _one_token_masks():
    """While exporting, let transformers skip the causal mask of a one-token query without padding, as it does
    eagerly (it never skips while exporting, since an exported graph could see longer queries; this one cannot)."""
    from transformers import masking_utils

    saved = masking_utils.is_torchdynamo_exporting
    masking_utils.is_torchdynamo_exporting = lambda: False
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = saved


class _Step(nn.Module):
    """The one-token forward on a prefix cache, as exported: the cache's buffers are this module's buffers (the
    compiled library writes the new position into them), and the filled length is the size of ``length``."""

    def __init__(self, model: nn.Module, cache) -> None:
        super().__init__()
        self.model, self.cache, self.key = model, cache, generation._cache_key(model)
        for i, layer in enumerate(cache.layers):
            self.register_buffer(f"key_{i}", layer.key_buffer, persistent=False)
            self.register_buffer(f"value_{i}", layer.value_buffer, persistent=False)

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        for layer in self.cache.layers:
            layer.length = length.shape[0]
        return self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self.key: self.cache}).logits


class AotDecoder:
    """Greedy-or-sampled decoding state for one decoder-only transformers model (see `generation.fast_path`):
    a `generation.prefix_cache` of ``max_len`` positions, an eager `prefill` into it and an AOTInductor-compiled
    `step`, bit-identical to the eager forward.

    Building it exports and compiles the forward (about 15-20 s for a 100M-parameter model; ``compile_s``). The
    compiled library uses the model's own tensors (weights and cache), so it adds no copy of them; new values
    written into those tensors are seen, but a model whose modules or tensors are replaced afterwards needs a
    new decoder. Raises RuntimeError when tritium's C++ op cannot be built (it holds the C shims) and ValueError
    for a model the fast loop does not take.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        why = generation.fast_path(model)
        if why is not None:
            raise ValueError(f"ahead-of-time decoding needs a decoder-only transformers model: {why}")
        device = model.get_input_embeddings().weight.device
        if device.type != "cpu":
            raise ValueError(f"ahead-of-time decoding runs on the CPU; the model is on {device}")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        if not kernels.load_cpp_op():
            raise RuntimeError("ahead-of-time decoding needs tritium's C++ op (see the warning above)")
        t0 = time.perf_counter()
        self.model, self.max_len, self.length = model, max_len, 0
        generation._share_inputs(model)
        self._cache = generation.prefix_cache(generation._num_layers(model), max_len)
        with torch.no_grad():  # allocates the cache's buffers (normal tensors: the library writes into them)
            generation.decode_step(model)(torch.zeros((1, 1), dtype=torch.long), self._cache)
        step = _Step(model, self._cache)
        length = torch.export.Dim("length", min=1, max=max_len - 1)
        example = (torch.zeros((1, 1), dtype=torch.long), torch.zeros(2))
        with torch.no_grad(), warnings.catch_warnings(), _one_token_masks():
            # the frozen layers that share an input hand results to each other through module state: traced
            warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
            program = torch.export.export(step, example, dynamic_shapes=(None, {0: length}), strict=True)
        _use_shims(program.graph_module.graph)
        program.graph_module.recompile()
        ops = torch.ops.tritium
        options = {**generation.EXACT_OPTIONS, "aot_inductor.package_constants_in_so": False,
                   "aot_inductor.custom_ops_to_c_shims": {getattr(ops, name).default: [proto]
                                                          for name, proto in _SHIMS.items()}}
        _export_shims()
        with tempfile.TemporaryDirectory(prefix="tritium-aot-") as tmp, _exact_compilation(program.graph):
            package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "step.pt2"),
                                                               inductor_configs=options)
            self._runner = torch._inductor.aoti_load_package(package)
        tensors = dict(step.named_parameters(remove_duplicate=False))
        tensors.update(step.named_buffers(remove_duplicate=False))
        self._runner.load_constants({name: tensors[name] for name in self._runner.get_constant_fqns()},
                                    check_full_update=True, user_managed=True)
        self._lengths = torch.empty(max_len)  # views of it carry the filled length
        self.compile_s = time.perf_counter() - t0

    def reset(self) -> None:
        """Start a new sequence (old positions are overwritten as the new one fills the cache)."""
        self.length = 0

    def _check(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions, {self.length + n} needed")

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The eager forward of ``ids`` ``(1, n)`` at the next ``n`` positions, into the cache; the last position's
        logits ``(1, 1, vocab)``."""
        self._check(ids.shape[1])
        for layer in self._cache.layers:
            layer.length = self.length
        logits = generation.decode_step(self.model)(ids, self._cache)
        self.length += ids.shape[1]
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The compiled forward of one token ``(1, 1)`` at the next position; its logits ``(1, 1, vocab)``."""
        if self.length == 0:
            raise ValueError("step needs a prefilled position first (prefill)")
        self._check(1)
        logits = self._runner(token, self._lengths[:self.length])
        self.length += 1
        return logits


def _export_shims() -> None:
    """Make the loaded C++ op library's symbols (the C shims) visible to the libraries AOTInductor loads."""
    for path in torch.ops.loaded_libraries:
        if Path(path).name.startswith("tritium_op_"):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # already loaded: this only makes its symbols global
