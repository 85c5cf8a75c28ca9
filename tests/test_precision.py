"""`tritium.Precision`: the precision strings of experiment runs, and autocast in every task."""

import argparse
import json
import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tritium
from tritium import BitConfig, Precision, parse_precision, parse_spec
from tritium.cli import main
from tritium.experiments import gnn, lm, report, runner

# string, canonical string, family, nominal bits, training spec, autocast, PTQ spec
TABLE = [
    ("fp32", "fp32", "fp", 32, None, None, None),
    ("bf16", "bf16", "fp", 16, None, "bf16", None),
    ("FP16", "fp16", "fp", 16, None, "fp16", None),
    ("1.58", "1.58-absmedian", "qat", 1.58, "1.58-absmedian", None, None),
    (" 1.58-absmean ", "1.58-absmean", "qat", 1.58, "1.58-absmean", None, None),
    ("1-absmean", "1-absmean", "qat", 1, "1-absmean", None, None),
    ("2-absmax-channel", "2-absmax-channel", "qat", 2, "2-absmax-channel", None, None),
    ("4-absmax-group128", "4-absmax-group128", "qat", 4, "4-absmax-group128", None, None),
    ("8-absmax-afp", "8-absmax-afp", "qat", 8, "8-absmax-afp", None, None),
    ("1.58-absmedian+bf16", "1.58-absmedian+bf16", "qat", 1.58, "1.58-absmedian", "bf16", None),
    ("1.58-absmean-a4+fp16", "1.58-absmean-a4+fp16", "qat", 1.58, "1.58-absmean-a4", "fp16", None),
    ("ptq-1.58-absmedian", "ptq-1.58-absmedian", "ptq", 1.58, None, None, "1.58-absmedian"),
    ("ptq-1.58", "ptq-1.58-absmedian", "ptq", 1.58, None, None, "1.58-absmedian"),
    ("PTQ-4-absmax+BF16", "ptq-4-absmax+bf16", "ptq", 4, None, "bf16", "4-absmax"),
]


@pytest.mark.parametrize("text, canonical, family, bits, train, autocast, ptq", TABLE)
def test_parse_table(text, canonical, family, bits, train, autocast, ptq):
    p = parse_precision(text)
    assert Precision.parse(text) == p
    assert str(p) == canonical and parse_precision(str(p)) == p
    assert p.family == family and p.nominal_bits == bits and isinstance(p.nominal_bits, float)
    assert p.train == (train and parse_spec(train)) and p.ptq == (ptq and parse_spec(ptq))
    assert p.autocast == autocast
    assert p.autocast_dtype == {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    assert p.config == (p.train or p.ptq)
    assert p.before_ptq == Precision(p.train, p.autocast) and p.before_ptq.ptq is None


def test_scheme_is_the_string_without_its_bit_width():
    assert [parse_precision(s).scheme for s in ("fp32", "bf16", "1.58-absmean", "2-absmax-group64+bf16",
                                                "ptq-4-absmax")] == \
        ["fp32", "bf16", "absmean", "absmax-group64+bf16", "ptq-absmax"]


@pytest.mark.parametrize("text, part", [
    ("", "empty"),
    ("   ", "empty"),
    ("3-absmax", "weight_bits=3"),
    ("ptq-3-absmax", "weight_bits=3"),
    ("1.58-absfoo", "'absfoo'"),
    ("ptq-1.58-absfoo+bf16", "'absfoo'"),
    ("1.58-absmedian+bf8", "'+bf8'"),
    ("1.58+bf16+bf16", "'+bf16+bf16'"),
    ("fp32+bf16", "write 'bf16'"),
    ("bf16+fp16", "follows a float"),
    ("ptq-fp32", "needs a quantizer spec"),
    ("ptq-", "no quantizer spec"),
    ("+bf16", "no quantizer spec"),
    ("bf16-1.58-absmedian", "'bf16'"),
    ("int8", "'int8'"),
])
def test_bad_strings_name_the_string_and_the_bad_part(text, part):
    with pytest.raises(ValueError) as e:
        parse_precision(text)
    assert f"bad precision spec {text!r}" in str(e.value) and part in str(e.value)


@pytest.mark.parametrize("text, canonical, switch_at, scheme", [
    ("cqat0.5-1.58-absmedian+bf16", "cqat0.5-1.58-absmedian+bf16", 0.5, "cqat0.5-absmedian+bf16"),
    ("CQAT.25-1.58", "cqat0.25-1.58-absmedian", 0.25, "cqat0.25-absmedian"),
    ("cqat0.500000-1.58-absmean", "cqat0.5-1.58-absmean", 0.5, "cqat0.5-absmean"),
    ("cqat0.123456-2-absmax+fp16", "cqat0.123456-2-absmax+fp16", 0.123456, "cqat0.123456-absmax+fp16"),
])
def test_continual_qat_strings(text, canonical, switch_at, scheme):
    p = parse_precision(text)
    assert str(p) == canonical and parse_precision(str(p)) == p and p.switch_at == switch_at
    assert p.family == "qat" and p.train == parse_spec(canonical.split("-", 1)[1].split("+")[0])
    assert p.scheme == scheme and p.nominal_bits == p.train.weight_bits
    assert p.before_ptq == p and p.before_switch == Precision(autocast=p.autocast)
    assert parse_precision("1.58-absmedian").before_switch == parse_precision("1.58-absmedian")
    assert p != Precision(p.train, p.autocast)  # continual QAT is not QAT from the start


@pytest.mark.parametrize("text, part", [
    ("cqat1-1.58", "strictly between 0 and 1"),
    ("cqat0-1.58", "strictly between 0 and 1"),
    ("cqat-1.58", "expected 'cqat<F>-<spec>'"),
    ("cqat0.5", "expected 'cqat<F>-<spec>'"),
    ("cqat0.1234567-1.58", "at most 6 decimals"),
    ("cqat0.5-", "needs a quantizer spec"),
    ("cqat0.5-bf16", "needs a quantizer spec, not 'bf16'"),
    ("cqat0.5-ptq-1.58", "exclude each other"),
    ("cqat0.5-1.58-absfoo", "'absfoo'"),
    ("cqat0.5-1.58+bf8", "'+bf8'"),
])
def test_bad_continual_qat_strings(text, part):
    with pytest.raises(ValueError) as e:
        parse_precision(text)
    assert f"bad precision spec {text!r}" in str(e.value) and part in str(e.value)


def test_continual_qat_constructor_checks():
    assert Precision(BitConfig(), "bf16", None, 0.5) == parse_precision("cqat0.5-1.58+bf16")
    assert Precision(BitConfig(), None, None, 0.1234567).switch_at == 0.123457  # the canonical string's value
    with pytest.raises(ValueError, match="needs a training config"):
        Precision(None, "bf16", None, 0.5)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        Precision(BitConfig(), None, None, 1.0)
    with pytest.raises(TypeError, match="switch_at"):
        Precision(BitConfig(), None, None, "0.5")


def test_constructor_checks_its_fields():
    assert Precision() == parse_precision("fp32")
    assert Precision(BitConfig(), "bf16") == parse_precision("1.58-absmedian+bf16")
    with pytest.raises(ValueError, match="autocast='fp8'"):
        Precision(autocast="fp8")
    with pytest.raises(ValueError, match="not both"):
        Precision(BitConfig(), None, BitConfig())
    with pytest.raises(TypeError):
        parse_precision(None)


def test_autocast_context():
    with parse_precision("1.58-absmedian+bf16").autocast_context("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.Linear(4, 2)(torch.randn(3, 4)).dtype == torch.bfloat16
    with parse_precision("1.58-absmedian").autocast_context("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_config_module_does_not_import_torch():
    path = Path(tritium.config.__file__)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cfg', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['cfg'] = m; spec.loader.exec_module(m)\n"
            "assert str(m.parse_precision('ptq-1.58+bf16')) == 'ptq-1.58-absmedian+bf16'\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runner_records_canonical_strings_once():
    args = argparse.Namespace(precision="fp32, 1.58,BF16,1.58-absmedian,ptq-2-absmax+bf16")
    assert runner.precisions(args) == ["fp32", "1.58-absmedian", "bf16", "ptq-2-absmax+bf16"]
    with pytest.raises(ValueError, match="'1.58-absmedian\\+bf8'"):
        runner.precisions(argparse.Namespace(precision="fp32,1.58-absmedian+bf8"))


def test_report_groups_bf16_as_16_bits(tmp_path):
    precs = ["1.58-absmedian", "ptq-1.58-absmedian", "bf16", "2-absmax", "fp32", "1.58-absmedian+bf16",
             "2-absmax+bf16", "4-absmax"]
    assert sorted(precs, key=report.precision_order) == [
        "fp32", "bf16", "4-absmax", "2-absmax", "2-absmax+bf16", "1.58-absmedian", "1.58-absmedian+bf16",
        "ptq-1.58-absmedian"]
    assert report.precision_order("not a precision") > report.precision_order("ptq-1-absmean")
    rows = [{"task": "t", "dataset": "A", "precision": p, "seed": s, "test_acc": 0.5 + i / 100 + s / 1000}
            for i, p in enumerate(precs) for s in (0, 1)]
    assert report.bit_widths(rows) == {32.0, 16.0, 4.0, 2.0, 1.58}
    lines = report.summary_table(rows, ("dataset",), "test_acc").splitlines()
    assert [line.split(" | ")[0] for line in lines[2:2 + len(precs)]] == [
        "| fp32", "| bf16", "| 4-absmax", "| 2-absmax", "| 2-absmax+bf16", "| 1.58-absmedian",
        "| 1.58-absmedian+bf16", "| ptq-1.58-absmedian"]
    assert report.plot_vs_bits(rows, ("dataset",), "test_acc", tmp_path / "b.png").is_file()


def test_lm_report_compares_with_fp32_and_lists_bf16_variants(tmp_path):
    rows = [{"task": "decoder", "hidden": h, "precision": p, "seed": 0, "train_loss": loss - 0.1, "val_loss": loss,
             "gap": 0.1, "fp32_val_loss": loss - 1}
            for h in (32, 64) for p, loss in (("bf16", 4.0), ("fp32", 4.0), ("1.58-absmedian+bf16", 4.5),
                                              ("ptq-1.58-absmedian+bf16", 6.0))]
    md = lm.report(rows, tmp_path)
    assert "reaches the fp32 `val_loss`" in md and "| 1.58-absmedian+bf16 |" in md
    assert "| ptq-1.58-absmedian+bf16 | 5.000 → 6.000 |" in md
    assert "| bf16 | <=" not in md  # float runs are references, not compared


@contextmanager
def forwards():
    """Record ``(module class, training, autocast dtype or None, output dtype or None)`` of every module
    forward."""
    seen = []

    def hook(module, inputs, output):
        on = torch.is_autocast_enabled("cpu")
        seen.append((type(module).__name__, module.training, torch.get_autocast_dtype("cpu") if on else None,
                     output.dtype if isinstance(output, torch.Tensor) else None))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def assert_bf16_forwards(seen, model_class):
    """Every forward of the model ran under bf16 autocast, in training and evaluation, and every linear
    layer computed in bf16."""
    runs = [s for s in seen if s[0] == model_class]
    assert {s[1] for s in runs} == {True, False}
    assert {s[2] for s in runs} == {torch.bfloat16}
    layers = [s for s in seen if s[0] in ("Linear", "BitLinear")]
    assert {s[1] for s in layers} == {True, False}
    assert {s[2:] for s in layers} == {(torch.bfloat16, torch.bfloat16)}


def test_xor_trains_and_evaluates_bf16_under_autocast(tmp_path):
    argv = ["run", "xor", "--set", "epochs=2", "--seeds", "1", "--no-progress", "--out", str(tmp_path)]
    with forwards() as seen:
        assert main([*argv, "--precision", "fp32"]) == 0
    assert {s[2:] for s in seen if s[0] in ("XorMLP", "Linear")} == {(None, torch.float32)}
    with forwards() as seen:
        assert main([*argv, "--precision", "bf16,1.58-absmean+bf16,ptq-2-absmax+bf16"]) == 0
    assert_bf16_forwards(seen, "XorMLP")
    assert any(s[0] == "BitLinear" and s[2] == torch.bfloat16 for s in seen)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "1.58-absmean+bf16", "ptq-2-absmax+bf16"]
    assert [r["layers_converted"] for r in rows] == [0, 0, 2, 2]


def test_mlp_trains_and_evaluates_bf16_under_autocast(tmp_path):
    from test_data import write_text_gcn

    write_text_gcn(tmp_path)
    argv = ["run", "mlp", "--dataset", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
            "--no-progress", "--precision", "bf16,1.58-absmedian+bf16", "--set", "epochs=2", "--set", "hidden=8",
            "--set", "val_fraction=0.2", "--set", "min_count=1"]
    with forwards() as seen:
        assert main(argv) == 0
    assert_bf16_forwards(seen, "WideMLP")
    assert any(s[0] == "BitLinear" and s[2] == torch.bfloat16 for s in seen)


@pytest.mark.parametrize("arch", ["sgc", "gcn"])
def test_gnn_trains_and_evaluates_bf16_under_autocast(arch, monkeypatch):
    import tritium.data.planetoid as planetoid

    g = torch.Generator().manual_seed(0)
    n = 12
    data = SimpleNamespace(x=torch.rand(n, 6, generator=g), y=torch.arange(n) % 3, num_features=6,
                           edge_index=torch.randint(0, n, (2, 30), generator=g),
                           train_mask=torch.arange(n) < 6, val_mask=(torch.arange(n) >= 6) & (torch.arange(n) < 9),
                           test_mask=torch.arange(n) >= 9)
    monkeypatch.setattr(planetoid, "load_planetoid", lambda *a, **k: data)
    cfg = {"task": "gnn", "arch": arch, "dataset": "toy", "seed": 0, "epochs": 2, "lr": 0.01, "weight_decay": 0.0,
           "normalize_features": False, **({"k": 2} if arch == "sgc" else {"hidden": 4, "dropout": 0.5})}
    args = argparse.Namespace(data_dir=None, no_progress=True)
    for precision in ("bf16", "1.58-absmedian+bf16"):
        with forwards() as seen:
            out = gnn.run_one({**cfg, "precision": precision}, args)
        assert_bf16_forwards(seen, arch.upper())
        assert 0 <= out["test_acc"] <= 1


def test_lm_trains_evaluates_and_reuses_bf16_under_autocast(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_lm import make_text

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text())
    argv = ["run", "decoder", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--hidden", "32",
            "--layers", "1", "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--eval-every", "3",
            "--eval-batches", "1", "--vocab-size", "320", "--precision", "bf16,ptq-1.58-absmedian+bf16",
            "--threads", "1", "--no-progress"]
    with forwards() as seen:
        assert main(argv) == 0
    assert_bf16_forwards(seen, "LlamaForCausalLM")
    rows = {r["precision"]: r for r in map(json.loads, (tmp_path / "o" / "results.jsonl").read_text().splitlines())}
    bf16, ptq = rows["bf16"], rows["ptq-1.58-absmedian+bf16"]
    assert ptq["fp32_val_loss"] == pytest.approx(bf16["val_loss"], rel=1e-4)  # the bf16 run's weights
    assert ptq["layers_converted"] > 0 and ptq["curves"]["step"] == [3, 3]


def test_fp16_autocast_trains_through_a_grad_scaler(tmp_path, monkeypatch):
    """xor and mlp (sparse embedding gradients) under fp16 autocast: every optimizer step goes through an
    enabled GradScaler, and the runs finish with finite results; bf16 steps through a disabled one."""
    from test_data import write_text_gcn

    steps = []
    step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step",
                        lambda self, opt, *a, **k: steps.append(self.is_enabled()) or step(self, opt, *a, **k))
    out = tmp_path / "o"
    assert main(["run", "xor", "--set", "epochs=3", "--seeds", "1", "--no-progress", "--out", str(out),
                 "--precision", "fp16,1.58-absmean+fp16"]) == 0
    assert steps == [True] * 6
    write_text_gcn(tmp_path)
    assert main(["run", "mlp", "--dataset", "tiny", "--data-dir", str(tmp_path), "--out", str(out), "--no-progress",
                 "--precision", "1.58-absmedian+fp16,bf16", "--set", "epochs=2", "--set", "hidden=8",
                 "--set", "val_fraction=0.2", "--set", "min_count=1"]) == 0
    assert steps[6:] and True in steps[6:] and False in steps[6:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["test_acc"]) and math.isfinite(r["final_train_loss"]) for r in rows)
    assert parse_precision("fp16").grad_scaler().is_enabled()
    assert not parse_precision("1.58-absmedian+bf16").grad_scaler().is_enabled()
    assert not parse_precision("fp32").grad_scaler().is_enabled()
