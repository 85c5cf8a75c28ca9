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


def test_frozen_weight_exposes_shape_dtype_device_only():
    import numpy as np

    torch.manual_seed(5)
    layer, frozen = _pair(10, 6, granularity="channel")
    w = frozen.weight
    assert not isinstance(w, torch.Tensor)  # model code guarded by isinstance(weight, Tensor) skips it
    assert w.shape == (6, 10) and w.size() == (6, 10) and w.size(1) == 10 and w.dim() == w.ndim == 2
    assert w.dtype == torch.float32 and w.device == torch.device("cpu") and w.numel() == 60
    assert not w.requires_grad and not w.is_meta and "packed ternary" in repr(w)
    deq = frozen.dequantized_weight()
    assert deq.dtype == torch.float32 and torch.equal(deq, layer.quantized_weight())
    assert torch.equal(w.dequantize(), deq)
    x = torch.randn(3, 10)
    for use in (lambda: x @ w, lambda: nn.functional.linear(x, w), lambda: torch.matmul(x, w),
                lambda: w * 2, lambda: np.asarray(w)):
        with pytest.raises(TypeError, match="packed ternary.*dequantized_weight"):
            use()
    for name in ("t", "data", "float", "T"):
        with pytest.raises(AttributeError, match=f"no attribute '{name}'.*dequantized_weight"):
            getattr(w, name)
    assert frozen.to(torch.bfloat16).weight.dtype == torch.bfloat16
    assert frozen.half().weight.dtype == torch.float16 and frozen.float().weight.dtype == torch.float32
    assert freeze(copy.deepcopy(layer).to(torch.bfloat16)).weight.dtype == torch.bfloat16


def test_frozen_t5_runs_where_it_reads_the_weight():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)
    torch.manual_seed(6)
    model = quantize(transformers.T5ForConditionalGeneration(cfg)).eval()
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=ids).logits
    want_grad_mode = model(input_ids=ids, decoder_input_ids=ids).logits  # attention takes another path
    freeze(model)  # T5's feed-forward reads wo.weight.dtype
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, TernaryLinear)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, want)
    assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, want_grad_mode)


def _input_grad(module, x, backend):
    from tritium import kernels

    before = kernels.get_backend()
    kernels.set_backend(backend)
    try:
        x = x.detach().clone().requires_grad_(True)
        y = module(x)
        (y * torch.arange(y.shape[-1], dtype=y.dtype)).sum().backward()
        return y.detach(), x.grad
    finally:
        kernels.set_backend(before)


def test_straight_through_gradient_same_on_every_backend():
    from tritium import kernels

    torch.manual_seed(7)
    layer, frozen = _pair(37, 11, granularity="channel")
    x = torch.randn(2, 5, 37)
    want_y, want_dx = _input_grad(layer, x, "reference")  # BitLinear: dx = dy @ (q s), through the norm
    with torch.no_grad():
        frozen_y = frozen(x)
    grads = {}
    for backend in kernels.available_backends():
        y, dx = _input_grad(frozen, x, backend)
        assert torch.equal(y, frozen_y) and torch.equal(y, want_y)  # tracking gradients changes nothing
        grads[backend] = dx
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)  # the same maths, other rounding
    assert all(torch.equal(g, grads["reference"]) for g in grads.values())
    assert list(frozen.parameters()) == []  # nothing to train: no weight gradient
    compiled = torch.compile(frozen, backend="aot_eager", fullgraph=True)
    y, dx = _input_grad(compiled, x, kernels.available_backends()[0])
    assert torch.equal(y, frozen_y) and torch.equal(dx, grads["reference"])
    xb = x.to(torch.bfloat16).requires_grad_(True)
    frozen(xb).sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_gradient_through_frozen_model_to_earlier_parameters():
    from tritium import kernels

    torch.manual_seed(8)
    emb = nn.Embedding(10, 16)
    model = nn.Sequential(emb, nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    quantize(model, include=r"^[13]$")
    freeze(model.eval())
    ids = torch.randint(0, 10, (3, 5))
    grads, before = [], kernels.get_backend()
    try:
        for backend in kernels.available_backends():
            emb.weight.grad = None
            kernels.set_backend(backend)
            model(ids).square().sum().backward()
            grads.append(emb.weight.grad.clone())
    finally:
        kernels.set_backend(before)
    assert grads[0].abs().sum() > 0 and all(torch.equal(g, grads[0]) for g in grads)


def test_freeze_refuses_in_features_above_kernel_limit():
    from tritium import kernels

    model = nn.Sequential(BitLinear(kernels.MAX_K + 1, 2, device="meta"))
    with pytest.raises(ValueError, match=rf"cannot freeze '0'.*in_features={kernels.MAX_K + 1}.*at most"):
        freeze(model)
    with pytest.warns(UserWarning, match="kept as BitLinear"):
        freeze(model, strict=False)
    torch.manual_seed(9)
    layer, frozen = _pair(kernels.MAX_K, 2, bias=False)  # the largest K the kernels take
    x = torch.randn(2, kernels.MAX_K)
    with torch.no_grad():
        assert torch.equal(frozen(x), layer(x))


def test_loaded_frozen_layer_reports_the_skeleton_weight_dtype(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    freeze(quantize(model).to(torch.bfloat16))
    assert model[0].weight.dtype == torch.bfloat16
    tritium.save(model, tmp_path / "m.safetensors")
    skeleton = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to("meta", torch.bfloat16)
    loaded = tritium.load(tmp_path / "m.safetensors", model=skeleton)
    assert isinstance(loaded[2], TernaryLinear) and loaded[2].weight.dtype == torch.bfloat16
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), model(x))
