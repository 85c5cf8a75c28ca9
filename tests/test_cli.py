"""The command line: routing, the demo and the training benchmark (tiny shapes, no timing asserts)."""

import json

import pytest

from tritium.cli import main


def test_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "bench kernels" in capsys.readouterr().out
    assert main([]) == 2
    assert "usage: tritium COMMAND" in capsys.readouterr().err
    for argv in (["frobnicate"], ["bench", "nope"], ["bench"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: unknown command {' '.join(argv)!r}")


def test_demo_runs_end_to_end(capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    for precision in ("fp32", "1.58-absmean", "1.58-absmedian"):
        assert precision in out
    assert out.count("yes (bit-exact)") == 2


def test_bench_train_tiny(tmp_path, capsys):
    path = tmp_path / "train.json"
    main(["bench", "train", "--dim", "32", "--batch", "2", "--seq", "8", "--repeats", "2", "--warmup", "1",
          "--json", str(path)])
    data = json.loads(path.read_text())
    assert set(data["variants"]) == {"nn.Linear", "tritium absmean", "tritium absmedian", "nn.Linear bf16",
                                     "tritium absmedian bf16"}
    base = data["variants"]["nn.Linear"]
    assert base["time_ratio"] == 1.0 and base["memory_ratio"] == 1.0
    for v in data["variants"].values():
        assert v["peak_mib"] > 0 and len(v["times_ms"]) == 2
    out = capsys.readouterr().out
    assert "tritium absmedian" in out and "peak MiB" in out


def test_bench_optim_tiny(tmp_path, capsys):
    path = tmp_path / "optim.json"
    main(["bench", "optim", "--vocab", "50", "--hidden", "8", "--doc-len", "5", "--batch", "3", "--steps", "4",
          "--repeats", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    assert list(data["variants"]) == ["AdamW (fused)", "LazyAdamW"]
    assert data["variants"]["AdamW (fused)"]["speedup"] == 1.0
    assert all(len(v["times_ms"]) == 2 for v in data["variants"].values())
    assert "LazyAdamW" in capsys.readouterr().out


def test_peak_memory_tracks_live_tensors():
    import torch

    from tritium.bench.common import PeakMemory

    base = torch.ones(1000)  # counted explicitly, like parameters
    mem = PeakMemory()
    mem.count(base)
    with mem:
        a = base * 2  # +4000
        b = a + 1  # +4000 -> peak 12000
        del a, b  # freed
        c = base * 3  # +4000 while peak stays 12000
    assert mem.peak == 12000 and mem.current == 8000
    del c
