"""Data-parallel training on torch.distributed: process group, DDP / FSDP2 wrapping, batch slicing, launcher.

Processes are started by ``torchrun`` (``torch.distributed.run``), which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; `init` joins the group (NCCL on CUDA, gloo on CPU).
Without those variables everything here is a no-op for a single process. ``tritium run ... --nproc N``
re-executes its own command line under ``torch.distributed.run --standalone --nproc-per-node N``.

Every step draws the same GLOBAL batch on every rank; `shard` cuts it into this rank's micro-batches
(rows ``[rank * B / world, (rank + 1) * B / world)``, then ``accum`` equal pieces), so the global batch,
and hence the training trajectory up to floating-point reduction order, does not depend on the number of
processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files."""
    return rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init() -> bool:
    """Join the process group described by the torchrun environment; True if one is (now) initialized.

    A no-op returning False when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return True


def teardown() -> None:
    """Leave the process group if one is initialized."""
    if dist.is_initialized():
        dist.destroy_process_group()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the entries of every `nn.ModuleList` that have parameters
    (transformer layers of the Hugging Face models), outermost lists only."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            items = [m for m in module if any(True for _ in m.parameters())]
            found += items
            inside.update(id(m) for item in items for m in item.modules())
    return found


def wrap(model: nn.Module, fsdp: bool = False) -> nn.Module:
    """``model`` for data-parallel training: FSDP2 (`fully_shard` per block of `blocks`, then the root)
    when ``fsdp``, else DistributedDataParallel; unchanged without a process group.

    FSDP2 shards in place and returns the same module object. Quantized layers see their full,
    all-gathered weight in forward, so per-tensor weight scales are those of the unsharded weight.
    """
    if not dist.is_initialized():
        return model
    model.to(device())
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    dev = device()
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unsharded_copy(model: nn.Module, fresh: nn.Module) -> nn.Module:
    """``fresh`` (a plain module of the same architecture) with the full weights and the per-module
    ``config`` (quantization settings, lambda) of the FSDP2 ``model``; call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    fresh.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    for a, b in zip(model.modules(), fresh.modules(), strict=True):
        if hasattr(a, "config") and hasattr(b, "config"):
            b.config = a.config
    return fresh


def grad_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's backward: gradients are reduced across ranks only if ``enabled``
    (the last micro-batch of a step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def shard(batch: dict, accum: int = 1, rank_: int | None = None, world: int | None = None) -> list[dict]:
    """This rank's ``accum`` micro-batches of a global ``batch`` (dict of tensors, batch dimension 0).

    The batch size must be divisible by ``world * accum``.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    if n % (w * accum):
        raise ValueError(f"global batch {n} is not divisible by {w} processes x {accum} accumulation steps")
    per = n // (w * accum)
    start = r * per * accum
    return [{k: v[start + i * per: start + (i + 1) * per] if isinstance(v, torch.Tensor) else v
             for k, v in batch.items()} for i in range(accum)]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself without a process group)."""
    if not dist.is_initialized():
        return value
    t = value.detach().to(device(), torch.float64).reshape(1)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).to(value.device, value.dtype).reshape(value.shape)


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str] | None = None) -> NoReturn:
    """Replace this process by ``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m
    tritium ARGV`` (default ARGV: this command line without ``--nproc``), so signals reach torchrun."""
    argv = strip_option(sys.argv[1:] if argv is None else argv, "--nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tritium", *argv]
    print("launching:", " ".join(cmd), flush=True)
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
