"""BitLinear against an independent reference written here, STE gradients, edge cases, compile."""

import copy
import itertools

import pytest
import torch
from torch import nn

from tritium import BitConfig, BitLinear, parse_spec

# ---------------------------------------------------------------------------------------------
# Independent reference (plain loops over the definitions; shares no code with tritium.quant)


def ref_measure(a: torch.Tensor, measure: str) -> torch.Tensor:
    a = a.abs().double()
    if measure == "absmean":
        return a.mean()
    if measure == "absmax":
        return a.max()
    v = a.flatten().sort().values
    return v[(v.numel() - 1) // 2]  # lower median


def ref_weight(w: torch.Tensor, cfg: BitConfig) -> torch.Tensor:
    """Dequantized weight, block by block."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    if cfg.granularity == "tensor":
        blocks = [(slice(None), slice(None))]
    elif cfg.granularity == "channel":
        blocks = [(i, slice(None)) for i in range(n)]
    else:
        g = cfg.group_size
        blocks = [(i, slice(j, j + g)) for i in range(n) for j in range(0, k, g)]
    for b in blocks:
        blk = w[b].double()
        m = ref_measure(blk, cfg.measure)
        if cfg.weight_bits == 1:
            out[b] = torch.where(blk >= 0, 1.0, -1.0) * m
            continue
        if cfg.weight_bits == 1.58:
            s, lo, hi = max(m.item(), 1e-8), -1, 1
        else:
            half = 2 ** (cfg.weight_bits - 1)
            s, lo, hi = max(m.item(), 1e-8) / half, -half, half - 1
        s = torch.tensor(s, dtype=torch.float32).double()  # the scale is a float32 number
        out[b] = torch.clamp(torch.round(blk / s), lo, hi) * s
    return out


def ref_act(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    if bits is None:
        return x.double()
    qmax = 2 ** (bits - 1) - 1
    a = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    big_q = torch.full_like(a, qmax)  # true divisions, as the definition (not a reciprocal multiply)
    return (torch.clamp(torch.round(x * (big_q / a)), -qmax, qmax) * (a / big_q)).double()


def ref_forward(x, w, b, cfg: BitConfig) -> torch.Tensor:
    if cfg.norm == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + 1e-5)
    elif cfg.norm == "rmsnorm":
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    y = ref_act(x, cfg.act_bits) @ ref_weight(w, cfg).t()
    return y + b.double() if b is not None else y


CONFIGS = [
    BitConfig(weight_bits=wb, measure=m, granularity=g, act_bits=a, norm=nm)
    for wb, m, g, a, nm in itertools.product(
        (1.58, 1, 2, 4, 8), ("absmedian", "absmean", "absmax"), ("tensor", "channel", ("group", 8)),
        (8, 4, None), ("layernorm",),
    )
] + [BitConfig(norm=n) for n in ("rmsnorm", None)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.spec}-{c.norm}")
def test_forward_matches_reference(cfg):
    torch.manual_seed(0)
    layer = BitLinear(32, 12, config=cfg)
    x = torch.randn(3, 5, 32) * 3
    y = layer(x)
    ref = ref_forward(x, layer.weight.detach(), layer.bias.detach(), cfg)
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_ternary_values_and_scale():
    torch.manual_seed(1)
    for measure in ("absmedian", "absmean", "absmax"):
        layer = BitLinear(64, 16, config=BitConfig(measure=measure))
        wq = layer.quantized_weight()
        scale = ref_measure(layer.weight.detach(), measure).float()
        assert set(torch.unique(wq / scale).round().tolist()) <= {-1.0, 0.0, 1.0}
        torch.testing.assert_close(wq, torch.round(wq / scale) * scale)


def test_bias_added_after_rescale():
    layer = BitLinear(8, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    y = layer(torch.randn(5, 8) * 100)
    assert torch.equal(y, layer.bias.expand(5, 4))


def test_train_and_eval_identical_and_deterministic():
    torch.manual_seed(2)
    layer = BitLinear(16, 8)
    x = torch.randn(4, 16)
    y_train = layer(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)
    assert torch.equal(layer(x), y_eval)


def test_ste_gradients_analytic():
    torch.manual_seed(3)
    cfg = BitConfig(norm=None, measure="absmean")
    layer = BitLinear(16, 6, config=cfg)
    x = torch.randn(5, 16, requires_grad=True)
    dy = torch.randn(5, 6)
    layer(x).backward(dy)
    wq = ref_weight(layer.weight.detach(), cfg).float()
    xq = ref_act(x.detach(), 8).float()
    torch.testing.assert_close(x.grad, dy @ wq)
    torch.testing.assert_close(layer.weight.grad, dy.t() @ xq)
    torch.testing.assert_close(layer.bias.grad, dy.sum(0))


@pytest.mark.parametrize("spec", ["1.58-absmedian-group8", "1.58-absmean-afp", "4-absmax-channel"])
def test_ste_gradients_other_paths(spec):
    cfg = parse_spec(spec).replace(norm=None)
    torch.manual_seed(4)
    layer = BitLinear(16, 6, config=cfg)
    x = torch.randn(2, 3, 16, requires_grad=True)
    dy = torch.randn(2, 3, 6)
    layer(x).backward(dy)
    wq = ref_weight(layer.weight.detach(), cfg).float()
    xq = ref_act(x.detach(), cfg.act_bits).float()
    torch.testing.assert_close(x.grad, dy @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, dy.reshape(-1, 6).t() @ xq.reshape(-1, 16), rtol=1e-5, atol=1e-5)


def test_gradient_through_norm_matches_autograd_reference():
    torch.manual_seed(5)
    layer = BitLinear(16, 6)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    # reference: STE via the detach trick on top of autograd's layer norm
    x2 = x.detach().clone().requires_grad_()
    xn = torch.nn.functional.layer_norm(x2, (16,))
    xq = xn + (ref_act(xn.detach(), 8).float() - xn).detach()
    w = layer.weight.detach().clone().requires_grad_()
    wq = w + (ref_weight(w.detach(), layer.config).float() - w).detach()
    (xq @ wq.t() + layer.bias.detach()).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-4, atol=1e-5)


def test_lambda_blend():
    torch.manual_seed(6)
    x = torch.randn(3, 16)
    for lam in (0.0, 0.3, 1.0):
        cfg = BitConfig(lambda_=lam, norm=None)
        layer = BitLinear(16, 4, config=cfg)
        w = layer.weight.detach().double()
        w_used = w + lam * (ref_weight(layer.weight.detach(), cfg) - w)
        x_used = x.double() + lam * (ref_act(x, 8) - x.double())
        ref = x_used @ w_used.t() + layer.bias.detach().double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_with_nn_linear():
    lin = nn.Linear(10, 7)
    bit = BitLinear(10, 7)
    bit.load_state_dict(lin.state_dict())
    assert set(bit.state_dict()) == {"weight", "bias"}
    lin2 = nn.Linear(10, 7)
    lin2.load_state_dict(bit.state_dict())
    assert torch.equal(lin2.weight, lin.weight) and torch.equal(lin2.bias, lin.bias)
    assert torch.equal(BitLinear.from_linear(lin).weight, lin.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    torch.manual_seed(7)
    layer = BitLinear(32, 8, dtype=dtype)
    x = torch.randn(4, 32, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    ref = ref_forward(x.detach().float(), layer.weight.detach().float(), layer.bias.detach().float(), layer.config)
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="weight_bits"):
        BitConfig(weight_bits=3)
    with pytest.raises(ValueError, match="measure"):
        BitConfig(measure="median")
    with pytest.raises(ValueError, match="granularity"):
        BitConfig(granularity="row")
    with pytest.raises(ValueError, match="group size 5 does not divide in_features=16"):
        BitLinear(16, 4, config=BitConfig(granularity=("group", 5)))
    layer = BitLinear(16, 4)
    with pytest.raises(ValueError, match="expected in_features=16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 16, dtype=torch.long))


def test_edge_cases():
    layer = BitLinear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    y = layer(torch.randn(3, 8))
    assert torch.equal(y, torch.zeros(3, 4))  # all-zero weights: zeros, not NaN
    y.sum().backward()
    layer = BitLinear(8, 4)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()  # NaN stays in its token


def test_repr_shows_config():
    r = repr(BitLinear(4, 2, config=BitConfig(measure="absmean", granularity="channel")))
    assert "1.58-absmean-channel" in r and "layernorm" in r


def test_torch_compile_no_graph_breaks():
    torch.manual_seed(8)
    model = nn.Sequential(BitLinear(16, 32), nn.GELU(), BitLinear(32, 4))
    x = torch.randn(5, 16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("spec", ["1.58-absmedian", "1.58-absmean-group8", "4-absmax-channel"])
def test_autocast_bf16_forward_backward(spec):
    torch.manual_seed(9)
    model = nn.Sequential(BitLinear(16, 32, config=parse_spec(spec)), nn.GELU(),
                          BitLinear(32, 4, config=parse_spec(spec)))
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and model[0].weight.grad.dtype == torch.float32
    ref = model(x.detach())  # fp32 forward: autocast only rounds the matmul
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Low-precision dtypes: the float32 maths, rounded once


def _fp32_copy(layer: BitLinear) -> BitLinear:
    return copy.deepcopy(layer).float()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.view(view)[~a.isnan()], b.view(view)[~b.isnan()])


LOW_CONFIGS = [
    BitConfig(), BitConfig(measure="absmean", granularity="channel"), BitConfig(norm="rmsnorm", act_bits=4),
    BitConfig(weight_bits=4, measure="absmax", granularity=("group", 8)), BitConfig(act_bits=None, norm=None),
    BitConfig(lambda_=0.5), BitConfig(weight_bits=1, measure="absmean", norm=None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", LOW_CONFIGS, ids=lambda c: f"{c.spec}-{c.norm}-{c.lambda_}")
def test_low_precision_is_fp32_rounded_once(dtype, cfg):
    torch.manual_seed(10)
    layer = BitLinear(48, 20, config=cfg, dtype=dtype)
    ref = _fp32_copy(layer)
    x = (torch.randn(2, 7, 48) * 4).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    assert _same_bits(y, ref(x.detach().float()).to(dtype))
    y.float().square().sum().backward()  # straight-through gradients, in the parameters' dtypes
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    assert torch.isfinite(x.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_fp32_rounded_once(dtype):
    torch.manual_seed(11)
    model = nn.Sequential(BitLinear(32, 24), nn.GELU(), BitLinear(24, 8, config=BitConfig(granularity="channel")))
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = model[0](x)
        z = model(x)
    assert y.dtype == dtype and z.dtype == dtype
    assert _same_bits(y, model[0](x).to(dtype))
    z.float().sum().backward()
    assert x.grad.dtype == torch.float32 and model[0].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_integer_product_does_not_overflow(dtype):
    """127 * 1024 aligned products exceed fp16's range (65504); the layer keeps them in float32."""
    layer = BitLinear(1024, 3, bias=False, config=BitConfig(norm=None), dtype=dtype)
    with torch.no_grad():
        layer.weight.fill_(0.02)
    x = torch.full((2, 1024), 0.5, dtype=dtype)
    y = layer(x)  # acc = 127 * 1024 = 130048, then * (0.5 / 127) * 0.02 = 10.24
    want = _fp32_copy(layer)(x.float())
    assert torch.isfinite(y).all() and _same_bits(y, want.to(dtype))
    torch.testing.assert_close(want, torch.full((2, 3), 1024 * 0.5 * 0.02), rtol=1e-2, atol=0)


def test_zero_sized_layers_work_like_linear():
    for k, n in ((0, 4), (4, 0), (0, 0)):
        layer, lin = BitLinear(k, n), nn.Linear(k, n)
        with torch.no_grad():
            lin.bias.copy_(layer.bias)
        x = torch.randn(3, k, requires_grad=True)
        y = layer(x)
        assert y.shape == lin(x).shape == (3, n)
        assert torch.equal(y, lin(x))  # the bias (in_features = 0) or empty
        y.sum().backward()
        assert x.grad.shape == (3, k) and layer.weight.grad.shape == (n, k)
        assert torch.equal(layer.bias.grad, torch.full((n,), 3.0))
        for spec in ("1.58-absmean-channel", "4-absmax-group2", "1-absmedian"):
            BitLinear(k, n, config=parse_spec(spec))(torch.randn(2, k)).sum()


@pytest.mark.parametrize("args, error, match", [
    ((-1, 4), ValueError, "in_features=-1"), ((4, -2), ValueError, "out_features=-2"),
    ((4.0, 4), TypeError, "in_features=4.0"), ((4, True), TypeError, "out_features=True"),
    (("4", 4), TypeError, "in_features='4'"),
])
def test_bad_features_raise(args, error, match):
    with pytest.raises(error, match=match):
        BitLinear(*args)
    with pytest.raises(TypeError, match="config must be a BitConfig"):
        BitLinear(4, 4, config="1.58")


def test_zero_output_is_positive_zero():
    """A product that sums to zero gives +0, as the integer kernels do (not -0 from -127 * 0)."""
    layer = BitLinear(3, 1, bias=False, config=BitConfig(measure="absmax", granularity="channel", norm=None))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 1.0]]))
    y = layer(torch.tensor([[-1.0, -1.0, -1e-9]]))
    assert y.item() == 0 and not torch.signbit(y).any()


def test_inductor_matches_eager_bit_for_bit():
    """The quantizers and the rescale compile to the same float32 operations (a float reduction such as
    layernorm or absmean may be reordered by the compiler, so this uses neither)."""
    torch.manual_seed(12)
    layer = BitLinear(96, 40, config=BitConfig(measure="absmax", granularity="channel", norm=None))
    a = torch.tensor(4.143383979797363)
    x = torch.randn(17, 96)
    x = x / x.abs().amax(-1, keepdim=True) * a
    x[:, 0] = torch.tensor(1.745441198348999)  # a rounding tie of the float32 definition
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    assert _same_bits(compiled, eager)
