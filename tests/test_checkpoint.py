"""Checkpoints: round trip without pickle, damaged-newest fallback, atomic writes, pruning, signals, and
exact resume of a real ``tritium run decoder`` process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tritium
from tritium.experiments import checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def _trained(seed: int = 0, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = tritium.quantize(Tied(), "1.58-absmedian")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randint(0, 10, (4, 5))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _trained()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    sidecar = checkpoint.save(tmp_path, 3, model, opt, {"note": "x"})
    expect = (torch.rand(3), np.random.rand(3), random.random())

    fresh, fresh_opt = _trained(seed=1, steps=1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    meta = checkpoint.load(sidecar, fresh, fresh_opt)
    assert meta["step"] == 3 and meta["note"] == "x"
    assert torch.equal(torch.rand(3), expect[0])
    assert np.array_equal(np.random.rand(3), expect[1]) and random.random() == expect[2]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.head.weight is fresh.embed.weight
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert sa["param_groups"] == sb["param_groups"]
    # one more identical step from both gives identical weights
    x = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).sum().backward()
        o.step()
    assert torch.equal(model.body.weight, fresh.body.weight)


def test_no_pickle_in_files(tmp_path):
    model, opt = _trained()
    sidecar = checkpoint.save(tmp_path, 1, model, opt)
    json.loads(sidecar.read_text())
    head_len = int.from_bytes(sidecar.with_suffix(".safetensors").read_bytes()[:8], "little")
    assert head_len > 0  # a safetensors header, not a pickle/zip stream


def test_damaged_newest_falls_back_with_warning(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, keep=0)
    st = checkpoint.path_of(tmp_path, 3).with_suffix(".safetensors")
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st.write_bytes(bytes(data))
    checkpoint.path_of(tmp_path, 2).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="damaged") as record:
        assert checkpoint.latest_valid(tmp_path) == checkpoint.path_of(tmp_path, 1)
    assert len(record) == 2


def _edit(sidecar: Path, change) -> None:
    meta = json.loads(sidecar.read_text())
    change(meta)
    sidecar.write_text(json.dumps(meta, indent=1))


def _rehash(meta: dict) -> None:
    meta["meta_sha256"] = checkpoint.meta_digest(meta)


@pytest.mark.parametrize("change, why", [
    (lambda m: m.update(step=190), "sha256"),  # an edited step: the sidecar's own hash fails
    (lambda m: m.update(lr_schedule=[0.5]), "sha256"),  # any other edit too
    (lambda m: m.pop("sha256"), "lacks sha256"),  # a missing key
    (lambda m: m.pop("file"), "lacks file"),
    (lambda m: m.pop("meta_sha256"), "lacks meta_sha256"),
    (lambda m: (m.update(step=190), _rehash(m)), "does not match the file name"),  # edited and re-hashed
    (lambda m: (m.update(file="ckpt-00000001.safetensors"), _rehash(m)), "expected ckpt-00000002"),
    (lambda m: (m.update(format=1), _rehash(m)), "format 1"),
])
def test_edited_or_incomplete_sidecar_falls_back(tmp_path, change, why):
    model, opt = _trained()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, opt, {"lr_schedule": [1.0]})
    _edit(checkpoint.path_of(tmp_path, 2), change)
    with pytest.raises(ValueError, match=why):
        checkpoint.verify(checkpoint.path_of(tmp_path, 2))
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert checkpoint.latest_valid(tmp_path) == checkpoint.path_of(tmp_path, 1)


def test_renamed_pair_and_non_object_sidecar_fall_back(tmp_path):
    model, opt = _trained()
    checkpoint.save(tmp_path, 1, model, opt)
    checkpoint.save(tmp_path, 2, model, opt)
    for suffix in (".json", ".safetensors"):  # step 2 passed off as step 9
        checkpoint.path_of(tmp_path, 2).with_suffix(suffix).rename(checkpoint.path_of(tmp_path, 9).with_suffix(suffix))
    with pytest.warns(RuntimeWarning, match="does not match the file name"):
        assert checkpoint.latest_valid(tmp_path) == checkpoint.path_of(tmp_path, 1)
    checkpoint.path_of(tmp_path, 9).write_text("[1, 2]")
    with pytest.warns(RuntimeWarning, match="not a JSON object"):
        assert checkpoint.latest_valid(tmp_path) == checkpoint.path_of(tmp_path, 1)


def test_restore_skips_an_edited_newest_checkpoint(tmp_path, capsys):
    model, opt = _trained()
    checkpoint.save(tmp_path, 100, model, opt, {"note": "a"})
    later, later_opt = _trained(seed=1)
    checkpoint.save(tmp_path, 200, later, later_opt, {"note": "b"})
    _edit(checkpoint.path_of(tmp_path, 200), lambda m: m.update(step=290))
    fresh, fresh_opt = _trained(seed=2, steps=1)
    with pytest.warns(RuntimeWarning, match="ckpt-00000200.json is damaged"):
        meta = checkpoint.Checkpointer(tmp_path, every=1, resume=True).restore(fresh, fresh_opt)
    assert meta["step"] == 100 and meta["note"] == "a"
    assert torch.equal(fresh.body.weight, model.body.weight)
    assert "step 100" in capsys.readouterr().out


def test_damaged_checkpoints_are_set_aside_on_resume(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, keep=0)
    checkpoint.path_of(tmp_path, 3).with_suffix(".safetensors").write_bytes(b"torn")
    _edit(checkpoint.path_of(tmp_path, 2), lambda m: m.update(step=9))
    with pytest.warns(RuntimeWarning, match="damaged"):
        meta = checkpoint.Checkpointer(tmp_path, every=1, keep=1, resume=True).restore(model, opt)
    assert meta["step"] == 1
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [1]
    assert (tmp_path / "damaged-ckpt-00000003.safetensors").read_bytes() == b"torn"
    assert (tmp_path / "damaged-ckpt-00000002.json").is_file()
    checkpoint.Checkpointer(tmp_path, every=1, keep=1, resume=True).save(2, model, opt, {})
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [2]  # the resumed run's checkpoint is kept

    for _, sidecar in checkpoint.checkpoints(tmp_path):  # nothing intact: start over, damaged files aside
        sidecar.write_text("{")
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert checkpoint.Checkpointer(tmp_path, every=1, resume=True).restore(model, opt) is None
    assert checkpoint.checkpoints(tmp_path) == []


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    checkpoint.save(tmp_path, 1, model, opt)
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):  # the tensor file is written, then the disk "fails"
        calls.append(fd)
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, model, opt)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.json", "ckpt-00000001.safetensors"]

    # a writer killed between the tensor file and its sidecar leaves an unlisted file and a temp file
    checkpoint.path_of(tmp_path, 3).with_suffix(".safetensors").write_bytes(b"partial")
    (tmp_path / ".ckpt-00000004.safetensors.123.tmp").write_bytes(b"partial")
    assert checkpoint.latest_valid(tmp_path) == checkpoint.path_of(tmp_path, 1)


def test_keep_last_k(tmp_path):
    model, opt = _trained()
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [5, 4]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_stop_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_resume_without_flag_refuses_existing_checkpoints(tmp_path):
    model, opt = _trained()
    checkpoint.save(tmp_path, 1, model, opt)
    with pytest.raises(FileExistsError, match="--resume"):
        checkpoint.Checkpointer(tmp_path, every=1).restore(model, opt)


def _corpus(path: Path) -> Path:
    r = random.Random(0)
    words = "the king queen of and to my lord thou art a fair night day love death sword crown".split()
    path.write_text("\n".join(" ".join(r.choice(words) for _ in range(r.randint(4, 12))) for _ in range(800)))
    return path


STEPS = 24


def _cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    sets = {"hidden": 32, "layers": 2, "head_dim": 16, "vocab_size": 300, "steps": STEPS, "batch_size": 4,
            "seq_len": 16, "eval_every": 4, "eval_batches": 1, "warmup": 3, "warmup_lambda": 6}
    return [sys.executable, "-m", "tritium", "run", "decoder", "--corpus", str(corpus), "--out", str(out),
            "--precision", "1.58-absmedian", "--threads", "1", "--no-progress", "--ckpt-every", "1",
            *(x for k, v in sets.items() for x in ("--set", f"{k}={v}")), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _latest_step(out: Path) -> int:
    """Step of the newest checkpoint sidecar of the (single) run in ``out``; -1 if none."""
    runs = list((out / "runs").glob("*/ckpt"))
    found = checkpoint.checkpoints(runs[0]) if runs else []
    return found[0][0] if found else -1


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    corpus = _corpus(tmp_path / "tiny.txt")
    full, killed = tmp_path / "full", tmp_path / "killed"
    a = subprocess.Popen(_cmd(corpus, full), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    b = subprocess.Popen(_cmd(corpus, killed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and b.poll() is None:
        if _latest_step(killed) >= 3:
            b.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    log_b = b.communicate()[0].decode()
    assert b.returncode == -signal.SIGKILL, log_b[-2000:]
    assert 3 <= _latest_step(killed) < STEPS
    assert not (killed / "results.jsonl").is_file() or not (killed / "results.jsonl").read_text().strip()

    resumed = subprocess.run(_cmd(corpus, killed, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    out_a = a.communicate()[0].decode()
    assert a.returncode == 0, out_a[-2000:]

    from safetensors.torch import load_file

    final = [checkpoint.path_of(next((d / "runs").iterdir()) / "ckpt", STEPS) for d in (full, killed)]
    ta, tb = (load_file(p.with_suffix(".safetensors")) for p in final)
    assert ta.keys() == tb.keys()
    for k in ta:  # numpy's and python's generators are never seeded by the runner, so differ per process
        if k not in ("rng/numpy", "rng/python"):
            assert torch.equal(ta[k], tb[k]), k
    ma, mb = (json.loads(p.read_text()) for p in final)
    assert len(ma["losses"]) == STEPS and ma["losses"] == mb["losses"]
    assert ma["curves"] == mb["curves"] and ma["lambda"] == mb["lambda"]
    ra, rb = (json.loads((d / "results.jsonl").read_text()) for d in (full, killed))
    assert ra["curves"] == rb["curves"] and ra["val_loss"] == rb["val_loss"]
