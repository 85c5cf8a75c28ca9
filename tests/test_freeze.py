"""`freeze` and `TernaryLinear`: frozen outputs equal the QAT model's eval outputs bit for bit."""

import copy
import itertools

import pytest
import torch
from torch import nn

import tritium
from tritium import BitConfig, BitLinear, TernaryLinear, freeze, quantize


def _pair(k, n, bias=True, **cfg):
    layer = BitLinear(k, n, bias=bias, config=BitConfig(**cfg)).eval()
    with torch.no_grad():
        layer.weight.mul_(torch.rand(n, 1) * 3)  # uneven row norms, so channel scales differ
        if bias:
            layer.bias.normal_()
    return layer, freeze(copy.deepcopy(layer))


@pytest.mark.parametrize(
    "norm,granularity,bias,measure",
    [(n, g, b, m) for n, g, b in itertools.product(("layernorm", "rmsnorm", None), ("tensor", "channel"),
                                                  (True, False)) for m in ("absmedian",)]
    + [("layernorm", "channel", True, "absmean"), (None, "tensor", False, "absmax")],
)
def test_layer_bit_exact(norm, granularity, bias, measure):
    torch.manual_seed(0)
    layer, frozen = _pair(37, 11, bias, norm=norm, granularity=granularity, measure=measure)
    assert isinstance(frozen, TernaryLinear)
    for shape in [(5, 37), (2, 3, 37), (37,), (0, 37), (2, 0, 37), (1, 1, 1, 37)]:
        x = torch.randn(shape) * 4
        with torch.no_grad():
            want = layer(x)
        got = frozen(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want), (shape, (got - want).abs().max())


def test_large_layer_bit_exact_and_no_latent_weight():
    torch.manual_seed(1)
    layer, frozen = _pair(515, 130, granularity="channel")
    x = torch.randn(9, 515)
    with torch.no_grad():
        assert torch.equal(frozen(x), layer(x))
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight_packed", "weight_scale", "bias"}
    assert frozen.weight_packed.dtype == torch.uint8 and frozen.weight_packed.shape == (130, 129)
    assert frozen.weight_scale.shape == (130,)


def test_qat_trained_model_bit_exact():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 48), nn.GELU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5))
    quantize(model, "1.58-absmean-channel")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
    frozen = freeze(model)
    assert frozen is model
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert sum(isinstance(m, TernaryLinear) for m in model.modules()) == 3
    assert list(model.parameters()) == []
    assert torch.equal(model(x), want)


def test_grad_modes_and_compile():
    torch.manual_seed(3)
    layer, frozen = _pair(24, 8)
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = layer(x)
    with torch.inference_mode():
        assert torch.equal(frozen(x), want)
    assert torch.equal(frozen(x), want)
    compiled = torch.compile(frozen, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), want)


def test_half_precision_inputs():
    torch.manual_seed(4)
    layer, frozen = _pair(40, 12)
    frozen.to(torch.bfloat16)  # scale and bias stay float32
    assert frozen.weight_scale.dtype == torch.float32 and frozen.bias.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(4, 40).to(dtype)
        with torch.no_grad():
            want = layer(x.float()).to(dtype)
            qat = copy.deepcopy(layer).to(dtype)(x)
        got = frozen(x)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.allclose(got.float(), qat.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("spec,why", [
    ("2-absmax", "weight_bits"), ("1.58-absmean-a4", "act_bits"), ("1.58-absmean-afp", "act_bits"),
    ("1.58-absmax-group8", "granularity"), ("1-absmean", "weight_bits"),
])
def test_unsupported_configs_raise_naming_layer(spec, why):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    quantize(model, spec)
    with pytest.raises(ValueError, match=rf"'0'.*{spec}.*{why}"):
        freeze(model)
    with pytest.warns(UserWarning, match="kept as BitLinear"):
        freeze(model, strict=False)
    assert isinstance(model[0], BitLinear)


def test_warmup_lambda_raises_and_root_layer():
    layer = BitLinear(8, 4, config=BitConfig(lambda_=0.5))
    with pytest.raises(ValueError, match="lambda_=0.5"):
        freeze(layer)
    layer.config = layer.config.replace(lambda_=1.0)
    assert isinstance(tritium.freeze(layer), TernaryLinear)


def test_wrong_input_raises():
    _, frozen = _pair(8, 4)
    with pytest.raises(ValueError, match="last dimension 8"):
        frozen(torch.randn(2, 9))
    with pytest.raises(ValueError, match="floating-point"):
        frozen(torch.ones(2, 8, dtype=torch.int64))


def test_strict_failure_leaves_model_untouched():
    model = nn.Sequential(BitLinear(8, 8), BitLinear(8, 4, config=BitConfig(weight_bits=4)))
    with pytest.raises(ValueError, match="cannot freeze '1'"):
        freeze(model)
    assert all(isinstance(m, BitLinear) for m in model)
