"""Smoke run of ``tritium bench model`` on a tiny decoder (workers run in-process; no timing asserts)."""

import json

import pytest

from tritium.bench import model as bench
from tritium.cli import main as cli_main

pytest.importorskip("transformers")

JIT = tuple(v for v in bench.VARIANTS if not v.endswith("-aot"))  # the rows of a --no-compile run
JIT_PEERS = tuple(v for v in bench.PEERS if not v.endswith("-aot"))


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
    assert "prefill128 ms" in text and "greedy tokens identical to the eager row's" in text
    r = json.loads(out.read_text())
    assert set(r["variants"]) == set(bench.VARIANTS) and r["compiled"]
    assert r["sizes"]["file_bytes_ternary"] < r["sizes"]["file_bytes_fp32"]
    assert r["ratios"]["linear_weight_ratio"] > 8
    for v in r["variants"].values():
        assert v["tokens_per_s"] > 0 and v["peak_rss_mb"] > 0 and v["prefill128_ms"] > 0
    # the compiled row decodes the same tokens as the eager one, and its compilation is timed apart
    assert r["greedy_tokens_compiled_equal_eager"]
    assert r["variants"]["ternary-compiled"]["greedy_tokens"] == r["variants"]["ternary"]["greedy_tokens"]
    assert r["variants"]["ternary-compiled"]["compile_s"] > 0 and r["variants"]["ternary"]["compile_s"] == 0
    assert r["ratios"]["decode_compiled_vs_eager"] > 0 and r["ratios"]["prefill128_compiled_vs_eager"] > 0
    # the ahead-of-time row: compiled before timing, its tokens compared with the eager row's
    assert r["variants"]["ternary-aot"]["compile_s"] > 0 and r["ratios"]["decode_aot_vs_eager"] > 0
    assert r["greedy_tokens_aot_equal_eager"]  # bit-identical logits, so the same tokens
    assert r["variants"]["ternary-aot"]["greedy_tokens"] == r["variants"]["ternary"]["greedy_tokens"]
    assert "ternary-aot: one-token forward compiled ahead of time" in text


def test_bench_model_no_compile_is_passed_to_workers(tmp_path, monkeypatch):
    cmds = []
    monkeypatch.setattr(bench, "_spawn", lambda v, a, w: cmds.append(bench._worker_cmd(v, a, w)) or
                        cli_main(bench._worker_cmd(v, a, w)[3:]))
    argv = ["bench", "model", "--quick", "--no-compile", "--profile", "--hidden", "32", "--layers", "1",
            "--intermediate", "48", "--heads", "4", "--vocab", "64", "--tokens", "2",
            "--json", str(tmp_path / "b.json")]
    assert cli_main(argv) == 0
    assert all("--no-compile" in c and "--profile" in c for c in cmds) and len(cmds) == len(JIT)
    r = json.loads((tmp_path / "b.json").read_text())
    assert not r["compiled"] and r["variants"]["ternary-compiled"]["compile_s"] < 5
    text = bench._report(r)
    assert "NOT compiled" in text and "decode time per token by part" in text
    for name, v in r["variants"].items():  # the parts of a profiled token add up to its wall time
        parts = v["profile"]
        assert parts["total"] > 0 and all(us >= 0 for us in parts.values()), name
        assert sum(us for k, us in parts.items() if k != "total") == pytest.approx(parts["total"], abs=1.0), name
    # the frozen rows spend time in the ternary kernels, the float rows none
    assert r["variants"]["ternary"]["profile"]["ternary linears"] > 0
    assert r["variants"]["fp32"]["profile"]["ternary linears"] == 0


def _in_process(monkeypatch) -> list[str]:
    calls = []

    def spawn(variant, args, work):
        calls.append(variant)
        assert cli_main(bench._worker_cmd(variant, args, work)[3:]) == 0

    monkeypatch.setattr(bench, "_spawn", spawn)
    return calls


TINY_PEERS = ["bench", "model", "--quick", "--peers", "--no-compile", "--hidden", "256", "--layers", "1",
              "--intermediate", "256", "--heads", "4", "--vocab", "64", "--tokens", "3"]


def test_bench_model_peers_tiny(tmp_path, monkeypatch, capsys):
    """With llama-cpp-python, --peers times llama.cpp on the PRESET model's GGUF files and reports the ratios."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"llama-cpp-python is not usable ({type(e).__name__}: {e})")
    calls = _in_process(monkeypatch)
    out = tmp_path / "bench.json"
    assert cli_main([*TINY_PEERS, "--json", str(out)]) == 0
    assert calls == list(JIT + JIT_PEERS)
    text = capsys.readouterr().out
    assert "llamacpp-tq2_0" in text and "llamacpp-tq1_0" in text and "norm=None" in text
    assert "tritium / llama.cpp speed" in text
    p = json.loads(out.read_text())["peers"]
    assert set(p["variants"]) == set(JIT_PEERS)
    for v in p["variants"].values():
        assert v["tokens_per_s"] > 0 and v["prefill_ms"] > 0 and v["peak_rss_mb"] > 0 and v["prefill128_ms"] > 0
    for ours in ("preset", "preset-compiled", "ternary", "ternary-compiled"):
        for q in ("tq2_0", "tq1_0"):
            for kind in ("decode", "prefill", "prefill128"):
                assert p["ratios"][f"{kind}_{ours}_vs_llamacpp_{q}"] > 0
    best = max(p["variants"][f"llamacpp-{q}"]["tokens_per_s"] for q in ("tq2_0", "tq1_0"))
    assert p["best_rows"] == {"decode": "preset-compiled", "prefill128": "preset-compiled"}
    assert p["ratios"]["decode_best_vs_best_peer"] == pytest.approx(
        p["variants"]["preset-compiled"]["tokens_per_s"] / best)
    assert set(p["targets_met"]) == {"decode_vs_best_peer", "prefill128_vs_best_peer"}
    assert "the best peer" in text
    assert p["sizes"]["file_bytes_tq1_0"] < p["sizes"]["file_bytes_tq2_0"]
    assert "greedy tokens equal to preset's" in text
    assert set(p["greedy_tokens_same_as_preset"]) == {"preset-compiled", "llamacpp-tq2_0", "llamacpp-tq1_0"}
    assert p["greedy_tokens_same_as_preset"]["preset-compiled"] == 3
    assert all(0 <= n <= 3 for n in p["greedy_tokens_same_as_preset"].values())


def test_bench_model_peers_skipped_without_llama_cpp(tmp_path, monkeypatch, capsys):
    """Without llama-cpp-python, --peers says in one line that llama.cpp is skipped and why; no error."""
    monkeypatch.setattr(bench, "_llama_cpp", lambda: (None, "ImportError: No module named 'llama_cpp'"))
    calls = _in_process(monkeypatch)
    out = tmp_path / "bench.json"
    assert cli_main([*TINY_PEERS, "--json", str(out)]) == 0
    assert calls == list(JIT)
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "llama_cpp" in skipped[0]
    assert "llama_cpp" in json.loads(out.read_text())["peers"]["skipped"]


def test_bench_model_peers_needs_tq_block_widths(capsys):
    argv = ["bench", "model", "--peers", "--hidden", "32", "--heads", "4", "--intermediate", "48"]
    assert cli_main(argv) == 2
    assert "multiples of 256" in capsys.readouterr().err
