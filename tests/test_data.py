import os
from pathlib import Path

import pytest
import torch

from tritium.data import DataNotFoundError, data_root
from tritium.data.textcls import load_text_gcn, tokenize
from tritium.data.xor import make_xor

SHARED = Path(os.environ.get("TRITIUM_DATA", Path(__file__).parents[2] / "shared" / "data"))


def write_text_gcn(root: Path, name: str = "tiny") -> None:
    base = root / "text_gcn" / "data"
    (base / "corpus").mkdir(parents=True)
    docs = [("train", "pos", "good good film"), ("train", "neg", "bad film, BAD plot"),
            ("train", "pos", "great acting 2024"), ("train", "neg", "awful plot"),
            ("train", "pos", "good acting"), ("test", "pos", "good unseenword"), ("test", "neg", "bad")]
    (base / f"{name}.txt").write_text("".join(f"{i}\t{s}\t{lab}\n" for i, (s, lab, _) in enumerate(docs)))
    (base / "corpus" / f"{name}.txt").write_text("".join(f"{t}\n" for *_, t in docs))


def test_tokenize():
    assert tokenize("Bad film, BAD plot 2024!") == ["bad", "film", "bad", "plot", "2024"]


def test_text_gcn_loader(tmp_path):
    write_text_gcn(tmp_path)
    ds = load_text_gcn("tiny", tmp_path, min_count=1, val_fraction=0.2, split_seed=0)
    assert ds.classes == ["neg", "pos"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 1, 2)
    assert "unseenword" not in ds.vocab
    ids, offsets = ds.test.batch(torch.tensor([1, 0]))
    assert [ds.vocab[i] for i in ids] == ["bad", "good"]  # test doc 1 first; the unseen word is dropped
    assert offsets.tolist() == [0, 1]
    assert ds.test.labels.tolist() == [1, 0]


def test_text_gcn_min_count_uses_train_only(tmp_path):
    write_text_gcn(tmp_path)
    ds = load_text_gcn("tiny", tmp_path, min_count=2, val_fraction=0.0)
    assert set(ds.vocab) == {"good", "film", "bad", "plot", "acting"}


def test_missing_text_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"text_gcn/data/corpus/nope\.txt") as e:
        load_text_gcn("nope", tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    assert "github.com/yao8839836/text_gcn" in str(e.value)


def test_missing_planetoid_is_a_clear_error(tmp_path):
    pytest.importorskip("torch_geometric")
    from tritium.data.planetoid import load_planetoid

    with pytest.raises(DataNotFoundError, match=r"planetoid/Cora/raw/ind\.cora\.x"):
        load_planetoid("Cora", tmp_path)


def test_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITIUM_DATA", str(tmp_path / "env"))
    assert data_root(str(tmp_path)) == tmp_path
    assert data_root(None) == tmp_path / "env"
    monkeypatch.delenv("TRITIUM_DATA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert data_root(None).resolve() == (tmp_path / "shared" / "data").resolve()


def test_xor_data():
    x, y = make_xor(64, noise=2, seed=0)
    assert x.shape == (64, 4) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long())
    assert torch.equal(make_xor(64, 2, seed=0)[0], x)


@pytest.mark.skipif(not (SHARED / "text_gcn" / "data" / "R8.txt").is_file(), reason=f"no R8 under {SHARED}")
def test_r8_integration():
    ds = load_text_gcn("R8", SHARED, min_count=5, val_fraction=0.1)
    assert len(ds.classes) == 8
    assert (len(ds.train), len(ds.val)) == (5485 - 548, 548)
    assert len(ds.test) == 2189
    assert int(ds.train.ids.max()) < len(ds.vocab)


@pytest.mark.skipif(not (SHARED / "planetoid" / "Cora" / "raw").is_dir(), reason=f"no Cora under {SHARED}")
def test_cora_integration(tmp_path, monkeypatch):
    pytest.importorskip("torch_geometric")
    from tritium.data.planetoid import load_planetoid

    monkeypatch.setenv("TRITIUM_CACHE", str(tmp_path))
    data = load_planetoid("Cora", SHARED)
    assert (data.num_nodes, data.num_features, int(data.y.max()) + 1) == (2708, 1433, 7)
    assert data.edge_index.shape[1] == 10556
    assert [int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask)] == [140, 500, 1000]
    assert (tmp_path / "planetoid" / "Cora" / "processed").is_dir()
