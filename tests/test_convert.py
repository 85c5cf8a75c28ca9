"""`tritium.quantize` on plain nn, transformers (built from configs, no download) and PyG models; PTQ."""

import pytest
import torch
from torch import nn

import tritium
from tritium import BitConfig, BitLinear


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
    assert isinstance(bl, BitLinear) and bl.weight.shape == (128, 32)
    torch.testing.assert_close(bl(x), y_fp, rtol=0.02, atol=0.02)  # 8-bit weights: close to fp


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
