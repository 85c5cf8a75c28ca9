"""Packed ternary kernels: every backend bit-exact against the reference, and the reference against
an independent int64 formula; pack/unpack, dispatch, fallback, torch.compile and the quick benchmark."""

from __future__ import annotations

import argparse
import json
import warnings

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
    assert len(saved["rows"]) == 2 and saved["bandwidth_gb_s"] > 0
    assert all(r["tritium_ms"] > 0 for r in saved["rows"])
