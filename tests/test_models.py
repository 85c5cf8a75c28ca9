import pytest
import torch

import tritium
from tritium.models import WideMLP, XorMLP

IDS = torch.tensor([1, 2, 2, 5, 0, 3])
OFFSETS = torch.tensor([0, 3, 4])


def test_widemlp_forward_and_default_quantize_converts_only_output():
    model = WideMLP(vocab_size=8, num_classes=3, hidden=16)
    assert model(IDS, OFFSETS).shape == (3, 3)
    tritium.quantize(model, "1.58-absmedian")
    s = tritium.summary(model)
    assert [name for name, *_ in s.layers] == ["out"]
    assert isinstance(model.embed, torch.nn.EmbeddingBag)
    assert model(IDS, OFFSETS).shape == (3, 3)


def test_widemlp_linear_input_matches_embedding_and_is_quantized():
    emb = WideMLP(8, 3, hidden=16, dropout=0.0).eval()
    lin = WideMLP(8, 3, hidden=16, dropout=0.0, input_layer="linear").eval()
    with torch.no_grad():
        lin.embed.weight.copy_(emb.embed.weight.t())
        lin.embed.bias.zero_()
        lin.out.load_state_dict(emb.out.state_dict())
    torch.testing.assert_close(lin(IDS, OFFSETS), emb(IDS, OFFSETS))
    tritium.quantize(lin, "1.58-absmean")
    assert sorted(name for name, *_ in tritium.summary(lin).layers) == ["embed", "out"]
    assert lin(IDS, OFFSETS).shape == (3, 3)


def test_xor_mlp_quantize_converts_both_layers():
    model = tritium.quantize(XorMLP(4, 8), "1.58-absmean")
    assert tritium.summary(model).as_dict()["layers_converted"] == 2
    assert model(torch.randn(5, 4)).shape == (5, 2)


def tiny_graph():
    x = torch.randn(6, 5)
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 4, 5], [1, 0, 2, 1, 4, 3, 5, 4]])
    return x, edge_index


@pytest.mark.parametrize("arch, n_layers", [("SGC", 1), ("GCN", 2)])
def test_gnn_forward_and_quantize(arch, n_layers):
    pytest.importorskip("torch_geometric")
    from tritium.models import gnn

    x, edge_index = tiny_graph()
    model = getattr(gnn, arch)(5, 3)
    assert model(x, edge_index).shape == (6, 3)
    tritium.quantize(model, "1.58-absmedian")
    assert tritium.summary(model).as_dict()["layers_converted"] == n_layers
    out = model(x, edge_index)
    out.sum().backward()
    assert out.shape == (6, 3)
