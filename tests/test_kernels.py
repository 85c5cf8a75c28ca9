"""Packed ternary kernels: every backend bit-exact against the reference, and the reference against
an independent int64 formula; pack/unpack, dispatch, fallback, torch.compile and the quick benchmark."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import tritium.kernels as K
from tritium.kernels import reference

BACKENDS = K.available_backends()


@pytest.fixture(autouse=True)
def _restore_backend():
    before = K.get_backend()
    yield
    K.set_backend(before)


def _case(m: int, n: int, k: int, gen: torch.Generator, weights: str = "random", acts: str = "random"):
    if weights == "random":
        q = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    else:
        q = torch.full((n, k), {"zero": 0, "one": 1, "minus": -1}[weights], dtype=torch.int8)
    if acts == "random":
        x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    else:
        x = torch.full((m, k), int(acts), dtype=torch.int8)
    sx = torch.rand(m, generator=gen) * 0.1 + 1e-3
    return q, x, sx


def _independent(x: torch.Tensor, q: torch.Tensor, sx, sw, bias) -> torch.Tensor:
    acc = (x.to(torch.int64) @ q.to(torch.int64).t()).to(torch.float32)
    y = acc * (sx.reshape(-1, 1) * sw.reshape(1, -1))
    return y if bias is None else y + bias


SHAPES = [(1, 1, 1), (1, 5, 3), (1, 33, 255), (1, 64, 4096), (1, 130, 1000), (7, 17, 129), (7, 64, 512),
          (128, 40, 300), (128, 36, 1027), (513, 19, 257), (0, 8, 64), (3, 0, 64), (4, 9, 0), (2, 70, 4096),
          (33, 100, 65), (20, 48, 2048)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_bit_exact(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    for i, (m, n, k) in enumerate(SHAPES):
        q, x, sx = _case(m, n, k, gen)
        packed = K.pack(q)
        sw = torch.rand(1 if i % 2 else n, generator=gen) + 0.5
        bias = torch.randn(n, generator=gen) if i % 3 else None
        want = reference.ternary_matmul(x, packed, n, k, sx, sw, bias)
        assert torch.equal(want, _independent(x, q, sx, sw, bias)), (m, n, k)
        K.set_backend(backend)
        got = K.ternary_matmul(x, packed, n, k, sx, sw, bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert torch.equal(got, want), (backend, m, n, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["zero", "one", "minus", "random"])
@pytest.mark.parametrize("acts", ["-128", "-127", "127", "random"])
def test_backends_extremes(backend: str, weights: str, acts: str) -> None:
    gen = torch.Generator().manual_seed(2)
    for m, n, k in [(1, 20, 4101), (9, 20, 4101), (128, 8, 131)]:
        q, x, sx = _case(m, n, k, gen, weights, acts)
        packed, sw, bias = K.pack(q), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
        want = _independent(x, q, sx, sw, bias)
        assert torch.equal(reference.ternary_matmul(x, packed, n, k, sx, sw, bias), want)
        K.set_backend(backend)
        assert torch.equal(K.ternary_matmul(x, packed, n, k, sx, sw, bias), want), (backend, m, n, k)


def test_max_k_is_exact() -> None:
    k = K.MAX_K
    x = torch.full((2, k), -128, dtype=torch.int8)
    q = torch.ones(3, k, dtype=torch.int8)
    one = torch.ones(2)
    want = _independent(x, q, one, torch.ones(1), None)
    assert want[0, 0].item() == -(2**24)
    for backend in BACKENDS:
        K.set_backend(backend)
        assert torch.equal(K.ternary_matmul(x, K.pack(q), 3, k, one, torch.ones(1)), want), backend


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 255, 256, 257])
def test_pack_round_trip(k: int) -> None:
    q = torch.randint(-1, 2, (6, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = K.pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, (k + 3) // 4)
    assert torch.equal(K.unpack(packed, 6, k), q)
    assert torch.equal(K.pack(q.float()), packed)


def test_pack_layout() -> None:
    q = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    # codes w + 1, weight k at bits 2 * (k % 4) of byte k // 4, padding coded 1
    assert K.pack(q).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 0 | 1 << 2 | 1 << 4 | 1 << 6]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_bit_exact_with_reference(backend: str) -> None:
    """The native packing equals reference.pack for every int8 input, invalid values and odd K included."""
    gen = torch.Generator().manual_seed(11)
    K.set_backend(backend)
    for n, k in [(0, 5), (4, 0), (1, 1), (5, 3), (7, 255), (33, 1027), (2, 4101), (300, 64), (1024, 4096)]:
        q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        assert torch.equal(K.pack(q), reference.pack(q)), (n, k)
        t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        assert torch.equal(K.pack(t), reference.pack(t)), (n, k)
        assert torch.equal(K.pack(t.t().contiguous().t()), reference.pack(t))  # non-contiguous
    with pytest.raises(ValueError, match="2-D"):
        K.pack(torch.zeros(4, dtype=torch.int8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_ternary_matches_quantize_weight(backend: str) -> None:
    """q bit for bit quant.quantize_weight's (rounding ties at +-0.5 s and +-1.5 s included), pack(q), and
    a NaN scale exactly for the rows where w / s is NaN."""
    from tritium import BitConfig, quant

    gen = torch.Generator().manual_seed(12)
    K.set_backend(backend)
    for i, (n, k) in enumerate([(0, 5), (3, 0), (1, 1), (5, 3), (33, 1027), (64, 4099), (300, 257)]):
        for gran in ("tensor", "channel"):
            cfg = BitConfig(measure=("absmean", "absmedian", "absmax")[i % 3], granularity=gran)
            w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.1)
            _, s = quant.quantize_weight(w, cfg)
            if w.numel():
                ties = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 0.0, -0.0]) * s.reshape(-1)[0]
                w.view(-1)[: min(7, w.numel())] = ties[: min(7, w.numel())]
            if n > 2 and k > 2:
                w[1, 2] = float("nan")
                w[2, 0] = float("inf")
            want, s = quant.quantize_weight(w, cfg)
            q, packed, sw = K.quantize_ternary(w, s.reshape(-1))
            bad = want.isnan().any(1)
            assert torch.equal(q, want.nan_to_num(0.0).to(torch.int8)), (backend, n, k, gran)
            assert torch.equal(packed, reference.pack(q))
            assert torch.equal(sw.isnan(), bad) and torch.equal(sw[~bad], s.reshape(-1).expand(n)[~bad])
    with pytest.raises(TypeError, match="float32"):
        K.quantize_ternary(torch.zeros(3, 4, dtype=torch.float64), torch.ones(1))
    with pytest.raises(ValueError, match="s has shape"):
        K.quantize_ternary(torch.zeros(3, 4), torch.ones(2))


def test_pack_and_quantize_ternary_custom_ops() -> None:
    gen = torch.Generator().manual_seed(13)
    q = torch.randint(-1, 2, (24, 70), generator=gen, dtype=torch.int8)
    w, s = torch.randn(24, 70, generator=gen), torch.rand(24, generator=gen) + 0.5
    torch.library.opcheck(torch.ops.tritium.pack.default, (q,))
    torch.library.opcheck(torch.ops.tritium.quantize_ternary.default, (w, s))
    compiled = torch.compile(lambda w, s: K.quantize_ternary(w, s)[1], fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w, s), K.pack(K.quantize_ternary(w, s)[0]))


def test_non_contiguous_and_validation() -> None:
    gen = torch.Generator().manual_seed(3)
    q, x, sx = _case(6, 10, 40, gen)
    packed, sw = K.pack(q), torch.rand(10, generator=gen)
    want = K.ternary_matmul(x, packed, 10, 40, sx, sw)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(K.ternary_matmul(xt, packed, 10, 40, sx, sw), want)
    with pytest.raises(TypeError, match="int8"):
        K.ternary_matmul(x.float(), packed, 10, 40, sx, sw)
    with pytest.raises(ValueError, match="columns"):
        K.ternary_matmul(x, packed, 10, 41, sx, sw)
    with pytest.raises(TypeError, match="packed"):
        K.ternary_matmul(x, packed.to(torch.int8), 10, 40, sx, sw)
    with pytest.raises(ValueError, match="packed"):
        K.ternary_matmul(x, packed[:5], 10, 40, sx, sw)
    with pytest.raises(ValueError, match="sw"):
        K.ternary_matmul(x, packed, 10, 40, sx, sw[:3])
    with pytest.raises(TypeError, match="sx"):
        K.ternary_matmul(x, packed, 10, 40, sx.double(), sw)
    with pytest.raises(ValueError, match="bias"):
        K.ternary_matmul(x, packed, 10, 40, sx, sw, torch.zeros(9))


def test_set_backend_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.set_backend("cuda")
    for name in ("avx512", "avx2", "generic"):
        if name not in BACKENDS:
            with pytest.raises(RuntimeError, match="not available"):
                K.set_backend(name)
    K.set_backend("auto")
    assert K.get_backend() == BACKENDS[0]
    assert BACKENDS[-1] == "reference"


def test_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITIUM_KERNEL", "reference")
    monkeypatch.setattr(K, "_backend", None)
    assert K.get_backend() == "reference"
    monkeypatch.setenv("TRITIUM_KERNEL", "nonsense")
    monkeypatch.setattr(K, "_backend", None)
    with pytest.raises(ValueError, match="nonsense"):
        K.get_backend()


def test_fallback_warns_when_library_missing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TRITIUM_KERNEL_LIB", str(tmp_path / "missing.so"))
    monkeypatch.delenv("TRITIUM_KERNEL", raising=False)
    K._reload_library()
    try:
        assert K.available_backends() == ["reference"]
        q, x, sx = _case(3, 5, 9, torch.Generator().manual_seed(4))
        with pytest.warns(RuntimeWarning, match="reference"):
            y = K.ternary_matmul(x, K.pack(q), 5, 9, sx, torch.ones(1))
        assert torch.equal(y, _independent(x, q, sx, torch.ones(1), None))
        with pytest.raises(RuntimeError, match="unavailable"):
            K.set_backend("generic")
    finally:
        monkeypatch.delenv("TRITIUM_KERNEL_LIB")
        K._reload_library()
    assert K.available_backends() == BACKENDS


def test_compile_and_inference_mode() -> None:
    gen = torch.Generator().manual_seed(5)
    q, x, sx = _case(4, 24, 70, gen)
    packed, sw, bias = K.pack(q), torch.rand(24, generator=gen), torch.randn(24, generator=gen)

    def f(x, sx):
        return torch.relu(K.ternary_matmul(x, packed, 24, 70, sx, sw, bias)) * 2

    want = torch.relu(_independent(x, q, sx, sw, bias)) * 2
    with torch.inference_mode():
        assert torch.equal(f(x, sx), want)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, sx), want)
    torch.library.opcheck(torch.ops.tritium.ternary_matmul.default, (x, packed, 24, 70, sx, sw, bias))


def test_quick_bench_runs(tmp_path) -> None:
    from tritium.bench import kernels as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--quick", "--shapes", "1x64x96,3x40x64", "--json", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bench.run(args)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert len(saved["rows"]) == 2 and saved["bandwidth_gb_s"] > 0 and saved["read_bandwidth_gb_s"] > 0
    assert all(r["tritium_ms"] > 0 for r in saved["rows"])


# ------------------------------------------------------------------------------------------------------
# The activation quantizer (definition: tritium.quant.quantize_act) and the fused ternary_linear.


def _assert_quant_equal(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, where) -> None:
    """``(q, s)`` is bit-identical to ``quant.quantize_act(x, 8)``; rows with a non-finite scale have q = 0."""
    from tritium import quant

    rq, rs = quant.quantize_act(x, 8)
    rs = rs.reshape(-1)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == x.shape and s.shape == rs.shape
    assert torch.equal(s.isnan(), rs.isnan()), where
    fin = rs.isfinite()
    assert torch.equal(s[~rs.isnan()], rs[~rs.isnan()]), where  # inf rows included
    assert torch.equal(q[fin], rq[fin].to(torch.int8)), where
    assert not q[~fin].any(), where


def _act_rows(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows spanning 1e-40 (denormal, below the 1e-5 clamp) to 1e37, plus special rows."""
    scales = 10.0 ** (torch.rand(m, 1, generator=gen) * 77 - 40)
    x = torch.randn(m, k, generator=gen) * scales
    if m >= 4:
        x[1] = 0.0
        x[2] = -0.0
        x[3, : k // 2] = 1e-5  # absmax exactly at the clamp
    return x


QUANT_SHAPES = [(1, 1), (1, 7), (1, 4096), (1, 4101), (2, 15), (3, 17), (4, 63), (5, 65), (9, 100), (13, 257),
                (40, 1000), (130, 513), (3, 3000), (0, 17), (6, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_rows_bit_exact(backend: str) -> None:
    K.set_backend(backend)
    gen = torch.Generator().manual_seed(11)
    for m, k in QUANT_SHAPES:
        x = _act_rows(m, k, gen)
        q, s = K.quantize_rows(x)
        if k == 0:  # quantize_act cannot reduce an empty row: absmax is 0, so s = 1e-5 / 127
            assert q.shape == (m, 0) and torch.equal(s, torch.full((m,), 1e-5) / 127)
            continue
        _assert_quant_equal(x, q, s, (backend, m, k))
    # ties round half to even: absmax 127 gives s = 1 exactly
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 3])
    q, s = K.quantize_rows(x)
    assert s.item() == 1.0 and q[0, :8].tolist() == [127, 2, -4, 0, 0, 2, 126, -126]
    _assert_quant_equal(x, q, s, backend)
    # a tie with absmax != 127: x * fl(127 / a) is just below 53.5, while x * (127 * fl(1 / a)) is 53.5
    x = torch.tensor([[1.745441198348999, 4.143383979797363, -1.745441198348999, 0.0]])
    q, s = K.quantize_rows(x)
    assert q[0].tolist() == [53, 127, -53, 0]
    _assert_quant_equal(x, q, s, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_rows_nan_inf_and_huge(backend: str) -> None:
    K.set_backend(backend)
    gen = torch.Generator().manual_seed(12)
    for k in (1, 16, 31, 64, 77, 1000):
        x = torch.randn(6, k, generator=gen)
        x[1, k // 2] = float("nan")
        x[2, k - 1] = float("inf")
        x[3] *= 3e38 / x[3].abs().max()  # near FLT_MAX
        x[4, 0] = -float("inf")
        x[4, k - 1] = float("nan")
        q, s = K.quantize_rows(x)
        assert s[1].isnan() and s[4].isnan() and s[2].isinf()
        assert not q[1].any() and not q[2].any() and not q[4].any()
        _assert_quant_equal(x, q, s, (backend, k))
        clean = K.quantize_rows(x[[0, 3, 5]])  # the other rows are unaffected by the bad ones
        assert torch.equal(clean[0], q[[0, 3, 5]]) and torch.equal(clean[1], s[[0, 3, 5]])


def _composition(x, packed, n, k, sw, bias):
    from tritium import quant

    q, s = quant.quantize_act(x, 8)
    return reference.ternary_matmul(q.to(torch.int8), packed, n, k, s.reshape(-1), sw, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend: str) -> None:
    """Non-contiguous activations, scales and bias (strided views) give the contiguous result."""
    gen = torch.Generator().manual_seed(21)
    m, n, k = 5, 24, 130
    q = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    packed = K.pack(q)
    x = torch.randn(m, 2 * k, generator=gen)[:, ::2]
    sw = (torch.rand(2 * n, generator=gen) + 0.5)[::2]
    bias = torch.randn(3 * n, generator=gen)[::3]
    assert not (x.is_contiguous() or sw.is_contiguous() or bias.is_contiguous())
    want = _composition(x.contiguous(), packed, n, k, sw.contiguous(), bias.contiguous())
    K.set_backend(backend)
    for _ in range(3):
        assert torch.equal(K.ternary_linear(x, packed, n, k, sw, bias), want)
        assert torch.equal(torch.ops.tritium.ternary_linear(x, packed, n, k, sw, bias), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ternary_linear_matches_composition(backend: str) -> None:
    gen = torch.Generator().manual_seed(13)
    for i, (m, n, k) in enumerate([(1, 33, 255), (1, 64, 4101), (2, 70, 100), (7, 17, 129), (9, 20, 300),
                                   (20, 48, 2048), (33, 100, 65), (130, 19, 257), (0, 8, 64), (3, 0, 64)]):
        q = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        x = _act_rows(m, k, gen)
        packed = K.pack(q)
        sw = torch.rand(1 if i % 2 else n, generator=gen) + 0.5
        bias = torch.randn(n, generator=gen) if i % 3 else None
        want = _composition(x, packed, n, k, sw, bias)
        K.set_backend(backend)
        got = K.ternary_linear(x, packed, n, k, sw, bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert torch.equal(got, want), (backend, m, n, k)
        qx, sx = K.quantize_rows(x)
        assert torch.equal(got, K.ternary_matmul(qx, packed, n, k, sx, sw, bias)), (backend, m, n, k)
    x = torch.randn(4, 40, generator=gen)
    x[2, 3] = float("nan")
    y = K.ternary_linear(x, K.pack(torch.ones(5, 40, dtype=torch.int8)), 5, 40, torch.ones(1))
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()


def test_ternary_linear_validation_and_non_contiguous() -> None:
    gen = torch.Generator().manual_seed(14)
    q = torch.randint(-1, 2, (10, 40), generator=gen, dtype=torch.int8)
    packed, sw, x = K.pack(q), torch.rand(10, generator=gen), torch.randn(6, 40, generator=gen)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(K.ternary_linear(xt, packed, 10, 40, sw), K.ternary_linear(x, packed, 10, 40, sw))
    assert torch.equal(K.quantize_rows(xt)[0], K.quantize_rows(x)[0])
    with pytest.raises(TypeError, match="float32"):
        K.ternary_linear(x.double(), packed, 10, 40, sw)
    with pytest.raises(TypeError, match="float32"):
        K.quantize_rows(x.to(torch.int8))
    with pytest.raises(ValueError, match="columns"):
        K.ternary_linear(x, packed, 10, 41, sw)
    with pytest.raises(ValueError, match="packed"):
        K.ternary_linear(x, packed[:5], 10, 40, sw)
    with pytest.raises(ValueError, match="bias"):
        K.ternary_linear(x, packed, 10, 40, sw, torch.zeros(9))


def test_ternary_linear_compile_and_inference_mode() -> None:
    gen = torch.Generator().manual_seed(15)
    q = torch.randint(-1, 2, (24, 70), generator=gen, dtype=torch.int8)
    packed, sw, bias = K.pack(q), torch.rand(24, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(4, 70, generator=gen)

    def f(x):
        qx, sx = K.quantize_rows(x)
        return torch.relu(K.ternary_linear(x, packed, 24, 70, sw, bias)) * 2 + sx[:, None] * qx[:, :24]

    qx, sx = K.quantize_rows(x)
    want = torch.relu(_composition(x, packed, 24, 70, sw, bias)) * 2 + sx[:, None] * qx[:, :24]
    with torch.inference_mode():
        assert torch.equal(f(x), want)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), want)
    with torch.inference_mode():
        assert torch.equal(compiled(x), want)
    torch.library.opcheck(torch.ops.tritium.ternary_linear.default, (x, packed, 24, 70, sw, bias))
    torch.library.opcheck(torch.ops.tritium.quantize_rows.default, (x,))


# ------------------------------------------------------------------------------------------------------
# Robustness of the native library: allocation failures in worker threads, concurrent callers, fork.

NATIVE = [b for b in BACKENDS if b != "reference"]


@pytest.mark.skipif(not NATIVE, reason="compiled kernels unavailable")
def test_worker_allocation_failure_raises() -> None:
    """Tasks that allocate (generic with >= 8 rows, amx with >= 16 rows) report a failure: the call raises
    MemoryError instead of returning a partly written output."""
    gen = torch.Generator().manual_seed(16)
    q, x, sx = _case(40, 64, 300, gen)
    packed, sw = K.pack(q), torch.rand(64, generator=gen)
    want = _independent(x, q, sx, sw, None)
    xf = torch.randn(40, 300, generator=gen)
    threads = torch.get_num_threads()
    try:
        for backend in [b for b in ("generic", "amx") if b in NATIVE]:
            K.set_backend(backend)
            for nthreads in (1, 2):
                torch.set_num_threads(nthreads)
                for fail in (1, 3):
                    K._lib.tk_test_fail_task_allocs(fail)
                    with pytest.raises(MemoryError, match=backend):
                        K.ternary_matmul(x, packed, 64, 300, sx, sw)
                    K._lib.tk_test_fail_task_allocs(fail)
                    with pytest.raises(MemoryError):
                        K.ternary_linear(xf, packed, 64, 300, sw)
                    K._lib.tk_test_fail_task_allocs(0)
                    assert torch.equal(K.ternary_matmul(x, packed, 64, 300, sx, sw), want)
    finally:
        K._lib.tk_test_fail_task_allocs(0)
        torch.set_num_threads(threads)


def _stress_cases(gen: torch.Generator):
    cases = []
    for i in range(24):  # few tasks per call, so that jobs often leave some pool workers out
        m, n, k = 1 + i % 3, 16 * (1 + i % 5), 64 + 37 * (i % 4)
        q = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        x = torch.randn(m, k, generator=gen)
        packed, sw = K.pack(q), torch.rand(n, generator=gen)
        cases.append((x, packed, n, k, sw, _composition(x, packed, n, k, sw, None)))
    return cases


@pytest.mark.skipif(not NATIVE, reason="compiled kernels unavailable")
def test_concurrent_tiny_calls() -> None:
    """Two Python threads make thousands of tiny multithreaded calls with varying thread counts (each
    caller runs its own OpenMP team; the team size changes between calls). Every result is checked."""
    import threading
    import time

    K.set_backend(NATIVE[0])
    cases = _stress_cases(torch.Generator().manual_seed(17))
    errors: list[object] = []
    calls = [0, 0]
    deadline = time.monotonic() + 2.0

    def work(seed: int) -> None:
        try:
            it = 0
            while time.monotonic() < deadline:
                torch.set_num_threads(2 + (seed + it) % 3)
                x, packed, n, k, sw, want = cases[(seed + 7 * it) % len(cases)]
                if not torch.equal(K.ternary_linear(x, packed, n, k, sw), want):
                    errors.append((seed, it))
                    return
                it += 1
                calls[seed] = it
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads_before = torch.get_num_threads()
    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        torch.set_num_threads(threads_before)
    assert not any(t.is_alive() for t in threads), f"kernel call hung after {calls} calls"
    assert not errors, errors
    assert min(calls) > 100, calls


@pytest.mark.skipif(not NATIVE, reason="native kernels unavailable")
def test_kernels_share_torch_openmp_runtime() -> None:
    """The kernels run on the OpenMP runtime that torch ships and has loaded, not on a second one whose threads
    would compete with torch's for the cores."""
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not torch_gomp.exists():
        pytest.skip("this torch build ships no libgomp.so.1")
    runtime = K.openmp_runtime()
    assert runtime is not None, "kernels built without OpenMP"
    assert Path(runtime).resolve() == torch_gomp.resolve(), runtime
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # multithreaded calls interleaved with torch's own OpenMP regions
        for x, packed, n, k, sw, want in _stress_cases(torch.Generator().manual_seed(19))[:6]:
            assert torch.equal(K.ternary_linear(x, packed, n, k, sw), want)
            torch.ones(1 << 16).mul(2).sum()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not NATIVE or not hasattr(os, "fork"), reason="needs fork and native kernels")
def test_kernels_after_fork() -> None:
    """A forked child gets correct results once it sets one thread, which torch itself needs: the OpenMP
    runtime that torch and the kernels share does not survive fork (its team threads are gone)."""
    import time

    K.set_backend(NATIVE[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, packed, n, k, sw, want = _stress_cases(torch.Generator().manual_seed(18))[4]
        assert torch.equal(K.ternary_linear(x, packed, n, k, sw), want)  # the OpenMP team is running
        pid = os.fork()
        if pid == 0:  # child: no pytest machinery, exit status only
            torch.set_num_threads(1)
            ok = all(torch.equal(K.ternary_linear(x, packed, n, k, sw), want) for _ in range(50))
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("kernel call in a forked child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        assert torch.equal(K.ternary_linear(x, packed, n, k, sw), want)  # and the parent's threads still work
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------
# The C ABI on its own, and on ARM: tests/csrc/check_kernels.c checks every backend against a naive C
# reference; for aarch64 the library and the check are cross-compiled and run under qemu.

CSRC = [Path(__file__).resolve().parents[1] / "src" / "tritium" / "kernels" / "csrc" / name
        for name in ("ternary.c", "adamw.c")]
CHECK = Path(__file__).resolve().parent / "csrc" / "check_kernels.c"
FLAGS = ["-O2", "-std=gnu11", "-ffp-contract=off", "-pthread", "-fopenmp"]


def _run_check(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failures" in out.stdout, out.stdout
    return out.stdout


@pytest.mark.skipif(not NATIVE or shutil.which("cc") is None, reason="needs the compiled kernels and a C compiler")
def test_c_abi_against_c_reference(tmp_path: Path) -> None:
    lib = Path(K._native._candidates()[0])
    exe = tmp_path / "check"
    subprocess.run(["cc", *FLAGS, str(CHECK), str(lib), "-o", str(exe), f"-Wl,-rpath,{lib.parent}", "-lm"],
                   check=True, timeout=120)
    _run_check([str(exe)], tmp_path)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
def test_aarch64_build_bit_exact(tmp_path: Path) -> None:
    cc = "aarch64-linux-gnu-gcc"
    lib, exe = tmp_path / "libtk.so", tmp_path / "check"
    subprocess.run([cc, *FLAGS, "-O3", "-fvisibility=hidden", "-shared", "-fPIC", "-Wall", "-Werror", *map(str, CSRC),
                    "-o", str(lib), "-lm"], check=True, timeout=120)
    subprocess.run([cc, *FLAGS, str(CHECK), str(lib), "-o", str(exe), f"-Wl,-rpath,{tmp_path}", "-lm"],
                   check=True, timeout=120)
    # "max" has the dot-product extension (neon and generic backends: mask 0b10001), a Cortex-A53 has not.
    for cpu, mask in (("max", 17), ("cortex-a53", 1)):
        out = _run_check(["qemu-aarch64", "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", str(exe)], tmp_path)
        assert f"backends mask {mask}" in out, (cpu, out)
