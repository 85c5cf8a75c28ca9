"""Fast decoding of frozen transformers models: several weights on one input (`kernels.ternary_linears`), layers
that share their input (`share_inputs`), the prefix cache, the compiled one-token forward (`decode_step`) and the
decode loop of `tritium.generation.generate`; each is checked bit for bit against the eager path it replaces."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tritium
from tritium import generation
from tritium import kernels as K
from tritium.cli import main
from tritium.nn.ternary import SharedInput, TernaryLinear, share_inputs, unshare_inputs

tf = pytest.importorskip("transformers")

BACKENDS = K.available_backends()
PROMPT = [5, 9, 17, 3, 44, 2, 8, 61, 30]


def _frozen(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny frozen decoder (grouped-query attention; Qwen2 has q/k/v biases), random weights, no EOS."""
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                                 "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    cfg = config_class(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, eos_token_id=None, pad_token_id=0, bos_token_id=1)
    return tritium.freeze(tritium.quantize(model_class(cfg)).eval())


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {arch: _frozen(arch) for arch in ("llama", "qwen2")}


@torch.inference_mode()
def _eager_logits(model, ids: list[int], steps: int) -> torch.Tensor:
    """Greedy decoding by transformers' forward with its DynamicCache: the logits of every step."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    logits = [out.logits[0, -1]]
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, cache=out.cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


@torch.inference_mode()
def _step_logits(model, ids: list[int], steps: int, step) -> torch.Tensor:
    """The same greedy decoding with a prefix cache, the eager prefill and ``step`` for each token."""
    cache = generation.prefix_cache(len(model.model.layers), len(ids) + steps)
    logits = [generation.decode_step(model)(torch.tensor([ids]), cache)[0, -1]]
    for _ in range(steps):
        logits.append(step(logits[-1].argmax(-1).reshape(1, 1), cache)[0, -1])
    return torch.stack(logits)


# ------------------------------------------------------------------------------------------------------
# Several weights on one input.


def _weights(ns, k, gen, bias_every=2):
    qs = [torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8) for n in ns]
    sws = [torch.rand(n if i % 2 else 1, generator=gen) + 0.1 for i, n in enumerate(ns)]
    bias = [torch.randn(n, generator=gen) if i % bias_every == 0 else None for i, n in enumerate(ns)]
    return [K.pack(q) for q in qs], sws, bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_ternary_linears_matches_separate_calls(backend: str) -> None:
    """Every output equals its own ternary_linear on the normed input, bit for bit: one row (GEMV), a few, and
    enough rows for the AMX tiles; weights of different heights (one of them empty), scales per tensor or
    channel, with and without bias; one to nine weights (above 8, one call per weight)."""
    from tritium import quant

    gen = torch.Generator().manual_seed(3)
    old, threads = K.get_backend(), torch.get_num_threads()
    try:
        K.set_backend(backend)
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            for m, k, ns in [(1, 1024, (64, 32, 32)), (1, 300, (20, 0, 7)), (3, 256, (48, 16)), (17, 512, (32, 96)),
                             (40, 70, (16, 16, 16, 16)), (130, 256, (64,)), (2, 64, tuple(range(8, 80, 8)))]:
                for norm in (None, "layernorm", "rmsnorm"):
                    x = torch.randn(m, k, generator=gen) * 3
                    packed, sws, bias = _weights(ns, k, gen)
                    got = K.ternary_linears(x, packed, ns, k, sws, bias, norm)
                    xf = quant.input_norm(x, norm)
                    for i, n in enumerate(ns):
                        want = K.ternary_linear(xf, packed[i], n, k, sws[i], bias[i])
                        assert torch.equal(got[i], want), (backend, nthreads, m, k, ns, norm, i)
    finally:
        K.set_backend(old)
        torch.set_num_threads(threads)


def test_ternary_linears_validation_and_custom_op() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, generator=gen)
    packed, sws, bias = _weights((8, 24), 40, gen)
    with pytest.raises(TypeError, match="ternary_linears"):
        K.ternary_linears(x.double(), packed, (8, 24), 40, sws)
    with pytest.raises(ValueError, match="columns"):
        K.ternary_linears(x, packed, (8, 24), 41, sws)
    with pytest.raises(ValueError, match="norm"):
        K.ternary_linears(x, packed, (8, 24), 40, sws, norm="batchnorm")
    with pytest.raises(ValueError, match="one entry per weight"):
        K.ternary_linears(x, packed, (8,), 40, sws)
    with pytest.raises(ValueError, match=r"packed\[1\]"):
        K.ternary_linears(x, packed, (8, 23), 40, sws)
    assert [t.shape for t in K.ternary_linears(x, packed, (8, 24), 40, sws)] == [(3, 8), (3, 24)]
    torch.library.opcheck(torch.ops.tritium.ternary_linears.default, (x, packed, [8, 24], 40, sws, bias, "layernorm"))
    compiled = torch.compile(lambda x: [y * 2 for y in K.ternary_linears(x, packed, (8, 24), 40, sws, bias, "rmsnorm")],
                             fullgraph=True, backend="aot_eager")
    want = [y * 2 for y in K.ternary_linears(x, packed, (8, 24), 40, sws, bias, "rmsnorm")]
    assert all(torch.equal(a, b) for a, b in zip(compiled(x), want, strict=True))


# ------------------------------------------------------------------------------------------------------
# The C++ form of the op (what compiled frozen layers call).

NATIVE = [b for b in BACKENDS if b != "reference"]


@pytest.fixture(scope="module")
def cpp_op() -> None:
    """The C++ op, built on first use; a machine with a C++ compiler (CI) must build it, others skip."""
    import shutil

    if not NATIVE:
        pytest.skip("no compiled kernels on this machine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = K.load_cpp_op()
    if not loaded:
        if shutil.which("c++") or shutil.which("g++"):
            why = caught[-1].message if caught else "no warning"
            pytest.fail(f"the C++ op did not build although a compiler is installed: {why}")
        pytest.skip("no C++ compiler: the C++ op cannot be built here")


def _both_ops(x, packed, ns, k, sws, bias, norm) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    args = (x, packed, list(ns), k, sws, bias, norm)
    return torch.ops.tritium.ternary_linears_native(*args), torch.ops.tritium.ternary_linears(*args)


@pytest.mark.parametrize("backend", NATIVE)
def test_cpp_op_matches_python_op(cpp_op, backend: str) -> None:
    """The C++ op's outputs equal the Python op's bit for bit: GEMV and AMX-sized inputs, empty and odd weights,
    per-tensor and per-channel scales, bias or not, every norm, one to nine weights, one and two threads; at
    the decode shapes of `tritium bench model` (hidden 1024, MLP 2816) and a 7B model's (4096, MLP 11008)."""
    gen = torch.Generator().manual_seed(5)
    old, threads = K.get_backend(), torch.get_num_threads()
    cases = [(1, 1024, (64, 32, 32)), (1, 300, (20, 0, 7)), (3, 256, (48, 16)), (17, 512, (32, 96)),
             (40, 70, (16, 16, 16, 16)), (130, 256, (64,)), (2, 64, tuple(range(8, 80, 8))), (0, 64, (8, 8)),
             (1, 1024, (1024, 1024, 1024)), (1, 1024, (2816, 2816)), (1, 2816, (1024,)),
             (1, 4096, (11008, 11008)), (64, 11008, (4096,))]
    try:
        K.set_backend(backend)
        assert K.linears_op() is torch.ops.tritium.ternary_linears_native
        assert K.linears_op(torch.empty(1, 4, device="meta")) is torch.ops.tritium.ternary_linears  # not on the CPU
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            for m, k, ns in cases:
                for norm in (None, "layernorm", "rmsnorm"):
                    x = torch.randn(m, k, generator=gen) * 3
                    if m > 1:
                        x[m // 2] = 0.0  # a zero row: the activation scale's lower bound
                    packed, sws, bias = _weights(ns, k, gen)
                    got, want = _both_ops(x, packed, ns, k, sws, bias, norm)
                    assert len(got) == len(ns)
                    for i, (a, b) in enumerate(zip(got, want, strict=True)):
                        assert a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (
                            backend, nthreads, m, k, ns, norm, i)
    finally:
        K.set_backend(old)
        torch.set_num_threads(threads)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 20), k=st.integers(1, 600), ns=st.lists(st.integers(0, 70), min_size=1, max_size=9),
       norm=st.sampled_from([None, "layernorm", "rmsnorm"]), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]),
       special=st.sampled_from([None, "nan", "inf", "tie"]), seed=st.integers(0, 2**31 - 1))
def test_cpp_op_matches_python_op_properties(cpp_op, m, k, ns, norm, scale, special, seed) -> None:
    """Random shapes and extreme values (tiny and huge magnitudes, NaN and inf entries, activations on rounding
    ties of the 8-bit quantizer): the C++ op equals the Python op bit for bit, NaNs in the same places."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * scale
    if m and special == "nan":
        x[0, k // 2] = float("nan")
    elif m and special == "inf":
        x[-1, 0] = float("inf")
    elif m and special == "tie":  # absmax 127: every x + 0.5 is a tie of round(x * 127 / 127)
        x[0] = torch.randint(-126, 126, (k,), generator=gen).float() + 0.5
        x[0, 0] = 127.0
    packed, sws, bias = _weights(ns, k, gen)
    got, want = _both_ops(x, packed, ns, k, sws, bias, norm)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_cpp_op_errors_and_reference_backend(cpp_op) -> None:
    """Bad inputs and a kernel out of memory raise as the Python op does; with the reference backend compiled
    layers call the Python op, and the C++ op refuses to run."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 40, generator=gen)
    packed, sws, bias = _weights((8, 24), 40, gen)
    torch.library.opcheck(torch.ops.tritium.ternary_linears_native.default,
                          (x, packed, [8, 24], 40, sws, bias, "layernorm"))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.tritium.ternary_linears_native(x.double(), packed, [8, 24], 40, sws, bias, None)
    with pytest.raises(RuntimeError, match="norm"):
        torch.ops.tritium.ternary_linears_native(x, packed, [8, 24], 40, sws, bias, "batchnorm")
    old = K.get_backend()
    try:
        K.set_backend(NATIVE[-1])
        big, (bpacked, bsws, bbias) = torch.randn(40, 300, generator=gen), _weights((64, 8), 300, gen)
        K._lib.tk_test_fail_task_allocs(1)
        with pytest.raises(MemoryError, match="out of memory"):
            torch.ops.tritium.ternary_linears_native(big, bpacked, [64, 8], 300, bsws, bbias, None)
        K._lib.tk_test_fail_task_allocs(0)
        K.set_backend("reference")
        assert K.linears_op() is torch.ops.tritium.ternary_linears
        with pytest.raises(RuntimeError, match="reference"):
            torch.ops.tritium.ternary_linears_native(x, packed, [8, 24], 40, sws, bias, None)
    finally:
        K._lib.tk_test_fail_task_allocs(0)
        K.set_backend(old)
    assert K.linears_op() is torch.ops.tritium.ternary_linears_native


def test_cpp_op_unavailable_falls_back_to_python_op(monkeypatch) -> None:
    """When the C++ op cannot be built, load_cpp_op warns once with the reason and compiled layers keep the
    Python op."""
    from tritium.kernels import _native

    monkeypatch.setattr(K, "_cpp_op_error", None)
    monkeypatch.setattr(_native, "build_op", lambda: "no compiler here")
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert K.load_cpp_op() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.load_cpp_op() is False  # warned once
    assert K.linears_op() is torch.ops.tritium.ternary_linears


# ------------------------------------------------------------------------------------------------------
# Layers that share their input.


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_share_inputs_groups_siblings_bit_identical(arch: str) -> None:
    model = _frozen(arch, seed=1)
    ids = torch.tensor([PROMPT * 3])  # 27 rows: the AMX path; one row below
    with torch.inference_mode():
        want, want_one = model(input_ids=ids).logits, model(input_ids=ids[:, :1]).logits
        groups = share_inputs(model, input_ids=ids[:, :1])
        names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        assert sorted(sorted(names[id(m)] for m in g.layers) for g in groups) == \
            [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2
        assert torch.equal(model(input_ids=ids).logits, want)
        assert torch.equal(model(input_ids=ids[:, :1]).logits, want_one)
        assert all(g._x is None and g._out is None for g in groups)  # nothing held between forwards
        # bf16 activations: the layers compute in float32 and round, grouped or not
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(input_ids=ids).logits
        unshare_inputs(model)
        assert all(m._shared is None for m in model.modules() if isinstance(m, TernaryLinear))
        assert torch.equal(model(input_ids=ids).logits, want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(input_ids=ids).logits, mixed)


def test_shared_input_rounds() -> None:
    """A group computes once per input: another tensor, a tensor changed in place, or a layer called again
    starts a new round; with autograd the layers compute (and differentiate) on their own."""
    torch.manual_seed(2)
    layers = [_frozen_linear(40, n) for n in (8, 24)]
    group = SharedInput(layers)
    for i, layer in enumerate(layers):
        layer._shared = (group, i)
    calls = []
    real = K._frozen_linears_impl

    def spy(x, packed, *args):
        if len(packed) > 1:  # a group's call (a layer alone computes with one weight)
            calls.append(len(packed))
        return real(x, packed, *args)

    x = torch.randn(3, 40)
    with torch.no_grad():
        alone = [_unshared(layer)(x) for layer in layers]
    try:
        K._frozen_linears_impl = spy
        with torch.no_grad():
            assert torch.equal(layers[0](x), alone[0]) and torch.equal(layers[1](x), alone[1])
            assert calls == [2]
            layers[0](x)
            x.mul_(2)  # changed in place between the two layers: layer 1 must see the new values
            assert torch.equal(layers[1](x), _unshared(layers[1])(x))
            assert calls == [2, 2, 2]
            assert torch.equal(layers[0](x), _unshared(layers[0])(x))  # the round layer 1 began: no call
            assert calls == [2, 2, 2]
            layers[0](x)
            layers[0](x)  # a layer again before its sibling: a new round each time
            assert calls == [2, 2, 2, 2, 2]
    finally:
        K._frozen_linears_impl = real
    xg = torch.randn(3, 40, requires_grad=True)
    layers[1](xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="in_features"):
        SharedInput([layers[0], _frozen_linear(41, 8)])


def _frozen_linear(k: int, n: int) -> TernaryLinear:
    return tritium.freeze(tritium.quantize(torch.nn.Sequential(torch.nn.Linear(k, n))))[0]


def _unshared(layer: TernaryLinear) -> TernaryLinear:
    twin = TernaryLinear(layer.in_features, layer.out_features, layer.bias is not None, layer.norm, layer.per_channel)
    twin.load_state_dict(layer.state_dict())
    return twin


# ------------------------------------------------------------------------------------------------------
# The prefix cache and the compiled one-token forward.


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_matches_dynamic_cache(models, arch: str) -> None:
    model = models[arch]
    want = _eager_logits(model, PROMPT, 12)
    assert torch.equal(_step_logits(model, PROMPT, 12, generation.decode_step(model)), want)
    cache = generation.prefix_cache(2, 4)
    with torch.inference_mode(), pytest.raises(ValueError, match="holds 4 positions"):
        generation.decode_step(model)(torch.tensor([PROMPT[:5]]), cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_decode_bit_identical_without_recompiling(models, arch: str) -> None:
    """The compiled one-token forward gives the eager logits bit for bit at every cache length, and after the
    warm-up (one graph for lengths >= 2) it never compiles again, whatever the prompt length."""
    model = models[arch]
    generation._share_inputs(model)
    step = generation.decode_step(model, compile=True)
    with torch.inference_mode():
        generation._warm_up(model, step)
    with torch.compiler.set_stance("fail_on_recompile"):
        for prompt in (PROMPT, PROMPT[:2], PROMPT * 4):
            assert torch.equal(_step_logits(model, prompt, 20, step), _eager_logits(model, prompt, 20)), prompt
    assert generation.decode_step(model, compile=True) is step  # compiled once per model
    if K.load_cpp_op():  # the frozen layers reach the kernels through the C++ op
        with torch.profiler.profile() as prof:
            _step_logits(model, PROMPT, 2, step)
        names = {e.name for e in prof.events()}
        assert "tritium::ternary_linears_native" in names and "tritium::ternary_linears" not in names


def test_exact_backend_matches_eager_ops() -> None:
    """Ops Inductor compiles (arithmetic, data movement) and ops it leaves to ATen (reductions, transcendental
    functions) both give the eager results bit for bit, on sizes with vector tails."""
    def f(x, y):
        v = x.pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(v + 1e-6) * y
        r = torch.cat((-h[..., 8:], h[..., :8]), -1)
        return torch.nn.functional.silu(h) * r + h.cos() * h.sin() - torch.exp(h / 3) + torch.where(h > 0, h, 2 * h)

    compiled = torch.compile(f, backend=generation._exact_backend, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(5)
    for n in (16, 48, 1000, 1040):
        for _ in range(3):
            x, y = torch.randn(3, n, generator=gen) * 4, torch.randn(n, generator=gen)
            assert torch.equal(compiled(x, y), f(x, y)), n


# ------------------------------------------------------------------------------------------------------
# The decode loop of generate.


def _hf(model, ids, new, **kwargs):
    prompt = torch.tensor([ids])
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=0,
                          pad_token_id=0, num_beams=1, **kwargs)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_matches_transformers(models, arch: str, compile: bool) -> None:
    """Greedy and seeded sampled tokens of generate (eager or compiled loop) are transformers' own; the loop's
    logits are transformers' generate's, bit for bit."""
    model = models[arch]
    assert generation.fast_path(model) is None
    g = generation.generate(model, PROMPT, max_new_tokens=24, compile=compile)
    out = _hf(model, PROMPT, 24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert g.ids == out.sequences[0, len(PROMPT):].tolist()
    step = generation.decode_step(model, compile)
    assert torch.equal(_step_logits(model, PROMPT, 23, step), torch.cat(out.logits))
    assert (g.compile_s > 0) == compile
    for seed in (0, 7):
        s = generation.generate(model, PROMPT, max_new_tokens=24, temperature=1.3, top_p=0.9, seed=seed,
                                compile=compile)
        torch.manual_seed(seed)
        ref = _hf(model, PROMPT, 24, do_sample=True, temperature=1.3, top_p=0.9, top_k=0)
        assert s.ids == ref[0, len(PROMPT):].tolist(), seed
    t = generation.generate(model, PROMPT, max_new_tokens=10, temperature=0.7, seed=3, compile=compile)
    torch.manual_seed(3)
    assert t.ids == _hf(model, PROMPT, 10, do_sample=True, temperature=0.7, top_k=0)[0, len(PROMPT):].tolist()


def test_generate_stops_at_eos_and_leaves_other_configs_to_transformers() -> None:
    model = _frozen("llama", seed=9)
    first = generation.generate(model, PROMPT, max_new_tokens=12).ids
    end = next(i for i, t in enumerate(first) if i > 1 and t not in first[:i])  # a token new at position >= 2
    model.generation_config.eos_token_id = [90, first[end]]
    assert generation.fast_path(model) is None
    g = generation.generate(model, PROMPT, max_new_tokens=12)
    assert g.ids == first[:end + 1] == _hf(model, PROMPT, 12, do_sample=False)[0, len(PROMPT):].tolist()
    model.generation_config.eos_token_id = None
    model.generation_config.repetition_penalty = 1.5  # a logits processor the loop does not reproduce
    assert "repetition_penalty" in generation.fast_path(model)
    g = generation.generate(model, PROMPT, max_new_tokens=12, compile=True)  # transformers' generate, no compile
    assert g.compile_s == 0
    assert g.ids == _hf(model, PROMPT, 12, do_sample=False)[0, len(PROMPT):].tolist() != first


def test_failed_compilation_falls_back_to_eager(monkeypatch) -> None:
    model = _frozen("llama", seed=5)
    want = generation.generate(model, PROMPT, max_new_tokens=8).ids

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(generation, "_exact_backend", broken)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        g = generation.generate(model, PROMPT, max_new_tokens=8, compile=True)
    assert g.ids == want
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager step is kept: no second attempt
        assert generation.generate(model, PROMPT, max_new_tokens=8, compile=True).ids == want


def test_generate_cli_compile(tmp_path, capsys) -> None:
    path = tmp_path / "tiny.safetensors"
    tritium.save(_frozen("qwen2", seed=6), path)
    argv = ["generate", str(path), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "10"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main([*argv, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == plain.out and len(plain.out.strip().split(",")) == 10
    assert "compile: " in compiled.err and "compile: " not in plain.err and "tokens/s" in compiled.err


def test_decode_overhead_script_measures_eager_tokens():
    """scripts/decode_overhead.py: one variant in-process gives a time per token and 64 greedy tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "decode_overhead.py"
    spec = importlib.util.spec_from_file_location("decode_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        row = mod.measure("eager", threads=1, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert row["variant"] == "eager" and row["us_per_token"] > 0
    assert len(row["tokens"]) == 64 and all(0 <= t < 256 for t in row["tokens"])
