"""`tritium.quantize` on plain nn, transformers (built from configs, no download) and PyG models; PTQ."""

import pytest
import torch
from torch import nn

import tritium
from tritium import BitConfig, BitLinear
from tritium.nn import BitConv1D


def count(model, cls=BitLinear):
    return sum(isinstance(m, cls) for m in model.modules())


def test_plain_model_in_place_and_summary(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    w0 = model[0].weight
    out = tritium.quantize(model, "1.58-absmean", verbose=True)
    assert out is model and count(model) == 2
    assert model[0].weight is w0  # parameters are shared, not copied
    assert model[0].config == BitConfig(measure="absmean")
    s = tritium.summary(model)
    assert s.quantized_params == 8 * 16 + 16 * 4 and s.kept_params == 16 + 4
    expected = (s.quantized_params * 1.58 + s.kept_params * 32) / (s.quantized_params + s.kept_params)
    assert s.bits_per_weight == pytest.approx(expected)
    assert "2 layers converted" in capsys.readouterr().out
    assert model(torch.randn(3, 8)).shape == (3, 4)


def test_include_exclude_and_float_spec():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    tritium.quantize(model, include=r"^[01]$", exclude=r"^1$")
    assert [type(m) for m in model] == [BitLinear, nn.Linear, nn.Linear]
    model = nn.Sequential(nn.Linear(4, 4))
    tritium.quantize(model, "fp32")
    assert count(model) == 0
    with pytest.raises(ValueError, match="bad precision spec"):
        tritium.quantize(model, "1.58-absfoo")
    with pytest.raises(TypeError):
        tritium.quantize(model, 1.58)


def test_multihead_attention_is_skipped_with_warning():
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        tritium.quantize(model)
    assert isinstance(model.linear1, BitLinear) and not isinstance(model.self_attn.out_proj, BitLinear)


def test_ptq_removes_norm_and_quantizes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(4, 8)
    w = model[0].weight.detach().clone()
    tritium.ptq(model, "1.58-absmean")
    assert not model.training and model[0].config.norm is None
    s = w.abs().mean()
    wq = torch.clamp(torch.round(w / s), -1, 1) * s
    a = x.abs().amax(-1, keepdim=True)
    ref = torch.round(x * (127 / a)) * (a / 127) @ wq.t() + model[0].bias
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_lambda_warmup():
    model = tritium.quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    warm = tritium.LambdaWarmup(model, steps=4)
    assert all(m.config.lambda_ == 0.0 for m in model)
    values = [warm.step() for _ in range(5)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0]
    warm2 = tritium.LambdaWarmup(model, steps=4)
    warm2.load_state_dict({"steps": 4, "start": 0.0, "count": 2})
    assert model[1].config.lambda_ == 0.5


transformers = pytest.importorskip("transformers")


def _tiny(arch):
    t = transformers
    if arch == "bert":
        cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32)
        return t.BertForMaskedLM(cfg), 2 * 6 + 1  # q k v o, intermediate, output per layer + mlm transform
    if arch == "t5":
        cfg = t.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=2)
        return t.T5ForConditionalGeneration(cfg), 2 * (4 + 2) + 2 * (4 + 4 + 2)
    if arch == "gpt2":
        cfg = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        return t.GPT2LMHeadModel(cfg), 2 * 4
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return t.LlamaForCausalLM(cfg), 2 * 7


@pytest.mark.parametrize("arch", ["bert", "t5", "gpt2", "llama"])
def test_transformers_models(arch):
    torch.manual_seed(2)
    model, n_linear = _tiny(arch)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head.weight is emb
    tritium.quantize(model)
    assert count(model) == n_linear
    assert not isinstance(model.get_output_embeddings(), BitLinear)  # heads stay full precision
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 64, (2, 8))
    kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
    out = model(input_ids=ids, labels=ids, **kwargs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, BitLinear))
    s = tritium.summary(model)
    assert len(s.layers) == n_linear and s.quantized_params > 0


def test_gpt2_conv1d_equivalent_weights():
    t = transformers
    torch.manual_seed(3)
    cfg = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = t.GPT2LMHeadModel(cfg)
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    y_fp = conv(x)
    tritium.quantize(model, BitConfig(weight_bits=8, measure="absmax", act_bits=None, norm=None))
    bl = model.transformer.h[0].mlp.c_fc
    assert isinstance(bl, BitConv1D) and bl.weight is conv.weight and bl.weight.shape == (32, 128)
    assert (bl.in_features, bl.out_features, bl.nx, bl.nf) == (32, 128, 32, 128)
    torch.testing.assert_close(bl(x), y_fp, rtol=0.02, atol=0.02)  # 8-bit weights: close to fp
    twin = BitLinear(32, 128, config=bl.config)  # the same function with the weight in Linear layout
    with torch.no_grad():
        twin.weight.copy_(conv.weight.t())
        twin.bias.copy_(conv.bias)
    assert torch.equal(bl(x), twin(x)) and torch.equal(bl.quantized_weight(), twin.quantized_weight())
    other = BitConv1D.from_linear(twin, bl.config)
    assert other.weight.shape == (32, 128) and torch.equal(other(x), twin(x))
    bl.config = twin.config = BitConfig()
    frozen = tritium.freeze(bl)
    assert frozen.weight.shape == (128, 32) and torch.equal(frozen.dequantized_weight(), twin.quantized_weight())
    with torch.no_grad():
        assert torch.equal(frozen(x), twin(x))


def test_tied_lm_head_when_included():
    t = transformers
    cfg = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = t.GPT2LMHeadModel(cfg)
    tritium.quantize(model, exclude=[])
    assert isinstance(model.lm_head, BitLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_pyg_gcn():
    pyg = pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GCNConv, SGConv

    torch.manual_seed(4)
    x = torch.randn(10, 6)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])

    class GCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.sgc = GCNConv(6, 8), GCNConv(8, 3), SGConv(3, 3, K=2)

        def forward(self, x, ei):
            return self.sgc(self.c2(self.c1(x, ei).relu(), ei), ei)

    model = GCN()
    tritium.quantize(model)
    assert count(model) == 3
    assert isinstance(model.c1.lin, BitLinear) and model.c1.bias is not None
    out = model(x, edge_index)
    assert out.shape == (10, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.c1.lin.weight.grad is not None
    assert pyg is not None


def test_quantize_a_bare_layer_raises():
    with pytest.raises(TypeError, match=r"Linear.*BitLinear\.from_linear"):
        tritium.quantize(nn.Linear(4, 4))
    conv = transformers.pytorch_utils.Conv1D(8, 4)
    with pytest.raises(TypeError, match="Conv1D"):
        tritium.quantize(conv)
    assert tritium.quantize(nn.Linear(4, 4), "fp32").__class__ is nn.Linear  # a float spec converts nothing
    layer = BitLinear(4, 4)
    assert tritium.quantize(layer) is layer  # already quantized with that config
    with pytest.raises(ValueError, match="2-absmax"):
        tritium.quantize(layer, "2-absmax")
    with pytest.raises(TypeError, match="nn.Module"):
        tritium.quantize(torch.zeros(3))


def test_requantize_same_config_is_noop_other_config_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tritium.quantize(model, "1.58-absmean")
    layers = list(model)
    tritium.LambdaWarmup(model, steps=4)  # the warm-up blend is not part of the comparison
    tritium.quantize(model, "1.58-absmean")
    assert list(model) == layers and model[0].config.lambda_ == 0.0
    with pytest.raises(ValueError, match=r"'0' is already quantized with config '1.58-absmean'.*'2-absmax'"):
        tritium.quantize(model, "2-absmax")
    assert list(model) == layers and model[0].config.spec == "1.58-absmean"
    with pytest.raises(ValueError, match="norm"):
        tritium.ptq(model, "1.58-absmean")  # PTQ drops the input norm: another config
    # mixed precision: other layers, another config
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tritium.quantize(model, "1.58-absmean", include=r"^0$")
    tritium.quantize(model, "4-absmax", include=r"^2$")
    assert [m.config.spec for m in (model[0], model[2])] == ["1.58-absmean", "4-absmax"]


def _load_both_ways(plain, quantized, x_kwargs):
    """The quantized model's state_dict loads into a plain model and back (strict), with equal tensors."""
    sd_q = quantized.state_dict()
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in sd_q.items()}
    plain.load_state_dict(sd_q)
    assert all(torch.equal(v, sd_q[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.5)
    quantized.load_state_dict(plain.state_dict())
    assert all(torch.equal(v, quantized.state_dict()[k]) for k, v in plain.state_dict().items())
    quantized.eval()
    with torch.no_grad():
        want = quantized(**x_kwargs)
    tritium.quantize(plain, quantized_config(quantized))
    with torch.no_grad():
        got = plain.eval()(**x_kwargs)
    want, got = (getattr(v, "logits", v) for v in (want, got))
    assert torch.equal(got, want)


def quantized_config(model):
    return next(m for m in model.modules() if isinstance(m, BitLinear)).config


def test_state_dict_round_trip_gpt2_conv1d():
    t = transformers
    cfg = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(5)
    quantized = tritium.quantize(t.GPT2LMHeadModel(cfg), "1.58-absmean")
    c_attn = quantized.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, BitConv1D) and c_attn.weight.shape == (32, 96)
    _load_both_ways(t.GPT2LMHeadModel(cfg), quantized, {"input_ids": torch.randint(0, 64, (2, 6))})


def test_state_dict_round_trip_plain_and_pyg():
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).relu())

    _load_both_ways(Net(), tritium.quantize(Net()), {"x": torch.randn(4, 6)})
    pyg = pytest.importorskip("torch_geometric")
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    for conv in (pyg.nn.GCNConv(6, 4), pyg.nn.SAGEConv(6, 4)):
        plain = type(conv)(6, 4)
        _load_both_ways(plain, tritium.quantize(conv), {"x": torch.randn(4, 6), "edge_index": edge_index})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_pretrained_of_qat_model_loads_into_plain_class(arch, tmp_path):
    torch.manual_seed(7)
    model, _ = _tiny(arch)
    tritium.quantize(model, "1.58-absmean")
    ids = torch.randint(0, 64, (2, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path)
    assert not any(isinstance(m, BitLinear) for m in plain.modules())
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())
    tritium.quantize(plain, "1.58-absmean")
    with torch.no_grad():
        assert torch.equal(plain.eval()(input_ids=ids).logits, want)
