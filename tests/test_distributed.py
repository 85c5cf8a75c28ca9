"""Data-parallel QAT: 2 CPU processes (gloo) under DDP and FSDP2 train like 1 process on the same global
batch.

Tolerance: the runs differ only in floating-point reduction order (gradient all-reduce / reduce-scatter,
the loss as a mean of per-rank means over equal token counts), so per-step losses must agree to
``LOSS_TOL`` (absolute, on losses ~5.5) and final weights to ``WEIGHT_TOL`` (absolute, after 5 AdamW steps
with lr 1e-2: Adam's normalised update turns a rounding-level gradient difference on a near-zero
gradient into a larger weight difference, bounded by the learning rate).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import tritium
from tritium.experiments import distributed
from tritium.experiments.checkpoint import full_model_state, save_tensors
from tritium.experiments.lm import train

LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4
STEPS, BATCH, SEQ, VOCAB = 5, 4, 16, 64


def _model() -> torch.nn.Module:
    from tritium.models.transformers import build_model, quantize_excludes

    torch.manual_seed(0)
    model = build_model("decoder", VOCAB, hidden=32, layers=2, seq_len=SEQ, head_dim=16)
    return tritium.quantize(model, "1.58-absmedian", exclude=quantize_excludes("decoder"))


def _batch(step: int) -> dict:
    """Counting sequences from random starts: learnable, so the loss falls within a few steps."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=torch.Generator().manual_seed(step))
    ids = (start + torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def _train(fsdp: bool = False, accum: int = 1) -> tuple[list[float], dict, dict]:
    """Per-step losses, final full state dict and, for the first BitLinear, the shape of its stored
    (local) weight and of the weight its forward gets."""
    model = distributed.wrap(_model(), fsdp)
    bit = next(m for m in model.modules() if isinstance(m, tritium.BitLinear))
    w = bit.weight
    info = {"local": list(w.to_local().shape if hasattr(w, "to_local") else w.shape), "seen": []}
    bit.register_forward_pre_hook(lambda m, args: info["seen"].append(list(m.weight.shape)))
    losses: list[float] = []
    train(model, _batch, STEPS, lr=1e-2, warmup=1, progress=False, losses=losses, accum=accum)
    return losses, full_model_state(model), info


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init()
    try:
        result = {}
        for name, fsdp, accum in (("ddp", False, 1), ("fsdp", True, 1), ("ddp_accum", False, 2)):
            losses, state, info = _train(fsdp, accum)
            result[name] = {"losses": losses, **info}
            if rank == 0:
                save_tensors(Path(out, f"{name}.safetensors"), state)
        if rank == 0:
            Path(out, "result.json").write_text(json.dumps(result))
    finally:
        distributed.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    return out


def _compare(name: str, out: Path, losses: list[float], state: dict) -> None:
    got = json.loads((out / "result.json").read_text())[name]
    assert len(got["losses"]) == STEPS
    for a, b in zip(losses, got["losses"], strict=True):
        assert abs(a - b) <= LOSS_TOL, (name, losses, got["losses"])
    other = load_file(out / f"{name}.safetensors")
    assert other.keys() == state.keys()
    for k, v in state.items():
        assert torch.allclose(v, other[k], rtol=0, atol=WEIGHT_TOL), (name, k, (v - other[k]).abs().max())


def test_ddp_two_processes_match_one(two_process):
    torch.set_num_threads(1)
    losses, state, _ = _train()
    _compare("ddp", two_process, losses, state)
    assert losses[-1] < losses[0]


def test_gradient_accumulation_matches(two_process):
    torch.set_num_threads(1)
    losses, state, _ = _train(accum=2)  # 1 process x 2 micro-batches; the worker ran 2 processes x 2
    _compare("ddp_accum", two_process, losses, state)
    ref, _, _ = _train()
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) <= LOSS_TOL


def test_fsdp_two_processes_match_one_with_full_weight_scales(two_process):
    torch.set_num_threads(1)
    losses, state, info = _train()
    _compare("fsdp", two_process, losses, state)
    got = json.loads((two_process / "result.json").read_text())["fsdp"]
    assert info["local"] == [32, 32]  # q_proj of hidden 32
    assert got["local"] == [16, 32]  # under FSDP each rank stores half of its rows ...
    assert set(map(tuple, got["seen"])) == {(32, 32)}  # ... but forward (and the weight scale) sees all


def test_shard_slices_the_global_batch():
    batch = {"input_ids": torch.arange(24).reshape(12, 2), "labels": torch.arange(12), "flag": True}
    pieces = [m for r in range(2) for m in distributed.shard(batch, accum=3, rank_=r, world=2)]
    assert [len(p["labels"]) for p in pieces] == [2] * 6
    assert torch.equal(torch.cat([p["labels"] for p in pieces]), batch["labels"])
    assert all(p["flag"] is True for p in pieces)
    with pytest.raises(ValueError, match="not divisible"):
        distributed.shard(batch, accum=5, rank_=0, world=2)


def test_single_process_is_untouched():
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model and distributed.world_size() == 1 and not distributed.init()


def test_launcher_strips_nproc():
    argv = ["run", "decoder", "--nproc", "2", "--out", "x", "--nproc=3", "--fsdp"]
    assert distributed.strip_option(argv, "--nproc") == ["run", "decoder", "--out", "x", "--fsdp"]
