"""Input features of the text classification data and the mlp task: words and trained WordPiece pieces."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tritium.cli import main
from tritium.data import textcls as data
from tritium.experiments import runner

pytest.importorskip("tokenizers")

# Each document has its own label, so a split's labels say which documents it holds; every document ends in
# a marker word whose letter pairs occur nowhere else.
DOCS = [
    ("train", "the good film had a good plot xylophone"),
    ("train", "bad film and a bad plot, quokka"),
    ("train", "great acting in the film jazz"),
    ("train", "awful plot and awful acting zephyr"),
    ("train", "good acting, good film vortex"),
    ("train", "the plot was bad kiwi"),
    ("train", "a film with great acting sphinx"),
    ("train", "the acting was awful fjord"),
    ("test", "good film unseenword"),
    ("test", "bad plot wyvern"),
]
MARKERS = [t.split()[-1] for _, t in DOCS]


def write_dataset(root: Path, name: str = "wp", docs: list[tuple[str, str]] = DOCS) -> None:
    base = root / "text_gcn" / "data"
    (base / "corpus").mkdir(parents=True, exist_ok=True)
    (base / f"{name}.txt").write_text("".join(f"{i}\t{s}\td{i}\n" for i, (s, _) in enumerate(docs)))
    (base / "corpus" / f"{name}.txt").write_text("".join(f"{t}\n" for _, t in docs))


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITIUM_CACHE", str(tmp_path / "cache"))
    data._load.cache_clear()
    write_dataset(tmp_path / "data")
    yield tmp_path / "data"
    data._load.cache_clear()


def doc_numbers(ds: data.TextDataset, split: data.Split) -> list[int]:
    """The document numbers (line numbers of the corpus) of ``split``, in its order."""
    return [int(ds.classes[c][1:]) for c in split.labels.tolist()]


def load(root: Path, **kwargs) -> data.TextDataset:
    settings = {"min_count": 1, "val_fraction": 0.25, "split_seed": 0, "features": "wordpiece", **kwargs}
    return data.load_text_gcn("wp", root, **settings)


def cached_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "wordpiece").glob("*.json"))


def test_wordpiece_vocabulary_comes_from_the_training_split_only(root):
    ds = load(root)
    train, val, test = (doc_numbers(ds, s) for s in (ds.train, ds.val, ds.test))
    assert (len(train), len(val), len(test)) == (6, 2, 2) and set(test) == {8, 9}
    vocab = set(ds.vocab)
    assert {MARKERS[i] for i in train} <= vocab  # min_count 1 and room to spare: every train word is one piece
    assert not {MARKERS[i] for i in val + test} & vocab
    assert set(data.SPECIAL_TOKENS) <= vocab
    texts = [t for _, t in DOCS]
    seen = " ".join(texts[i] for i in train)
    assert all(p.removeprefix("##") in seen for p in vocab - set(data.SPECIAL_TOKENS))
    # what the checks above catch: a tokenizer that also saw the validation documents
    leaky = set(data.train_wordpiece([texts[i] for i in train + val]).get_vocab())
    assert {MARKERS[i] for i in val} <= leaky


def test_test_only_word_is_split_into_pieces_or_unknown(root):
    ds = load(root)
    k = doc_numbers(ds, ds.test).index(8)
    ids, _ = ds.test.batch(torch.tensor([k]))
    pieces = [ds.vocab[i] for i in ids]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and "film" in pieces
    assert "unseenword" not in pieces and len(pieces) >= 6


def test_wordpiece_vocabulary_size_is_respected(root):
    full = load(root)
    assert len(full.vocab) < data.WORDPIECE_VOCAB
    small = load(root, vocab_size=len(full.vocab) - 20)
    assert len(small.vocab) == len(full.vocab) - 20
    for split in (small.train, small.val, small.test):
        assert int(split.ids.max()) < len(small.vocab)


def test_bag_of_pieces_matches_tokenizers_encode(root, tmp_path):
    from tokenizers import Tokenizer

    ds = load(root)
    (path,) = cached_files(tmp_path)
    tok = Tokenizer.from_file(str(path))
    texts = (root / "text_gcn" / "data" / "corpus" / "wp.txt").read_text().splitlines()
    for split in (ds.train, ds.val, ds.test):
        numbers = doc_numbers(ds, split)
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(1))
        ids, offsets = split.batch(order)
        ends = [*offsets[1:].tolist(), ids.numel()]
        for j, k in enumerate(order.tolist()):
            enc = tok.encode(texts[numbers[k]])
            assert ids[offsets[j]: ends[j]].tolist() == enc.ids
            assert [ds.vocab[i] for i in enc.ids] == enc.tokens


def test_wordpiece_tokenizer_is_cached_as_json_keyed_by_data_and_settings(root, tmp_path, monkeypatch):
    first = load(root)
    (path,) = cached_files(tmp_path)
    assert json.loads(path.read_text())["model"]["type"] == "WordPiece"
    assert first.tokenizer == hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr(data, "train_wordpiece", no_training)
    data._load.cache_clear()
    again = load(root)
    assert (again.vocab, again.tokenizer) == (first.vocab, first.tokenizer)
    monkeypatch.undo()
    monkeypatch.setenv("TRITIUM_CACHE", str(tmp_path / "cache"))
    load(root, vocab_size=len(first.vocab) - 5)
    load(root, split_seed=1)
    write_dataset(root, docs=[*DOCS[:-1], ("test", "bad plot lambdamarker")])
    data._load.cache_clear()
    load(root)
    assert len(cached_files(tmp_path)) == 4
    assert not list((tmp_path / "cache" / "wordpiece").glob("*.tmp"))


def test_unreadable_cache_file_is_rebuilt(root, tmp_path):
    first = load(root)
    (path,) = cached_files(tmp_path)
    path.write_text("{not json")
    data._load.cache_clear()
    again = load(root)
    assert json.loads(path.read_text())["model"]["vocab"] == {p: i for i, p in enumerate(again.vocab)}
    assert again.tokenizer == hashlib.sha256(path.read_bytes()).hexdigest()[:16] and len(first.vocab) > 50


def test_words_features_are_unchanged_and_unknown_features_refused(root):
    ds = data.load_text_gcn("wp", root, min_count=1, val_fraction=0.25, split_seed=0)
    assert ds.features == "words" and ds.tokenizer == ""
    assert set(ds.vocab) == {w for i in doc_numbers(ds, ds.train) for w in data.tokenize(DOCS[i][1])}
    with pytest.raises(ValueError, match="unknown features 'bpe'"):
        data.load_text_gcn("wp", root, features="bpe")


def mlp_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "mlp", "--dataset", "wp", "--data-dir", str(root), "--out", str(out), "--no-progress",
            "--precision", "fp32", "--set", "epochs=1", "--set", "hidden=8", "--set", "val_fraction=0.25",
            "--set", "min_count=1", *extra]


def test_features_flow_into_rows_and_report(root, tmp_path):
    out = tmp_path / "o"
    assert main(mlp_args(root, out, "--features", "words,wordpiece")) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["features"] for r in rows] == ["words", "wordpiece"]
    assert "tokenizer_sha256" not in rows[0] and len(rows[1]["tokenizer_sha256"]) == 16
    assert rows[0]["vocab_size"] != rows[1]["vocab_size"]
    md = (out / "results.md").read_text()
    assert "| input_layer | features | precision | wp |" in md
    assert "| embedding | words | fp32 |" in md and "| embedding | wordpiece | fp32 |" in md
    assert "| wp | words |" in md and "| wp | wordpiece |" in md


def test_words_runs_keep_their_keys(tmp_path, capsys):
    """A words run's config has no "features" entry, so its key is that of runs made before the option."""
    before = {"task": "mlp", "dataset": "R8", "precision": "fp32", "seed": 0, "model": "widemlp", "epochs": 100,
              "batch_size": 16, "lr": 0.001, "weight_decay": 0.01, "hidden": 1024, "dropout": 0.5, "min_count": 5,
              "val_fraction": 0.1, "split_seed": 0, "input_layer": "embedding"}
    argv = ["run", "mlp", "--protocol", "paper", "--dataset", "R8", "--seeds", "1", "--precision", "fp32",
            "--out", str(tmp_path / "o"), "--dry-run"]
    assert main([*argv, "--features", "words,wordpiece"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    got = [(key, json.loads(cfg)) for key, cfg in (line.split(" ", 1) for line in lines)]
    want = [before, {**before, "features": "wordpiece"}]
    assert [cfg for _, cfg in got] == want and [key for key, _ in got] == [runner.run_key(c) for c in want]
    assert main(argv) == 0  # the protocol's features: words
    assert capsys.readouterr().out.splitlines()[1] == got[0][0] + " " + json.dumps(before, sort_keys=True)


@pytest.mark.parametrize("extra, where", [(["--features", "bpe"], "--features"),
                                          (["--features", "words,"], "--features"),
                                          (["--set", "features=bpe"], "features=bpe")])
def test_bad_features_are_one_error_line(root, tmp_path, capsys, extra, where):
    assert main(mlp_args(root, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and where in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_wordpiece_without_tokenizers_is_one_error_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert main(mlp_args(root, tmp_path / "o", "--features", "wordpiece")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the tokenizers package" in err


def test_written_report_reads_rows_without_features_as_words(tmp_path):
    """Every table of results.md, the paper comparison and the generic summary, counts a row without
    "features" as words; the run-time line sums the rows' wall_s per dataset."""
    row = {"task": "mlp", "key": "a", "dataset": "R8", "precision": "fp32", "seed": 0, "input_layer": "embedding",
           "test_acc": 0.97, "best_val_acc": 0.98, "test_acc_at_best_val": 0.97, "vocab_size": 10, "n_train": 1,
           "n_val": 1, "n_test": 1, "curves": {"epoch": [0], "val_acc": [0.9]}, "wall_s": 1800.0}
    rows = [row, {**row, "key": "b", "features": "wordpiece", "test_acc": 0.96, "wall_s": 5400.0},
            {**row, "key": "c", "dataset": "R52", "wall_s": 360.0}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = runner.write_report(tmp_path)
    assert "| embedding | words | R8 | fp32 | 97.00 (n=1) | 97.27 | -0.27 |" in md
    assert "| embedding | wordpiece | R8 | fp32 | 96.00 (n=1) | 97.27 | -1.27 |" in md
    main_table = md[md.index("## mlp"):]
    assert "| embedding | words | fp32 | 97.00 | 97.00 | 97.00 |" in main_table
    assert "| embedding | wordpiece | fp32 | 96.00 |  |  |" in main_table and "None" not in md
    assert "R8: 2.0; R52: 0.1 by dataset; 2.1 in all over 3 runs." in main_table
