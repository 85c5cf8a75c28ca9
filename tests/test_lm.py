"""Language-model tasks: corpus split and tokenizer cache, collators, tiny models, runner, scaling factors."""

import json
import math
import random
from itertools import pairwise

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tritium  # noqa: E402
from tritium.data import corpus as C  # noqa: E402
from tritium.experiments import lm  # noqa: E402
from tritium.models.transformers import build_model, quantize_excludes  # noqa: E402

WORDS = "the king queen lord shall thou thee my good and of to come go speak night day love war".split()


def make_text(n_lines: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        name = rng.choice(["KING", "QUEEN", "LORD"])
        lines.append(f"{name}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + ".\n")
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and immune to oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(make_text())
    return path


@pytest.fixture(scope="module")
def corpus(corpus_file, tmp_path_factory):
    return C.load_corpus(corpus_file, tmp_path_factory.mktemp("cache"), vocab_size=320)


def test_split_is_contiguous_and_about_ten_percent():
    text = make_text(200)
    train, val = C.split_text(text, 0.1)
    assert train + val == text
    assert abs(len(val) / len(text) - 0.1) < 0.03
    assert val == "" or train.endswith("\n")


def test_tokenizer_is_cached(corpus_file, tmp_path, monkeypatch):
    first = C.load_corpus(corpus_file, tmp_path, vocab_size=320)
    assert first.vocab_size == 320 and len(first.train) > 5 * len(first.val) > 0
    assert first.sentinels == list(range(len(C.SPECIALS), first.n_special))
    monkeypatch.setattr(C, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    second = C.load_corpus(corpus_file, tmp_path, vocab_size=320)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    third_dir = {p.name for p in tmp_path.iterdir()}
    assert len(third_dir) == 1  # one cache entry for one corpus and setting
    assert second.tokenizer.decode(second.val[:50].tolist())


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tinyshakespeare"):
        C.load_corpus(tmp_path / "nope.txt", tmp_path)


def test_mask_tokens_selects_15_percent_80_10_10():
    vocab, n_special, mask_id = 1000, 40, 4
    ids = torch.randint(n_special, vocab, (256, 128), generator=torch.Generator().manual_seed(0))
    x, y = C.mask_tokens(ids, mask_id, vocab, n_special, torch.Generator().manual_seed(1))
    sel = y != -100
    assert x.shape == y.shape == ids.shape
    assert abs(sel.float().mean().item() - 0.15) < 0.01
    assert torch.equal(y[sel], ids[sel])
    assert torch.equal(x[~sel], ids[~sel])
    masked = (x[sel] == mask_id).float().mean().item()
    kept = (x[sel] == ids[sel]).float().mean().item()
    rand = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(rand - 0.1) < 0.02
    assert x.min() >= n_special or (x[x < n_special] == mask_id).all()


def test_span_corruption_reconstructs_the_input():
    sentinels, eos = list(range(5, 37)), 3
    ids = torch.randint(40, 300, (64, 128), generator=torch.Generator().manual_seed(0))
    x, y = C.span_corrupt(ids, sentinels, eos, torch.Generator().manual_seed(1))
    assert x.shape[0] == y.shape[0] == 64
    assert (x[:, -1] == eos).all() and (y[:, -1] == eos).all()
    n_spans = sum(int(t) in sentinels for t in x[0])
    n_noise = y.shape[1] - n_spans - 1
    assert abs(n_noise / 128 - 0.15) < 0.02
    assert abs(n_noise / n_spans - 3) <= 1.5
    for row, xi, yi in zip(ids.tolist(), x.tolist(), y.tolist(), strict=True):
        spans, cur = {}, None
        for t in yi[:-1]:
            if t in sentinels:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        assert all(spans.values()) and list(spans) == sentinels[: len(spans)]
        rebuilt = [u for t in xi[:-1] for u in (spans[t] if t in sentinels else [t])]
        assert rebuilt == row


@pytest.mark.parametrize("arch", ["encoder", "seq2seq", "decoder"])
def test_tiny_model_learns_at_1_58_bits(arch, corpus):
    torch.manual_seed(0)
    model = build_model(arch, corpus.vocab_size, 32, 2, 32, pad_id=corpus.pad_id, eos_id=corpus.eos_id)
    tritium.quantize(model, "1.58-absmedian", exclude=quantize_excludes(arch))
    assert tritium.summary(model).as_dict()["layers_converted"] > 0
    batch = lm.make_batch_fn(arch, corpus, corpus.train, 8, 32)
    evals = {"val": [batch(torch.Generator().manual_seed(99)) for _ in range(2)]}
    curves = lm.train(model, lambda s: batch(torch.Generator().manual_seed(s)), 40, 3e-3, warmup=5,
                      eval_every=20, eval_sets=evals, progress=False)
    assert curves["step"] == [0, 20, 40]
    assert curves["val_loss"][-1] < curves["val_loss"][0] - 0.5


@pytest.mark.parametrize("arch,head", [("encoder", "cls.predictions.decoder"), ("seq2seq", "lm_head"),
                                       ("decoder", "lm_head")])
def test_heads_stay_full_precision_by_default(arch, head):
    for quantize_heads in (False, True):
        model = build_model(arch, 300, 32, 1, 16)
        tritium.quantize(model, "1.58-absmedian", exclude=quantize_excludes(arch, quantize_heads))
        assert isinstance(model.get_submodule(head), tritium.BitLinear) == quantize_heads


def test_exclude_keeps_cross_attention_full_precision():
    model = build_model("seq2seq", 300, 32, 1, 16)
    tritium.quantize(model, "1.58-absmedian", exclude=quantize_excludes("seq2seq", exclude=["EncDecAttention"]))
    names = [n for n, m in model.named_modules() if isinstance(m, tritium.BitLinear)]
    assert names and not any("EncDecAttention" in n for n in names)
    assert any("SelfAttention" in n for n in names)


def test_hidden_factor_interpolation():
    hs = [32, 64, 128, 256]
    fp = {h: 5.0 - 0.5 * math.log2(h) for h in hs}
    q = {h: 5.0 - 0.5 * (math.log2(h) - 1) for h in hs}  # q(2h) == fp(h)
    f = lm.hidden_factors(fp, q)
    assert f[32] == pytest.approx((2.0, "=")) and f[64][0] == pytest.approx(2.0) and f[128][0] == 2.0
    assert f[256] == (1.0, ">")
    q15 = {h: 5.0 - 0.5 * (math.log2(h) - math.log2(1.5)) for h in hs}
    assert lm.hidden_factors(fp, q15)[64][0] == pytest.approx(1.5)
    assert lm.hidden_factors(fp, fp)[32] == (1.0, "<=")
    assert lm.format_factor(1.94, "=") == "1.9x" and lm.format_factor(8, ">") == "> 8x"


def test_lr_schedule_warms_up_then_decays():
    lrs = [lm.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in pairwise(lrs[9:]))


def test_runner_runs_resumes_and_reports(corpus_file, tmp_path, capsys):
    from tritium.cli import main

    argv = ["run", "decoder", "--corpus", str(corpus_file), "--out", str(tmp_path), "--hidden", "32,64",
            "--layers", "1", "--steps", "6", "--batch-size", "4", "--seq-len", "16", "--eval-every", "3",
            "--eval-batches", "1", "--vocab-size", "320", "--precision", "fp32,ptq-1.58-absmedian",
            "--no-progress"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["precision"] for r in rows} == {"fp32", "ptq-1.58-absmedian"}
    ptq = next(r for r in rows if r["precision"].startswith("ptq"))
    assert ptq["layers_converted"] > 0 and ptq["fp32_val_loss"] != ptq["val_loss"]
    fp = next(r for r in rows if r["precision"] == "fp32" and r["hidden"] == ptq["hidden"])
    assert ptq["fp32_val_loss"] == pytest.approx(fp["val_loss"], rel=1e-4)  # reuses the fp32 weights
    for r in rows:
        assert r["gap"] == pytest.approx(r["val_loss"] - r["train_loss"])
        assert r["curves"]["step"][-1] == 6
    assert fp["curves"]["step"] == [0, 3, 6] and ptq["curves"]["step"] == [6, 6]  # fp32 weights, then PTQ
    assert main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    md = (tmp_path / "results.md").read_text()
    assert "decoder_scaling.png" in md and "Train-validation gap" in md
    assert (tmp_path / "decoder_scaling.png").is_file()


@pytest.mark.parametrize("spec,dtype,warmup_lambda", [("fp32", torch.bfloat16, 0), ("1.58-absmedian", None, 2)])
def test_bf16_autocast_and_lambda_warmup_train(spec, dtype, warmup_lambda):
    corpus_ids = torch.arange(40, 300).repeat(20)
    model = build_model("decoder", 300, 32, 1, 16)
    tritium.quantize(model, spec, exclude=quantize_excludes("decoder"))

    def get_batch(step):
        ids = C.random_windows(corpus_ids, 4, 16, torch.Generator().manual_seed(step))
        return {"input_ids": ids, "labels": ids}

    curves = lm.train(model, get_batch, 4, 1e-3, eval_every=2, eval_sets={"val": [get_batch(99)]},
                      dtype=dtype, warmup_lambda=warmup_lambda, progress=False)
    assert all(math.isfinite(v) for v in curves["val_loss"])
    assert all(m.config.lambda_ == 1.0 for _, m in tritium.convert.bit_layers(model))


@pytest.mark.parametrize("spec", [None, "1.58-absmedian"])
def test_fp16_autocast_scales_the_loss_and_resumes_exactly(spec, tmp_path):
    """Under fp16 autocast the gradients go through a GradScaler (a loss of 1e-6 times the real one still
    trains: its float16 gradients would flush to zero unscaled), and a checkpoint keeps the scale: with a loss
    of 100 times the real one, whose scaled gradients overflow until the scale has come down, a run resumed
    from step 3 ends with the same weights as one run straight through."""
    from tritium.experiments.checkpoint import Checkpointer

    corpus_ids = torch.arange(40, 300).repeat(20)

    def get_batch(step):
        ids = C.random_windows(corpus_ids, 4, 16, torch.Generator().manual_seed(step))
        return {"input_ids": ids, "labels": ids}

    class Tiny(torch.nn.Module):  # the decoder's loss times a factor
        def __init__(self, factor):
            super().__init__()
            self.factor = factor
            torch.manual_seed(0)
            self.inner = build_model("decoder", 300, 32, 1, 16)
            if spec:
                tritium.quantize(self.inner, spec, exclude=quantize_excludes("decoder"))

        def forward(self, **b):
            out = self.inner(**b)
            out.loss = out.loss * self.factor
            return out

    def run(factor, ckpt=None, grad_clip=1.0):
        model = Tiny(factor)
        lm.train(model, get_batch, 6, 1e-2, eval_every=100, dtype=torch.float16, progress=False, ckpt=ckpt,
                 grad_clip=grad_clip)
        return model.state_dict()

    start = Tiny(1e-6).state_dict()
    moved = run(1e-6, grad_clip=0.0)
    assert any(not torch.equal(start[k], moved[k]) for k in start)  # scaled fp16 gradients still train
    straight = run(100, Checkpointer(tmp_path, every=3, keep=2))
    meta = json.loads((tmp_path / "ckpt-00000003.json").read_text())
    assert 0 < meta["grad_scaler"]["scale"] < 2.0 ** 16  # came down from its initial 2^16
    for f in tmp_path.glob("ckpt-00000006.*"):  # as if the run had stopped after step 3
        f.unlink()
    resumed = run(100, Checkpointer(tmp_path, every=3, keep=2, resume=True))
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k


@pytest.mark.parametrize("spec", [None, "1.58-absmedian"])
def test_masked_positions_only_keeps_the_mlm_loss_and_gradients(spec):
    """The encoder's head at the labelled positions only: the same loss and gradients as transformers' full head
    (fp32: within float rounding of a different reduction order), the logits of those positions, and calls
    without labels unchanged; the state dict keys stay transformers' own."""
    from tritium.models.transformers import masked_positions_only

    torch.manual_seed(0)
    full = build_model("encoder", 300, 32, 2, 32, 16, 0.0)
    fast = build_model("encoder", 300, 32, 2, 32, 16, 0.0)
    fast.load_state_dict(full.state_dict())
    masked_positions_only(fast)
    if spec:
        for m in (full, fast):
            tritium.quantize(m, spec, exclude=quantize_excludes("encoder"))
    assert list(fast.state_dict()) == list(full.state_dict())
    ids = torch.randint(5, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, ::7] = ids[:, ::7]  # some labelled positions per row
    labels[2] = -100  # and a row without any
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out_full, out_fast = full(**batch), fast(**batch)
    assert out_fast.logits.shape == (int((labels != -100).sum()), 300)
    torch.testing.assert_close(out_fast.logits, out_full.logits[labels != -100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_fast.loss, out_full.loss, rtol=1e-6, atol=1e-6)
    out_full.loss.backward()
    out_fast.loss.backward()
    for (name, a), b in zip(full.named_parameters(), fast.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without labels: transformers' forward, all positions
        torch.testing.assert_close(fast(input_ids=ids).logits, full(input_ids=ids).logits)
    none = {**batch, "labels": torch.full_like(ids, -100)}
    assert torch.isnan(fast(**none).loss) and torch.isnan(full(**none).loss)  # no label: both NaN, as transformers
