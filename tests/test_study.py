"""The transformer study: corpus directories with their own splits, the novels protocol, continual QAT
(``cqat<F>-`` precisions), ``--compile`` and the GPU study script at tiny size."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tritium  # noqa: E402
from tritium.cli import main  # noqa: E402
from tritium.data import corpus as C  # noqa: E402
from tritium.experiments import checkpoint, lm, runner  # noqa: E402
from tritium.models.transformers import build_model, quantize_excludes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOVELS = ROOT.parent / "shared" / "data" / "lm" / "novels"
TRAIN_WORDS = "the king queen lord shall thou thee my good and of to come go speak night day love war".split()


def lines(n: int, seed: int, words: list[str]) -> str:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 11, (1,), generator=g))
        out.append(" ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g)) + ".")
    return "\n".join(out) + "\n"


def corpus_dir(path: Path) -> Path:
    """A corpus directory whose validation text has a word the training text never has."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.txt").write_text(lines(500, 0, TRAIN_WORDS))
    (path / "valid.txt").write_text(lines(60, 1, [*TRAIN_WORDS, "zyzzyva"] * 1 + ["zyzzyva"] * 10))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return corpus_dir(tmp_path_factory.mktemp("data") / "lm" / "mini")


# corpus directories -----------------------------------------------------------------------------------------


def test_directory_corpus_uses_its_own_splits_and_trains_the_tokenizer_on_train_only(tiny_dir, tmp_path,
                                                                                        monkeypatch):
    c = C.load_corpus(tiny_dir, tmp_path, vocab_size=320)
    assert torch.equal(c.train, torch.from_numpy(C.encode(c.tokenizer, (tiny_dir / "train.txt").read_text())).long())
    assert torch.equal(c.val, torch.from_numpy(C.encode(c.tokenizer, (tiny_dir / "valid.txt").read_text())).long())
    assert c.tokenizer.decode(c.val.tolist()) == (tiny_dir / "valid.txt").read_text()
    assert not any("zy" in t for t in c.tokenizer.get_vocab())  # a merge of validation-only text: never learnt
    meta = json.loads(next(tmp_path.glob("mini-bpe320-*/meta.json")).read_text())
    assert meta["val_fraction"] is None and meta["splits"] == ["train.txt", "valid.txt"]
    monkeypatch.setattr(C, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    again = C.load_corpus(tiny_dir, tmp_path, vocab_size=320, val_fraction=0.3)  # a directory ignores it
    assert torch.equal(again.val, c.val) and again.key == c.key


def test_directory_corpus_is_found_by_name_under_the_data_root(tiny_dir):
    root = tiny_dir.parent.parent
    for name in ("mini", "lm/mini", str(tiny_dir)):
        assert C.resolve_corpus(name, root) == tiny_dir
        assert C.has_splits(name, root)
    assert not C.has_splits("nope", root)


def test_a_directory_without_both_splits_is_a_clear_error(tmp_path):
    d = tmp_path / "lm" / "novels"
    d.mkdir(parents=True)
    (d / "train.txt").write_text("some text\n")
    with pytest.raises(FileNotFoundError) as e:
        C.load_corpus("novels", tmp_path / "cache", data_dir=tmp_path)
    msg = str(e.value)
    assert "lacks valid.txt" in msg and "train.txt" in msg and "100_english_novels" in msg and "ELTeC" in msg


def test_missing_corpus_directory_on_the_command_line_is_one_error_line(tmp_path, capsys):
    (tmp_path / "lm" / "novels").mkdir(parents=True)
    argv = ["run", "decoder", "--corpus", "lm/novels", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
            "--hidden", "32", "--steps", "2", "--no-progress"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "lacks train.txt and valid.txt" in err and "English novels" in err


def test_tokenizer_sample_is_deterministic_whole_lines_from_the_whole_text():
    text = "".join(f"line {i:05d} " + "x" * (i % 37) + "\n" for i in range(20000))
    assert C.tokenizer_sample(text, len(text)) is text
    s = C.tokenizer_sample(text, len(text) // 10, chunk=2000)
    assert s == C.tokenizer_sample(text, len(text) // 10, chunk=2000)
    assert 0.08 < len(s) / len(text) < 0.12
    got = s.splitlines(keepends=True)
    assert set(got) <= set(text.splitlines(keepends=True))  # whole lines only
    first, last = int(got[0].split()[1]), int(got[-1].split()[1])
    assert first == 0 and last > 18000  # spread over the whole text


def test_large_training_split_trains_the_tokenizer_on_a_sample(tiny_dir, tmp_path):
    cap = 4000
    c = C.load_corpus(tiny_dir, tmp_path, vocab_size=320, tokenizer_chars=cap)
    meta = json.loads(next(tmp_path.glob("mini-bpe320-*/meta.json")).read_text())
    assert meta["tokenizer_chars"] == cap and 0.8 * cap < meta["tokenizer_trained_on_chars"] < 1.2 * cap
    assert meta["tokenizer_trained_on_chars"] < meta["train_chars"] / 3
    full = C.load_corpus(tiny_dir, tmp_path, vocab_size=320)
    assert full.key != c.key and len(list(tmp_path.iterdir())) == 2
    assert len(c.train) == meta["train_tokens"]  # the whole split is encoded, not the sample


def test_batched_encoding_equals_one_batch(tiny_dir, tmp_path):
    c = C.load_corpus(tiny_dir, tmp_path, vocab_size=320)
    text = (tiny_dir / "train.txt").read_text()
    whole = C.encode(c.tokenizer, text)
    plain = [i for e in c.tokenizer.encode_batch(list(C._lines(text)), add_special_tokens=False) for i in e.ids]
    assert whole.tolist() == plain  # as the tokenizer's own batch call, with offsets, gives them
    for batch_chars in (1, 100, 5000):
        assert (C.encode(c.tokenizer, text, batch_chars=batch_chars) == whole).all()
    assert C.encode(c.tokenizer, "").shape == (0,)


def test_grid_of_a_directory_corpus_records_no_val_fraction(tiny_dir, tmp_path, capsys):
    root = tiny_dir.parent.parent
    base = ["run", "decoder", "--data-dir", str(root), "--out", str(tmp_path), "--hidden", "32", "--dry-run"]
    assert main([*base, "--corpus", "lm/mini"]) == 0
    cfgs = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert cfgs and all(c["val_fraction"] is None and c["corpus"] == "mini" for c in cfgs)
    (root / "lm" / "one.txt").write_text("a b c\n")
    assert main([*base, "--corpus", "one.txt"]) == 0
    cfgs = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert cfgs and all(c["val_fraction"] == 0.1 for c in cfgs)


# the novels protocol ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", lm.ARCHS)
def test_novels_protocol_covers_the_study(task):
    p = runner.load_protocol(task, "novels")
    assert p["corpus"] == "lm/novels" and "val_fraction" not in p
    precisions = set(runner.precisions(type("A", (), {"precision": p["precision"]})))
    assert {"bf16", "1.58-absmedian+bf16", "1.58-absmean+bf16", "ptq-1.58-absmedian+bf16"} <= precisions
    assert p["seeds"] >= 2
    hidden = [int(h) for h in p["hidden"].split(",")]
    assert len(hidden) >= 3 and hidden == sorted(hidden) and hidden[-1] >= 4 * hidden[0]
    assert all(h % p["head_dim"] == 0 for h in hidden)
    assert p["steps"] % p["eval_every"] == 0 and p["warmup"] < p["steps"] // 5


@pytest.mark.skipif(not NOVELS.is_dir(), reason=f"the English novels set is not at {NOVELS}")
def test_novels_protocol_runs_are_listed_from_the_real_corpus(tmp_path, capsys):
    assert C.resolve_corpus("lm/novels", NOVELS.parents[1]) == NOVELS
    argv = ["run", "encoder", "--protocol", "novels", "--data-dir", str(NOVELS.parents[1]), "--out", str(tmp_path),
            "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    p = runner.load_protocol("encoder", "novels")
    n = len(p["hidden"].split(",")) * len(p["precision"].split(",")) * p["seeds"]
    assert out[0].startswith(f"encoder: {n} runs") and all('"val_fraction": null' in line for line in out[1:])


# continual QAT ----------------------------------------------------------------------------------------------


def test_quantize_keeps_the_parameters_and_their_optimizer_state():
    model = build_model("decoder", 300, 32, 1, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(40, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    before = list(model.parameters())
    state = {id(p): opt.state[p]["exp_avg"] for p in before}
    tritium.quantize(model, "1.58-absmedian", exclude=quantize_excludes("decoder"))
    after = list(model.parameters())
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before, strict=True))
    assert all(opt.state[p]["exp_avg"] is state[id(p)] for p in after)
    assert any(isinstance(m, tritium.BitLinear) for m in model.modules())


def _model(spec: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("decoder", 300, 32, 1, 16)
    return model if spec is None else tritium.quantize(model, spec, exclude=quantize_excludes("decoder"))


def _batch(step: int) -> dict:
    ids = torch.randint(40, 300, (4, 16), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


EVALS = {"val": [_batch(10_000)]}


def _convert(model: torch.nn.Module) -> None:
    tritium.quantize(model, "1.58-absmedian", exclude=quantize_excludes("decoder"))


def test_switch_happens_at_its_step_and_keeps_the_optimizer_state(tmp_path):
    seen = []

    def convert(model):
        seen.append((len(losses), any(isinstance(m, tritium.BitLinear) for m in model.modules())))
        _convert(model)

    losses: list[float] = []
    model = _model()
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=0)
    curves = lm.train(model, _batch, 6, 1e-2, eval_every=1, eval_sets=EVALS, progress=False, losses=losses,
                      ckpt=ckpt, switch=(3, convert))
    assert seen == [(3, False)]  # once, after 3 optimizer steps, on the float model
    float_run = lm.train(_model(), _batch, 6, 1e-2, eval_every=1, eval_sets=EVALS, progress=False)
    qat_run = lm.train(_model("1.58-absmedian"), _batch, 6, 1e-2, eval_every=1, eval_sets=EVALS, progress=False)
    assert curves["val_loss"][:3] == float_run["val_loss"][:3]  # the float phase is the float run
    assert curves["val_loss"][3] != float_run["val_loss"][3] != qat_run["val_loss"][3]
    # AdamW's step count of a converted weight runs on through the switch (a new optimizer would restart it)
    name = next(n for n, m in model.named_modules() if isinstance(m, tritium.BitLinear)) + ".weight"
    steps = [load_file(checkpoint.path_of(tmp_path, s).with_suffix(".safetensors"))[f"optim/{name}/step"].item()
             for s in (3, 4, 5)]
    assert steps == [3, 4, 5]


def test_a_conversion_that_replaces_parameters_is_refused():
    def replace(model):
        layer = model.model.layers[0].mlp.up_proj
        model.model.layers[0].mlp.up_proj = tritium.BitLinear.from_linear(layer)  # copies: new parameters

    with pytest.raises(RuntimeError, match="replaced parameters"):
        lm.train(_model(), _batch, 3, 1e-2, progress=False, switch=(1, replace))


def test_lambda_warmup_counts_from_the_switch():
    model = _model()
    lm.train(model, _batch, 6, 1e-2, progress=False, switch=(4, _convert), warmup_lambda=4)
    assert {m.config.lambda_ for _, m in tritium.convert.bit_layers(model)} == {0.5}


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop", [2, 3, 4])
def test_resume_across_the_switch_is_exact(stop, tmp_path):
    steps, k = 6, 3
    kw = {"eval_every": 2, "eval_sets": EVALS, "progress": False, "warmup_lambda": 2, "warmup": 1}

    def run(folder: Path, get_batch, resume: bool = False) -> tuple[torch.nn.Module, dict, list]:
        model, losses = _model(), []
        ckpt = checkpoint.Checkpointer(folder, every=1, resume=resume)
        curves = lm.train(model, get_batch, steps, 1e-2, ckpt=ckpt, losses=losses, switch=(k, _convert), **kw)
        return model, curves, losses

    full, curves, losses = run(tmp_path / "full", _batch)

    def failing(step: int) -> dict:
        if step == stop:
            raise Interrupt
        return _batch(step)

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", failing)
    assert checkpoint.checkpoints(tmp_path / "cut")[0][0] == stop
    resumed, curves2, losses2 = run(tmp_path / "cut", _batch, resume=True)
    assert curves2 == curves and losses2 == losses
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert [type(m) for m in full.modules()] == [type(m) for m in resumed.modules()]
    assert [m.config for _, m in tritium.convert.bit_layers(full)] == \
        [m.config for _, m in tritium.convert.bit_layers(resumed)]


def test_cqat_precision_end_to_end(tmp_path):
    corpus = corpus_dir(tmp_path / "c")
    argv = ["run", "decoder", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--hidden", "32",
            "--layers", "1", "--steps", "6", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--vocab-size", "320", "--precision", "fp32,cqat0.5-1.58-absmedian",
            "--no-progress"]
    assert main(argv) == 0
    rows = {r["precision"]: r for r in map(json.loads, (tmp_path / "o" / "results.jsonl").read_text().splitlines())}
    fp, cq = rows["fp32"], rows["cqat0.5-1.58-absmedian"]
    assert cq["switch_step"] == 3 and cq["layers_converted"] > 0 and "switch_step" not in fp
    assert cq["curves"]["val_loss"][:2] == fp["curves"]["val_loss"][:2]  # steps 0 and 2: still float
    assert cq["curves"]["val_loss"][2] != fp["curves"]["val_loss"][2]
    assert "cqat0.5-1.58-absmedian" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.parametrize("extra, start", [
    (["--precision", "cqat0.5-1.58", "--fsdp", "--nproc", "2"], "error: --precision cqat0.5-1.58-absmedian"),
    (["--compile", "nope"], "error: --compile nope: not a torch.compile backend"),
    (["--compile", "a b"], "error: argument --compile"),
])
def test_bad_study_options_are_one_error_line(extra, start, tmp_path, capsys):
    assert main(["run", "decoder", "--corpus", "x.txt", "--out", str(tmp_path), *extra]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith(start) and not out


def test_switch_step_rounds_half_up():
    assert [lm.switch_step(0.5, n) for n in (1, 3, 6, 1000)] == [1, 2, 3, 500]
    assert lm.switch_step(0.25, 10) == 3 and lm.switch_step(0.001, 10) == 0


# torch.compile ----------------------------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    """A small language model (embedding, MLP, head) that dynamo traces in a moment."""

    Out = namedtuple("Out", "loss")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(300, 32)
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        self.head = torch.nn.Linear(32, 300)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Out:
        logits = self.head(self.body(self.emb(input_ids)))
        return self.Out(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_compiled_training_matches_eager_across_the_switch():
    """The eager backend runs dynamo's tracing and guards but no code generation: the losses are identical,
    so the conversion at the switch reaches the compiled model."""
    torch._dynamo.reset()
    runs = []
    for backend in (None, "eager", None):
        losses: list[float] = []
        convert = (lambda m: tritium.quantize(m, "1.58-absmedian", exclude=["head"])) if len(runs) < 2 else None
        lm.train(Tiny(), _batch, 4, 1e-2, progress=False, losses=losses, switch=(2, convert) if convert else None,
                 compile=backend)
        runs.append(losses)
    assert runs[0] == runs[1] and runs[0][:2] == runs[2][:2] and runs[0][2:] != runs[2][2:]


def test_compile_option_reaches_training_and_keeps_the_run_key(tmp_path, monkeypatch):
    corpus = corpus_dir(tmp_path / "c")
    base = ["run", "decoder", "--corpus", str(corpus), "--hidden", "32", "--layers", "1", "--steps", "2",
            "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--vocab-size",
            "320", "--precision", "1.58-absmedian", "--no-progress"]
    seen = []
    train = lm.train
    monkeypatch.setattr(lm, "train", lambda *a, **k: seen.append(k["compile"]) or train(*a, **{**k, "compile": None}))
    for i, extra in enumerate((["--compile", "aot_eager"], [])):
        assert main([*base, "--out", str(tmp_path / str(i)), *extra]) == 0
    assert seen == ["aot_eager", None]
    keys = {json.loads((tmp_path / str(i) / "results.jsonl").read_text())["key"] for i in range(2)}
    assert len(keys) == 1  # an execution option, like --threads: not part of the run
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    assert parser.parse_args(["--compile"]).compile == "inductor"
    assert parser.parse_args(["--compile", "--steps", "3"]).compile == "inductor"
    assert parser.parse_args([]).compile is None


# the GPU study script ---------------------------------------------------------------------------------------


def test_gpu_study_script_runs_at_tiny_size_on_cpu(tmp_path):
    corpus = corpus_dir(tmp_path / "c")
    env = {**os.environ, "STUDY_TINY": "1", "CORPUS": str(corpus), "OUT": str(tmp_path / "o"),
           "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "study_gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for task in lm.ARCHS:
        rows = [json.loads(line) for line in (tmp_path / "o" / task / "results.jsonl").read_text().splitlines()]
        assert {r["precision"] for r in rows} == {"bf16", "1.58-absmedian+bf16", "1.58-absmean+bf16",
                                                 "ptq-1.58-absmedian+bf16", "cqat0.5-1.58-absmedian+bf16"}
        assert all(r["task"] == task for r in rows)
    again = subprocess.run(["bash", str(ROOT / "scripts" / "study_gpu.sh"), "--dry-run"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("0 to run") == 3  # resumes: nothing left


# a capped training split --------------------------------------------------------------------------------------


def test_train_tokens_caps_the_training_split(tmp_path, monkeypatch):
    corpus = corpus_dir(tmp_path / "c")
    base = ["run", "decoder", "--corpus", str(corpus), "--hidden", "32", "--layers", "1", "--steps", "2",
            "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--vocab-size",
            "320", "--precision", "fp32", "--no-progress"]
    splits = []
    make = lm.make_batch_fn

    def recording(arch, c, split, *a):
        splits.append(split)
        return make(arch, c, split, *a)

    monkeypatch.setattr(lm, "make_batch_fn", recording)
    assert main([*base, "--out", str(tmp_path / "a"), "--train-tokens", "100"]) == 0
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "results.jsonl").read_text()) for d in "ab")
    assert a["train_tokens"] == 100 and a["train_split_tokens"] == 100 and "train_tokens" not in b
    assert b["train_split_tokens"] > 1000 and a["key"] != b["key"]
    full = splits[2]  # each run makes its (train, val) batch functions in that order
    assert torch.equal(splits[0], full[:100]) and torch.equal(splits[1], splits[3])  # validation unchanged
