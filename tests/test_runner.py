import argparse
import json

import pytest

from tritium.cli import main
from tritium.experiments import report, runner, xor

XOR = ["run", "xor", "--set", "epochs=20", "--seeds", "2", "--precision", "fp32,1.58-absmean", "--no-progress"]


def rows_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_xor_grid_runs_reports_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main([*XOR, "--out", str(out)]) == 0
    rows = rows_of(out)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert {(r["precision"], r["seed"]) for r in rows} == {(p, s) for p in ("fp32", "1.58-absmean") for s in (0, 1)}
    r = rows[0]
    for k in ("test_acc", "best_val_acc", "last_val_acc", "wall_s", "bits_per_weight", "quantized_params",
              "epochs", "lr", "curves"):
        assert k in r
    md = (out / "results.md").read_text()
    assert "## xor" in md and "| 1.58-absmean |" in md and "first-layer weights" in md
    assert (out / "xor_test_acc.png").is_file() and (out / "xor_curves.png").is_file()

    def no_training(cfg, args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(xor, "run_one", no_training)
    assert main([*XOR, "--out", str(out)]) == 0
    assert len(rows_of(out)) == 4


def test_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    out = tmp_path / "out"
    assert main([*XOR, "--seeds", "1", "--precision", "fp32", "--out", str(out)]) == 0
    path = out / "results.jsonl"
    good = path.read_text()
    path.write_text(good + '{"key": "abc", "task": "xor", "test_')
    assert len(runner.read_rows(path)) == 1
    assert main([*XOR, "--seeds", "2", "--precision", "fp32", "--out", str(out)]) == 0
    rows = rows_of(out)  # every line parses: the torn fragment is gone
    assert [r["seed"] for r in rows] == [0, 1]
    assert path.read_text().startswith(good)


def test_missing_dataset_gives_clear_error(tmp_path, capsys):
    rc = main(["run", "mlp", "--dataset", "nope", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "text_gcn/data/corpus/nope.txt" in err


def test_mlp_task_end_to_end_on_tiny_data(tmp_path):
    from test_data import write_text_gcn

    write_text_gcn(tmp_path)
    out = tmp_path / "o"
    args = ["run", "mlp", "--dataset", "tiny", "--data-dir", str(tmp_path), "--out", str(out), "--no-progress",
            "--precision", "fp32,ptq-1.58-absmedian,4-absmax", "--set", "epochs=2", "--set", "hidden=8",
            "--set", "val_fraction=0.2", "--set", "min_count=1"]
    assert main(args) == 0
    rows = rows_of(out)
    assert [r["precision"] for r in rows] == ["fp32", "ptq-1.58-absmedian", "4-absmax"]
    assert [r["layers_converted"] for r in rows] == [0, 1, 1]
    assert all(0 <= r["test_acc"] <= 1 for r in rows)
    assert (out / "mlp_test_acc_vs_bits.png").is_file()


def test_bad_precision_and_protocol(tmp_path, capsys):
    assert main(["run", "xor", "--precision", "3-absmax", "--out", str(tmp_path)]) == 2
    assert "bad precision spec" in capsys.readouterr().err
    assert main(["run", "xor", "--protocol", "nope", "--out", str(tmp_path)]) == 2


def test_run_key_is_order_independent():
    assert runner.run_key({"a": 1, "b": [1, 2]}) == runner.run_key({"b": [1, 2], "a": 1})
    assert runner.run_key({"a": 1}) != runner.run_key({"a": 2})


def test_summary_table_and_plots(tmp_path):
    rows = [{"task": "t", "dataset": d, "precision": p, "seed": s, "test_acc": a + s / 100}
            for d, a0 in (("A", 0.8), ("B", 0.6)) for p, a in (("fp32", a0), ("2-absmax", a0 - 0.1),
                                                              ("1.58-absmean", a0 - 0.05)) for s in (0, 2)]
    table = report.summary_table(rows, ("dataset",), "test_acc")
    lines = table.splitlines()
    assert lines[0] == "| precision | A | B | avg |"
    assert lines[2] == "| fp32 | 81.00 ± 1.41 | 61.00 ± 1.41 | 71.00 |"
    assert lines[3].startswith("| 2-absmax |") and lines[4].startswith("| 1.58-absmean |")
    assert report.plot_vs_bits(rows, ("dataset",), "test_acc", tmp_path / "b.png").is_file()
    assert report.plot_bars(rows, ("dataset",), "test_acc", tmp_path / "a.png").is_file()


def test_distributed_options_rejected_for_tasks_without_them(tmp_path, capsys):
    from tritium.cli import main

    assert main(["run", "xor", "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "does not support --resume" in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.jsonl").exists()


@pytest.mark.parametrize("text, want", [("3", [0, 1, 2]), ("1-2", [1, 2]), ("4,0", [4, 0]), (2, [0, 1])])
def test_seeds_count_range_or_list(text, want):
    assert runner.seeds(argparse.Namespace(seeds=text)) == want


@pytest.mark.parametrize("text", ["0", "x", "2-", "-1", "1,-2"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(ValueError, match="--seeds"):
        runner.seeds(argparse.Namespace(seeds=text))


def test_bad_seeds_option_is_an_error_message(tmp_path, capsys):
    assert main([*XOR, "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: argument --seeds: expected at least one seed, none negative, got '0'\n"


def test_seed_range_runs_only_those_seeds(tmp_path):
    out = tmp_path / "out"
    assert main([*XOR, "--seeds", "1-2", "--precision", "fp32", "--out", str(out)]) == 0
    assert sorted(r["seed"] for r in rows_of(out)) == [1, 2]


def _xor_cmd(out, *extra):
    import sys

    return [sys.executable, "-m", "tritium", *XOR[:-1], "--set", "epochs=300", "--threads", "1", "--out", str(out),
            *extra]


def test_two_processes_share_one_out_without_duplicates(tmp_path):
    """Two runners started together on one --out: every run is trained once and has exactly one row."""
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    out = tmp_path / "out"
    cmd = _xor_cmd(out, "--seeds", "6", "--precision", "fp32,1.58-absmedian")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    rows = rows_of(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert sorted((r["precision"], r["seed"]) for r in rows) == sorted(
        (p, s) for p in ("fp32", "1.58-absmedian") for s in range(6))
    trained = sum(log.count("test_acc=") for log in logs)
    assert trained == 12, logs  # no run was trained twice
    assert not list((out / runner.CLAIMS).iterdir())  # claims are released
    md = (out / "results.md").read_text()
    assert "6 seed" in md and "12 seed" not in md  # the report counts each seed once


def test_claimed_run_is_left_to_its_owner(tmp_path, capsys):
    out = tmp_path / "out"
    args = [*XOR, "--seeds", "2", "--precision", "fp32", "--out", str(out)]
    assert main([*args, "--dry-run"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    out.mkdir(exist_ok=True)
    fd = runner.claim(out, keys[0])  # held as another process would hold it
    assert fd is not None and runner.claim(out, keys[0]) is None and runner.claimed_elsewhere(out, keys[0])
    assert main(args) == 0
    assert "running in another process, skipped" in capsys.readouterr().out
    assert [r["key"] for r in rows_of(out)] == [keys[1]]
    runner.release(out, keys[0], fd)
    assert main(args) == 0
    assert sorted(r["key"] for r in rows_of(out)) == sorted(keys)


def test_claim_of_a_killed_process_expires(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path
    (out / runner.CLAIMS).mkdir()
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / runner.CLAIMS / "k")], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    assert runner.claim(out, "k") is None
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    fd = runner.claim(out, "k")
    assert fd is not None
    runner.release(out, "k", fd)


def test_rows_already_written_by_another_process_are_not_run_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [*XOR, "--seeds", "1", "--precision", "fp32", "--out", str(out)]
    assert main(args) == 0
    row = rows_of(out)[0]
    (out / "results.jsonl").write_text("")
    real_claim = runner.claim

    def claim_after_other_finished(o, key):  # the other process appends between listing and claiming
        runner.append_row(o / runner.RESULTS, row)
        return real_claim(o, key)

    monkeypatch.setattr(runner, "claim", claim_after_other_finished)
    monkeypatch.setattr(xor, "run_one", lambda cfg, a: pytest.fail("trained a finished run"))
    assert main(args) == 0
    assert len(rows_of(out)) == 1


@pytest.mark.parametrize("task, item, want", [
    ("xor", "epochs=20", ("epochs", 20)),
    ("xor", "lr=1", ("lr", 1)),
    ("xor", "n_train=64", ("n_train", 64)),
    ("mlp", "val_fraction=0.2", ("val_fraction", 0.2)),
    ("mlp", "input_layer=linear", ("input_layer", "linear")),
    ("gnn", "normalize_features=true", ("normalize_features", True)),
    ("decoder", "hidden=32,64", ("hidden", "32,64")),
    ("decoder", "hidden=32", ("hidden", "32")),
    ("decoder", "dropout=0", ("dropout", 0)),
    ("decoder", "epochs=2.0", None),
    ("decoder", "steps=2.0", ("steps", 2)),
    ("decoder", "exclude=attn", ("exclude", ["attn"])),
    ("decoder", 'exclude=["q", "k"]', ("exclude", ["q", "k"])),
    ("decoder", "quantize_heads=true", ("quantize_heads", True)),
    ("decoder", "seeds=1-2", ("seeds", "1-2")),
])
def test_set_values_are_checked_and_kept(task, item, want):
    protocol = runner.load_protocol(task, "quick")
    if want is None:
        with pytest.raises(runner.UsageError, match="unknown setting 'epochs'"):
            runner.setting(task, protocol, item)
    else:
        assert runner.setting(task, protocol, item) == want
