"""Smoke run of ``tritium bench model`` on a tiny decoder (workers run in-process; no timing asserts)."""

import json

import pytest

from tritium.bench import model as bench
from tritium.cli import main as cli_main

pytest.importorskip("transformers")


def test_bench_model_tiny(tmp_path, monkeypatch, capsys):
    calls = []

    def spawn_in_process(variant, args, work):
        cmd = bench._worker_cmd(variant, args, work)
        assert cmd[1:3] == ["-m", "tritium.cli"]
        calls.append(variant)
        assert cli_main(cmd[3:]) == 0

    monkeypatch.setattr(bench, "_spawn", spawn_in_process)
    out = tmp_path / "bench.json"
    argv = ["bench", "model", "--quick", "--hidden", "32", "--layers", "1", "--intermediate", "48",
            "--heads", "4", "--vocab", "64", "--tokens", "3", "--storage", "base3", "--json", str(out)]
    assert cli_main(argv) == 0
    assert calls == list(bench.VARIANTS)
    text = capsys.readouterr().out
    assert "decode tok/s" in text and "linear weights" in text and "targets" in text
    r = json.loads(out.read_text())
    assert set(r["variants"]) == set(bench.VARIANTS)
    assert r["sizes"]["file_bytes_ternary"] < r["sizes"]["file_bytes_fp32"]
    assert r["ratios"]["linear_weight_ratio"] > 8
    for v in r["variants"].values():
        assert v["tokens_per_s"] > 0 and v["peak_rss_mb"] > 0
