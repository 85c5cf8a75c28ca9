"""Bad command lines: each gives exactly one line on stderr naming the option, nothing on stdout, exit 2."""

from __future__ import annotations

import argparse
import json

import pytest

from tritium import args as argtypes
from tritium import cli
from tritium.cli import main

OUT = "{tmp}/out"

CASES = [
    # tritium demo
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--precision", ""], "--precision"),
    (["demo", "--precision", "1.58-foo"], "--precision"),
    (["demo", "--precision", "ptq-1.58-absmean"], "--precision"),
    # tritium run: the common options
    (["run", "xor", "--hidden", "0"], "--hidden"),
    (["run", "xor", "--precision", ""], "--precision"),
    (["run", "xor", "--precision", "fp32,,1.58-absmean"], "--precision"),
    (["run", "xor", "--precision", "3-absmax"], "--precision"),
    (["run", "xor", "--seeds", "x"], "--seeds"),
    (["run", "xor", "--seeds", "0"], "--seeds"),
    (["run", "xor", "--protocol", "nope"], "--protocol"),
    (["run", "xor", "--protocol", "../xor_quick"], "--protocol"),
    (["run", "xor", "--threads", "0"], "--threads"),
    (["run", "xor", "--threads", "two"], "--threads"),
    (["run", "xor", "--nproc", "0"], "--nproc"),
    (["run", "xor", "--grad-accum", "0"], "--grad-accum"),
    (["run", "xor", "--grad-accum", "2"], "--grad-accum"),
    (["run", "xor", "--ckpt-every", "-1"], "--ckpt-every"),
    (["run", "xor", "--keep-ckpts", "-1"], "--keep-ckpts"),
    (["run", "xor", "--keep-ckpts", "0"], "--keep-ckpts"),
    (["run", "xor", "--data-dir", "{tmp}/missing"], "--data-dir"),
    (["run", "xor", "--out", "{file}"], "--out"),
    (["run", "xor", "--out", "{file}/sub"], "--out"),
    (["run", "xor", "--out", "/proc/no-such-dir/out"], "--out"),
    (["run", "xor"], "--out"),
    (["run", "nope"], "TASK"),
    (["run", "xor", "--bogus"], "--bogus"),
    # --set
    (["run", "xor", "--set", "lr=abc"], "lr=abc"),
    (["run", "xor", "--set", "lr=-0.1"], "lr=-0.1"),
    (["run", "xor", "--set", "hidden=0"], "hidden=0"),
    (["run", "xor", "--set", "epochs=2.5"], "epochs=2.5"),
    (["run", "xor", "--set", "noequals"], "--set"),
    (["run", "xor", "--set", "foo=1"], "foo"),
    (["run", "xor", "--set", "out=x"], "out"),
    (["run", "xor", "--set", "precision=3-absmax"], "precision=3-absmax"),
    (["run", "gnn", "--set", "arch=mlp"], "arch=mlp"),
    (["run", "gnn", "--set", "normalize_features=3"], "normalize_features=3"),
    (["run", "mlp", "--set", "dropout=1.5"], "dropout=1.5"),
    (["run", "mlp", "--set", "input_layer=x"], "input_layer=x"),
    (["run", "decoder", "--set", "exclude=(("], "exclude=(("),
    (["run", "decoder", "--set", "quantize_heads=maybe"], "quantize_heads=maybe"),
    # the tasks' own options
    (["run", "xor", "--epochs", "-3"], "--epochs"),
    (["run", "xor", "--noise", "-1"], "--noise"),
    (["run", "gnn", "--arch", "mlp"], "--arch"),
    (["run", "gnn", "--dataset", "Foo"], "--dataset"),
    (["run", "gnn", "--epochs", "0"], "--epochs"),
    (["run", "mlp", "--batch-size", "0"], "--batch-size"),
    (["run", "mlp", "--min-count", "-1"], "--min-count"),
    (["run", "mlp", "--input-layer", "x"], "--input-layer"),
    (["run", "mlp", "--dataset", ""], "--dataset"),
    (["run", "mlp", "--precision", "cqat0.5-1.58-absmedian"], "continual QAT"),
    (["run", "gnn", "--precision", "fp32,cqat0.25-1.58"], "cqat0.25-1.58-absmedian"),
    (["run", "decoder", "--exclude", "(("], "--exclude"),
    (["run", "decoder", "--hidden", "abc"], "--hidden"),
    (["run", "decoder", "--hidden", "30"], "--hidden"),
    (["run", "decoder", "--head-dim", "0"], "--head-dim"),
    (["run", "decoder", "--layers", "0"], "--layers"),
    (["run", "decoder", "--val-fraction", "1.5"], "--val-fraction"),
    (["run", "decoder", "--vocab-size", "10"], "--vocab-size"),
    (["run", "decoder", "--tokenizer", "x"], "--tokenizer"),
    (["run", "decoder", "--lr", "abc"], "--lr"),
    (["run", "decoder", "--lr", "nan"], "--lr"),
    (["run", "decoder", "--dropout", "1"], "--dropout"),
    (["run", "decoder", "--steps", "0"], "--steps"),
    (["run", "decoder", "--seq-len", "1"], "--seq-len"),
    (["run", "decoder", "--warmup", "-1"], "--warmup"),
    (["run", "decoder", "--min-lr-ratio", "2"], "--min-lr-ratio"),
    (["run", "decoder", "--weight-decay", "-1"], "--weight-decay"),
    (["run", "decoder", "--eval-every", "0"], "--eval-every"),
    (["run", "decoder", "--eval-batches", "0"], "--eval-batches"),
    (["run", "decoder", "--warmup-lambda", "-5"], "--warmup-lambda"),
    (["run", "decoder", "--corpus", ""], "--corpus"),
    (["run", "decoder", "--batch-size", "3", "--nproc", "2"], "--batch-size"),
    # tritium export / info
    (["export", "{file}", "{tmp}/out", "--format", "hf-bitnet", "--qtype", "tq1_0"], "--qtype"),
    (["export", "{file}", "{tmp}/out", "--format", "hf-bitnet", "--float-type", "f16"], "--float-type"),
    (["export", "{file}", "{tmp}/out", "--format", "tritium", "--qtype", "tq2_0"], "--qtype"),
    (["export", "{file}", "{file}", "--format", "hf-bitnet"], "OUT"),
    (["export", "{file}", "{tmp}", "--format", "tritium"], "OUT"),
    (["export", "{file}", "{tmp}/out", "--format", "onnx"], "--format"),
    (["export", "{tmp}/missing", "{tmp}/out"], "missing"),
    (["info", "{tmp}/missing"], "missing"),
    # tritium bench ...
    (["bench", "kernels", "--shapes", "1x0x4"], "--shapes"),
    (["bench", "kernels", "--shapes", "2x3"], "--shapes"),
    (["bench", "kernels", "--repeats", "0"], "--repeats"),
    (["bench", "kernels", "--threads", "0"], "--threads"),
    (["bench", "kernels", "--json", "{file}/k.json"], "--json"),
    (["bench", "optim", "--json", ""], "--json"),
    (["bench", "kernels", "--json", "{tmp}"], "--json"),
    (["bench", "train", "--dim", "0"], "--dim"),
    (["bench", "train", "--warmup", "-1"], "--warmup"),
    (["bench", "train", "--json", "{file}/t.json"], "--json"),
    (["bench", "optim", "--steps", "0"], "--steps"),
    (["bench", "optim", "--vocab", "-5"], "--vocab"),
    (["bench", "model", "--heads", "0"], "--heads"),
    (["bench", "model", "--hidden", "1000"], "--hidden"),
    (["bench", "model", "--tokens", "0"], "--tokens"),
]


def _fill(argv: list[str], tmp_path) -> list[str]:
    file = tmp_path / "a-file"
    file.write_text("x")
    return [a.format(tmp=tmp_path, file=file) for a in argv]


def _assert_one_line_error(rc: int, captured, option: str) -> None:
    assert rc == 2, captured
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert option in lines[0], lines[0]


@pytest.mark.parametrize("argv, option", CASES, ids=[" ".join(a) or "empty" for a, _ in CASES])
def test_bad_argument_is_one_line_and_exit_2(argv, option, tmp_path, capsys):
    argv = _fill(argv, tmp_path)
    if argv[0] == "run" and "--out" not in argv and argv != ["run", "xor"]:
        argv += ["--out", str(tmp_path / "out")]
    rc = main(argv)
    _assert_one_line_error(rc, capsys.readouterr(), option)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_existing_checkpoints_without_resume(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "decoder", "--precision", "fp32", "--set", "hidden=32", "--out", str(out)]
    assert main([*argv, "--dry-run"]) == 0
    key = capsys.readouterr().out.splitlines()[1].split()[0]
    ckpt = out / "runs" / key / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "ckpt-00000004.json").write_text(json.dumps({"step": 4}))
    _assert_one_line_error(main(argv), capsys.readouterr(), "--resume")


def test_help_exits_0(capsys):
    assert main(["run", "xor", "--help"]) == 0
    assert "--hidden" in capsys.readouterr().out


def test_missing_input_file_is_a_message_but_internal_errors_are_not(tmp_path, capsys, monkeypatch):
    import types

    module = types.ModuleType("fake")
    module.add_arguments = lambda p: p.add_argument("path")

    def run(args):
        open(args.path).close()

    module.run = run
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake", "a command reading a file"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: module)
    _assert_one_line_error(main(["fake", str(tmp_path / "nope.bin")]), capsys.readouterr(), "nope.bin")

    def broken(args):
        open(tmp_path / "internal.bin").close()

    module.run = broken
    with pytest.raises(FileNotFoundError):  # a file the user did not name: a real error, kept as such
        main(["fake", "x"])


@pytest.mark.parametrize("check, good, bad", [
    (argtypes.positive_int, [("3", 3), (4, 4), (2.0, 2)], ["0", "-1", "x", "2.5", True, None, ""]),
    (argtypes.nonnegative_int, [("0", 0)], ["-1", "1e3x"]),
    (argtypes.positive_float, [("1e-3", 1e-3), (2, 2.0)], ["0", "inf", "nan", "x"]),
    (argtypes.nonnegative_float, [("0", 0.0)], ["-0.1"]),
    (argtypes.fraction, [("0.1", 0.1)], ["0", "1", "1.5"]),
    (argtypes.unit_interval, [("0", 0.0), ("1", 1.0)], ["1.01", "-0.01"]),
    (argtypes.probability, [("0", 0.0), ("0.5", 0.5)], ["1", "-0.1"]),
    (argtypes.boolean, [("true", True), (False, False), ("0", False)], ["maybe", 3]),
    (argtypes.regex, [("a|b", "a|b")], ["((", "*"]),
    (argtypes.comma_list, [(" a, b ", "a,b"), (["x", "y"], "x,y")], ["", "a,,b", ","]),
    (argtypes.positive_int_list, [("32,64", "32,64"), (64, "64"), ([8, 16], "8,16")], ["32,x", "0", ""]),
    (argtypes.choice_list("sgc", "gcn"), [("SGC,gcn", "sgc,gcn")], ["mlp", ""]),
])
def test_argument_types(check, good, bad):
    for value, want in good:
        assert check(value) == want
    for value in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            check(value)
