"""Property tests: the activation quantizer, the kernels and BitLinear against an independent numpy
reference (float32 operations one by one, int64 matmul), bit for bit, on every kernel backend; rounding
ties, odd shapes and extreme rows. Also the weight measures at LLM scale against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritium import BitConfig, BitLinear, kernels, quant

BACKENDS = kernels.available_backends()
F32 = np.float32
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    derandomize=True)

# ---------------------------------------------------------------------------------------------------------
# Independent reference: the definition, one IEEE float32 operation at a time (numpy never fuses or
# replaces a division by a reciprocal multiply).


def ref_quant(x: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``a = max(absmax, 1e-5)``, ``inv = fl(Q / a)``, ``q = rint(fl(x * inv))``, ``s = fl(a / Q)``.

    ``x`` float32 ``(M, K)``; returns float32 ``q`` (NaN where ``x * inv`` is NaN) and float32 ``s`` ``(M,)``.
    """
    x = np.asarray(x, dtype=F32)
    m, k = x.shape
    q = np.empty((m, k), dtype=F32)
    s = np.empty(m, dtype=F32)
    with np.errstate(all="ignore"):
        for i in range(m):
            row = x[i]
            a = F32(0.0) if k == 0 else np.max(np.abs(row))  # np.max propagates NaN
            a = a if np.isnan(a) else max(a, F32(1e-5))
            inv = F32(qmax) / a
            assert inv.dtype == np.float32
            prod = row * inv
            assert prod.dtype == np.float32
            q[i] = np.rint(prod)  # round half to even
            s[i] = a / F32(qmax)
    return q, s


def ref_quant_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' contract: int8 ``q`` (0 in a row whose scale is not finite) and float32 ``s``."""
    q, s = ref_quant(x)
    q[~np.isfinite(s)] = 0
    return q.astype(np.int8), s


def ref_matmul(xq: np.ndarray, w: np.ndarray, sx: np.ndarray, sw: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``fl(fl(float(acc) * fl(sx * sw)) + bias)`` with ``acc`` the exact int64 product."""
    acc = xq.astype(np.int64) @ w.astype(np.int64).T
    assert np.abs(acc).max(initial=0) <= 1 << 24
    with np.errstate(all="ignore"):
        scale = sx.astype(F32)[:, None] * sw.astype(F32).reshape(1, -1)
        y = acc.astype(F32) * scale
        if bias is not None:
            y = y + bias.astype(F32)[None, :]
    assert y.dtype == np.float32
    return y


def assert_bits_equal(got: torch.Tensor, want: np.ndarray, what: object) -> None:
    """Equal bit patterns, except that any NaN matches any NaN."""
    g = got.detach().float().numpy() if got.dtype != torch.float32 else got.detach().numpy()
    want = np.asarray(want, dtype=F32)
    assert g.shape == want.shape, (what, g.shape, want.shape)
    gn, wn = np.isnan(g), np.isnan(want)
    assert np.array_equal(gn, wn), (what, np.argwhere(gn != wn)[:5])
    bad = (g.view(np.uint32) != want.view(np.uint32)) & ~gn
    assert not bad.any(), (what, np.argwhere(bad)[:5], g[bad][:5], want[bad][:5])


# ---------------------------------------------------------------------------------------------------------
# Inputs


def tie_row(rng: np.random.Generator, k: int, a: float, qmax: int = 127) -> tuple[np.ndarray, int]:
    """A float32 row with absmax ``a`` whose other entries land, where possible, on ``fl(x * inv) = j + 0.5``.

    Returns the row and how many entries are exact ties under the definition."""
    a = F32(a)
    inv = F32(qmax) / a
    row = np.empty(k, dtype=F32)
    row[rng.integers(k)] = a * (1 if rng.random() < 0.5 else -1)
    hits = 0
    for i in range(k):
        if row[i] == a or row[i] == -a:
            continue
        t = F32(rng.integers(-qmax, qmax) + 0.5)  # in [-Q + 0.5, Q - 0.5]
        c = F32(t / inv)
        found = None
        for cand in (c, np.nextafter(c, F32(np.inf)), np.nextafter(c, F32(-np.inf)),
                     np.nextafter(np.nextafter(c, F32(np.inf)), F32(np.inf)),
                     np.nextafter(np.nextafter(c, F32(-np.inf)), F32(-np.inf))):
            if F32(cand * inv) == t and abs(cand) < a:
                found = cand
                break
        if found is None:
            row[i] = F32(rng.uniform(-1, 1)) * a
        else:
            row[i] = found
            hits += 1
    row[np.abs(row) > a] = 0  # never exceeds the absmax
    return row, hits


ROW_KINDS = ("normal", "ties", "ties", "subnormal", "huge", "constant", "zero", "tiny", "nan", "inf", "clamp")


def make_row(kind: str, rng: np.random.Generator, k: int) -> tuple[np.ndarray, int]:
    """One float32 row of ``kind`` and its number of exact ties."""
    if kind == "ties":
        a = F32(10.0 ** rng.uniform(-4, 4)) * F32(rng.uniform(1, 2))
        return tie_row(rng, k, float(a))
    with np.errstate(all="ignore"):
        if kind == "normal":
            row = rng.standard_normal(k) * 10.0 ** rng.uniform(-3, 3)
        elif kind == "subnormal":
            row = rng.uniform(-1, 1, k) * 1.1e-38
        elif kind == "huge":
            row = rng.uniform(-1, 1, k) * 3.4e38
            row[rng.integers(k)] = np.finfo(F32).max * (1 if rng.random() < 0.5 else -1)
        elif kind == "constant":
            row = np.full(k, rng.standard_normal() * 10.0 ** rng.uniform(-3, 3))
        elif kind == "zero":
            row = np.where(rng.random(k) < 0.5, 0.0, -0.0)
        elif kind == "tiny":  # absmax below the 1e-5 bound
            row = rng.uniform(-1, 1, k) * 9e-6
        elif kind == "clamp":  # absmax exactly the float32 bound
            row = rng.uniform(-1, 1, k) * 1e-5
            row[rng.integers(k)] = 1e-5
        else:
            row = rng.standard_normal(k)
            row[rng.integers(k)] = np.nan if kind == "nan" else np.inf * (1 if rng.random() < 0.5 else -1)
    return row.astype(F32), 0


@st.composite
def activations(draw: st.DrawFn, max_m: int = 9, max_k: int = 300) -> tuple[np.ndarray, int]:
    m = draw(st.integers(1, max_m))
    k = draw(st.one_of(st.integers(1, 20), st.integers(1, max_k)))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=m, max_size=m))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows, hits = zip(*(make_row(kind, rng, k) for kind in kinds), strict=True)
    return np.stack(rows), sum(hits)


@pytest.fixture
def restore_backend():
    saved = kernels.get_backend()
    yield
    kernels.set_backend(saved)


TIE_HITS = {"quantize_rows": 0, "quantize_act": 0}


# ---------------------------------------------------------------------------------------------------------
# The activation quantizer


def test_tie_rows_hit_exact_ties() -> None:
    rng = np.random.default_rng(0)
    x, hits = zip(*(tie_row(rng, 64, float(a)) for a in (4.143383979797363, 0.37, 1234.5, 3e-3)), strict=True)
    assert sum(hits) > 100
    x = np.stack(x)
    q, s = ref_quant(x)
    for row in x:
        inv = F32(127) / max(np.max(np.abs(row)), F32(1e-5))
        frac = np.abs(row * inv) % 1
        assert (frac == 0.5).sum() > 20  # ties under the definition
    assert np.array_equal(q, np.rint(q))


def test_known_tie_absmax_not_127() -> None:
    """fl(127 / a) and 127 * fl(1 / a) differ for this a: the true quotient puts x * inv just below 53.5."""
    x = np.array([[1.745441198348999, 4.143383979797363, -1.745441198348999]], dtype=F32)
    q, s = ref_quant(x)
    assert q[0].tolist() == [53.0, 127.0, -53.0]
    tq, ts = quant.quantize_act(torch.from_numpy(x), 8)
    assert tq[0].tolist() == [53.0, 127.0, -53.0]
    assert_bits_equal(ts.reshape(-1), s, "s")


@SETTINGS
@given(data=activations(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       bits=st.sampled_from([8, 4]), lead=st.sampled_from([(), (2,)]))
def test_quantize_act_matches_reference(data, dtype, bits, lead) -> None:
    x, hits = data
    xt = torch.from_numpy(x).to(dtype)
    xt = xt.reshape(*lead, -1, x.shape[1]) if lead and x.shape[0] % 2 == 0 else xt
    q, s = quant.quantize_act(xt, bits)
    assert q.dtype == dtype and q.shape == xt.shape and s.dtype == torch.float32
    assert s.shape == (*xt.shape[:-1], 1)
    rq, rs = ref_quant(xt.float().reshape(-1, x.shape[1]).numpy(), 2 ** (bits - 1) - 1)
    assert_bits_equal(q.float().reshape(rq.shape), rq, "q")
    assert_bits_equal(s.reshape(-1), rs, "s")
    TIE_HITS["quantize_act"] += hits if dtype == torch.float32 and bits == 8 else 0


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=activations(max_m=12, max_k=600))
def test_quantize_rows_matches_reference(restore_backend, backend, data) -> None:
    x, hits = data
    kernels.set_backend(backend)
    q, s = kernels.quantize_rows(torch.from_numpy(x))
    rq, rs = ref_quant_rows(x)
    assert q.dtype == torch.int8 and np.array_equal(q.numpy(), rq), backend
    assert_bits_equal(s, rs, backend)
    TIE_HITS["quantize_rows"] += hits


def test_ties_were_exercised() -> None:
    """The generated rows did land on rounding ties (run after the property tests above)."""
    if TIE_HITS["quantize_rows"] == 0:
        pytest.skip("runs only after the property tests in this file")
    assert TIE_HITS["quantize_rows"] > 100 and TIE_HITS["quantize_act"] > 10


# ---------------------------------------------------------------------------------------------------------
# The matmul and the fused linear


@st.composite
def layer_shapes(draw: st.DrawFn) -> tuple[int, int, int]:
    m = draw(st.sampled_from([1, 1, 2, 3, 5, 7, 16, 17, 33]))
    k = draw(st.one_of(st.sampled_from([1, 2, 3, 5, 15, 17, 31, 33, 63, 65, 255, 257, 513]), st.integers(1, 700)))
    n = draw(st.one_of(st.sampled_from([1, 3, 5, 15, 17, 31, 33]), st.integers(1, 80)))
    return m, k, n


def _weights(rng: np.random.Generator, n: int, k: int, per_channel: bool, with_bias: bool):
    w = rng.integers(-1, 2, (n, k)).astype(np.int8)
    sw = (rng.uniform(0.1, 2.0, n if per_channel else 1) * 10.0 ** rng.uniform(-3, 1)).astype(F32)
    bias = rng.standard_normal(n).astype(F32) if with_bias else None
    return w, sw, bias


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=layer_shapes(), seed=st.integers(0, 2**32 - 1), per_channel=st.booleans(), with_bias=st.booleans(),
       extreme=st.booleans())
def test_ternary_matmul_matches_reference(restore_backend, backend, shape, seed, per_channel, with_bias,
                                          extreme) -> None:
    m, k, n = shape
    rng = np.random.default_rng(seed)
    if extreme:  # the full int8 range and aligned signs: |acc| up to 128 * K
        xq = np.where(rng.random((m, k)) < 0.5, -128, 127).astype(np.int8)
    else:
        xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    sx = (rng.uniform(0.5, 2.0, m) * 10.0 ** rng.uniform(-4, 1)).astype(F32)
    w, sw, bias = _weights(rng, n, k, per_channel, with_bias)
    if extreme:
        w[:] = np.where(rng.random((n, k)) < 0.9, 1, -1)
    want = ref_matmul(xq, w, sx, sw, bias)
    kernels.set_backend(backend)
    packed = kernels.pack(torch.from_numpy(w))
    got = kernels.ternary_matmul(_t(xq), packed, n, k, _t(sx), _t(sw), _t(bias))
    assert_bits_equal(got, want, (backend, m, k, n))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=layer_shapes(), seed=st.integers(0, 2**32 - 1), per_channel=st.booleans(), with_bias=st.booleans(),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=33, max_size=33))
def test_ternary_linear_matches_reference(restore_backend, backend, shape, seed, per_channel, with_bias,
                                          kinds) -> None:
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x = np.stack([make_row(kind, rng, k)[0] for kind in kinds[:m]])
    w, sw, bias = _weights(rng, n, k, per_channel, with_bias)
    xq, sx = ref_quant_rows(x)
    want = ref_matmul(xq, w, sx, sw, bias)
    kernels.set_backend(backend)
    got = kernels.ternary_linear(_t(x), kernels.pack(torch.from_numpy(w)), n, k, _t(sw), _t(bias))
    assert_bits_equal(got, want, (backend, m, k, n, kinds[:m]))


# ---------------------------------------------------------------------------------------------------------
# BitLinear in every dtype


def ref_weight(w: np.ndarray, measure: str, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ternary ``q`` and float32 ``s`` (``(N,)`` or ``(1,)``) for the selection measures (exact in float32)."""
    a = np.abs(w).reshape(w.shape[0] if per_channel else 1, -1)
    if measure == "absmax":
        m = a.max(axis=1)
    else:  # lower median
        m = np.sort(a, axis=1)[:, (a.shape[1] - 1) // 2]
    s = np.maximum(m, F32(1e-8)).astype(F32)
    with np.errstate(all="ignore"):
        q = np.clip(np.rint(w / (s[:, None] if per_channel else s[0])), -1, 1)
    return q.astype(np.int8), s


@SETTINGS
@given(shape=layer_shapes(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       measure=st.sampled_from(["absmax", "absmedian"]), per_channel=st.booleans(), with_bias=st.booleans(),
       ties=st.booleans())
def test_bitlinear_matches_reference(shape, seed, dtype, measure, per_channel, with_bias, ties) -> None:
    m, k, n = shape
    rng = np.random.default_rng(seed)
    cfg = BitConfig(measure=measure, granularity="channel" if per_channel else "tensor", norm=None,
                    median_sample=0)
    layer = BitLinear(k, n, bias=with_bias, config=cfg, dtype=dtype)
    if ties:
        x = np.stack([tie_row(rng, k, float(F32(rng.uniform(0.5, 8))))[0] for _ in range(m)])
    else:
        x = rng.standard_normal((m, k)).astype(F32) * F32(10.0 ** rng.uniform(-2, 2))
    xt = torch.from_numpy(x).to(dtype)
    y = layer(xt)
    assert y.dtype == dtype
    xf = xt.float().numpy()  # the layer's maths runs on the upcast input and parameters
    wf = layer.weight.detach().float().numpy()
    wq, sw = ref_weight(wf, measure, per_channel)
    xq, sx = ref_quant_rows(xf)
    bias = None if layer.bias is None else layer.bias.detach().float().numpy()
    want = ref_matmul(xq, wq, sx, sw, bias)
    assert_bits_equal(y, torch.from_numpy(want).to(dtype).float().numpy(), (dtype, m, k, n))


# ---------------------------------------------------------------------------------------------------------
# Weight measures at LLM scale


def _lower_median_f64(a: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        a = a.reshape(-1)
        return a.kthvalue((a.numel() - 1) // 2 + 1).values
    return a.kthvalue((a.shape[dim] - 1) // 2 + 1, dim=dim).values


def _prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def test_weight_measures_at_llm_scale_match_float64() -> None:
    """absmean, absmedian (with its strided sample) and absmax of a 4096 x 11008 weight, per tensor, channel
    and group, at 1 and 2 threads: within 1e-6 of float64. (The per-row and per-group medians, exact
    selections whose cost grows with the row count, are checked on the first 512 rows.)"""
    n, k, g, rows = 4096, 11008, 128, 512
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * (torch.rand(k, generator=gen) + 0.5)
    a64 = w.double().abs()
    sample = BitConfig().median_sample
    stride = max(2, n * k // sample)
    while stride > 2 and (k % stride == 0 or not _prime(stride)):
        stride -= 1
    want = {
        ("absmean", "tensor"): a64.mean(), ("absmean", "channel"): a64.mean(1),
        ("absmean", "group"): a64.reshape(n, k // g, g).mean(2),
        ("absmax", "tensor"): a64.max(), ("absmax", "channel"): a64.amax(1),
        ("absmax", "group"): a64.reshape(n, k // g, g).amax(2),
        ("absmedian", "tensor"): _lower_median_f64(a64.reshape(-1)[::stride], None),
        ("absmedian", "channel"): _lower_median_f64(a64[:rows], 1),
        ("absmedian", "group"): _lower_median_f64(a64[:rows].reshape(rows, k // g, g), 2),
    }
    del a64
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for (measure, gran), ref in want.items():
                cfg = BitConfig(weight_bits=1, measure=measure, granularity=("group", g) if gran == "group" else gran)
                sub = w[:rows] if measure == "absmedian" and gran != "tensor" else w
                _, s = quant.quantize_weight(sub, cfg)  # binary weights: the scale is the measure itself
                err = (s.double().reshape(ref.shape) / ref - 1).abs().max().item()
                assert err < 1e-6, (t, measure, gran, err)
    finally:
        torch.set_num_threads(threads)
