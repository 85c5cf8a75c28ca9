"""Shared benchmark helpers: timing by medians of repeats, peak tensor memory, machine info, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from .. import atomic


def time_median(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls, and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class PeakMemory(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the context, and their peak.

    Tensors that exist before entering (e.g. parameters) are added with `count`. Measures tensor memory,
    not allocator overhead or the interpreter; deterministic, unlike RSS.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def count(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0 or t.device.type == "meta":
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in seconds of each function, timed round-robin so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def memory_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5, kind: str = "copy") -> float:
    """Memory bandwidth in GB/s over a large float32 tensor: ``copy`` counts the bytes read plus the bytes
    written by a copy; ``read`` the bytes read by a sum (a read-only stream, like a GEMV's weights)."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n)
    if kind == "read":
        seconds, _ = time_median(src.sum, repeats=repeats, warmup=1)
        return n * 4 / seconds / 1e9
    if kind != "copy":
        raise ValueError(f"kind must be 'copy' or 'read', got {kind!r}")
    dst = torch.empty_like(src)
    seconds, _ = time_median(lambda: dst.copy_(src), repeats=repeats, warmup=1)
    return 2 * n * 4 / seconds / 1e9


def machine_info() -> dict:
    """CPU, thread count and versions, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (see `tritium.atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(data, indent=2))
