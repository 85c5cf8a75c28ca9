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


def test_bag_mean_sparse_gradient_matches_torch():
    from tritium.models.mlp import BagMean

    torch.manual_seed(0)
    ids, offsets = torch.tensor([3, 1, 3, 3, 0, 7, 1, 1]), torch.tensor([0, 3, 3, 5])  # bag 1 is empty
    grad = torch.randn(4, 6)
    fast = BagMean(9, 6, sparse=True)
    ref = torch.nn.EmbeddingBag(9, 6, mode="mean", sparse=True)
    ref.load_state_dict(fast.state_dict())
    out, want = fast(ids, offsets), ref(ids, offsets)
    torch.testing.assert_close(out, want)
    out.backward(grad)
    want.backward(grad)
    g = fast.weight.grad
    assert g.is_sparse and g._indices()[0].tolist() == [0, 1, 3, 7]  # one entry per distinct id, sorted
    torch.testing.assert_close(g.to_dense(), ref.weight.grad.to_dense())
    # a plain loop over the bags, as a third opinion
    dense = torch.zeros(9, 6)
    for b, (start, end) in enumerate(zip(offsets.tolist(), offsets.tolist()[1:] + [ids.numel()], strict=True)):
        for i in ids[start:end].tolist():
            dense[i] += grad[b] / (end - start)
    torch.testing.assert_close(g.to_dense(), dense)
    with torch.no_grad():  # inference and dense mode take torch's path
        torch.testing.assert_close(fast(ids, offsets), want)


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
