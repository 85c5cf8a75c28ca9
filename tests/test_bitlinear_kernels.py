"""BitLinear on the packed ternary CPU kernels: bit-identical to its F.linear form (forced with the
reference backend), forward and gradients, every dtype, under autocast and torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tritium.kernels as K
from tritium import BitConfig, BitLinear, parse_spec

NATIVE = [b for b in K.available_backends() if b != "reference"]
pytestmark = pytest.mark.skipif(not NATIVE, reason="compiled kernels unavailable")


@pytest.fixture(autouse=True)
def _restore_backend():
    before = K.get_backend()
    yield
    K.set_backend(before)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the layer forwards that ran on the kernels."""
    calls: list[int] = []
    real = K.ternary_matmul

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "ternary_matmul", counted)
    return calls


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal bit patterns (the sign of zero included), NaN in the same places."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(view)[~nan], b.view(view)[~nan])


def _step(layer: nn.Module, x: torch.Tensor, backend: str, autocast: torch.dtype | None = None):
    """Output and gradients of x and of every parameter for one forward and backward on ``backend``."""
    K.set_backend(backend)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = layer(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)  # distinct output gradients
    y.backward(g)
    return [y.detach(), x.grad, *(p.grad for p in layer.parameters())]


def _assert_paths_agree(layer: nn.Module, x: torch.Tensor, calls: list[int], autocast=None) -> None:
    before = len(calls)
    slow = _step(layer, x, "reference", autocast)
    assert len(calls) == before  # the reference backend takes the F.linear form
    fast = _step(layer, x, NATIVE[0], autocast)
    assert len(calls) > before  # the native backend takes the kernels
    for what, a, b in zip(("y", "dx", "dW", "db"), slow, fast, strict=False):
        assert _same_bits(a, b), what
    assert len(slow) == len(fast)


CONFIGS = ["1.58-absmedian", "1.58-absmean", "1.58-absmax", "1.58-absmedian-channel", "1.58-absmean-channel"]
SHAPES = [((1, 7), 9), ((3, 5, 33), 17), ((0, 16), 8), ((2, 0, 12), 3), ((4, 1027), 65), ((130, 259), 31),
          ((1, 1), 1), ((6, 64), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", CONFIGS)
def test_kernel_path_is_bit_identical(dtype, spec, kernel_calls):
    torch.manual_seed(1)
    for i, (shape, n) in enumerate(SHAPES):
        layer = BitLinear(shape[-1], n, bias=i % 2 == 0, config=parse_spec(spec), dtype=dtype)
        x = (torch.randn(shape) * 3).to(dtype)
        _assert_paths_agree(layer, x, kernel_calls)


@pytest.mark.parametrize("norm", [None, "rmsnorm"])
def test_kernel_path_nan_inf_tokens_zero_sums_and_negative_zero_bias(norm, kernel_calls):
    """NaN/inf tokens give NaN rows; zero sums are +0 also with a -0 bias (both forms)."""
    torch.manual_seed(2)
    layer = BitLinear(40, 12, config=BitConfig(norm=norm, granularity="channel"))
    with torch.no_grad():
        layer.weight[:4] = 0  # all-zero rows: zero sums
        layer.bias[:] = -0.0
        layer.bias[6:] = torch.randn(6)
    x = torch.randn(6, 40)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = float("-inf")
    x[4] = 0  # an all-zero token
    _assert_paths_agree(layer, x, kernel_calls)
    K.set_backend(NATIVE[0])
    y = layer(x)
    assert y[1:4].isnan().all() and not y[[0, 4, 5]].isnan().any()
    zero = y[[0, 4, 5], :4]
    assert torch.equal(zero, torch.zeros_like(zero)) and not zero.signbit().any()


def test_kernel_path_nan_and_inf_weights(kernel_calls):
    """A NaN or inf weight (with an exact median that still sees the others) gives the F.linear result."""
    for spec, bad in [("1.58-absmedian", float("nan")), ("1.58-absmedian-channel", float("nan")),
                      ("1.58-absmean", float("inf")), ("1.58-absmax-channel", float("inf"))]:
        layer = BitLinear(32, 8, config=parse_spec(spec))
        with torch.no_grad():
            layer.weight[2, 5] = bad
        x = torch.randn(3, 32)
        with torch.no_grad():
            K.set_backend("reference")
            want = layer(x)
            K.set_backend(NATIVE[0])
            assert _same_bits(layer(x), want) and want.isnan().any(), spec
    assert len(kernel_calls) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_path_under_autocast(dtype, kernel_calls):
    torch.manual_seed(3)
    model = nn.Sequential(BitLinear(48, 64), nn.GELU(),
                          BitLinear(64, 24, config=parse_spec("1.58-absmean-channel")))
    x = torch.randn(2, 9, 48)
    slow = _step(model, x, "reference", dtype)
    fast = _step(model, x, NATIVE[0], dtype)
    assert slow[0].dtype == dtype and len(kernel_calls) == 2
    assert len(slow) == 6 and all(_same_bits(a, b) for a, b in zip(slow, fast, strict=True))


def test_kernel_path_real_size(kernel_calls):
    """A LLaMA-7B MLP projection, 256 tokens: 4096 -> 11008."""
    torch.manual_seed(4)
    layer = BitLinear(4096, 11008, bias=False)
    _assert_paths_agree(layer, torch.randn(256, 4096), kernel_calls)


def test_other_configs_take_f_linear(kernel_calls):
    """Group scales, other bit widths, a warm-up blend and 4-bit or float activations keep the F.linear form."""
    K.set_backend(NATIVE[0])
    for cfg in (parse_spec("1.58-absmean-group8"), parse_spec("4-absmax"), parse_spec("1-absmean"),
                BitConfig(lambda_=0.5), BitConfig(act_bits=4), BitConfig(act_bits=None)):
        BitLinear(16, 4, config=cfg)(torch.randn(3, 16))
    assert not kernel_calls
    BitLinear(16, 4)(torch.randn(3, 16))
    assert len(kernel_calls) == 1


def test_kernel_path_with_every_backend(kernel_calls):
    torch.manual_seed(5)
    layer = BitLinear(300, 70, config=parse_spec("1.58-absmean-channel"))
    x = torch.randn(37, 300)
    want = _step(layer, x, "reference")
    for backend in NATIVE:
        got = _step(layer, x, backend)
        assert all(_same_bits(a, b) for a, b in zip(want, got, strict=True)), backend


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_kernel_path_compiles_without_graph_breaks(backend, kernel_calls):
    """fullgraph=True: the kernels are torch.library custom ops. The compiled forward and gradients match
    eager's bit for bit (absmax and no norm: no float reduction the compiler could reorder)."""
    torch.manual_seed(6)
    cfg = BitConfig(measure="absmax", granularity="channel", norm=None)
    model = nn.Sequential(BitLinear(24, 32, config=cfg), nn.ReLU(), BitLinear(32, 8, bias=False, config=cfg))
    x = torch.randn(5, 24)
    eager = _step(model, x, NATIVE[0])
    got = _step(torch.compile(model, fullgraph=True, backend=backend), x, NATIVE[0])
    assert len(kernel_calls) >= 2
    assert len(got) == 5 and all(_same_bits(a, b) for a, b in zip(eager, got, strict=True))
