"""Timing helpers shared by the benchmarks: medians of repeated runs, a memory-bandwidth probe and
atomic JSON output."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each function, timed in round-robin so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def memory_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth of a large float32 tensor in GB/s, counting bytes read plus bytes written."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats=repeats, warmup=1)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def machine_info() -> dict[str, object]:
    """Torch version, thread count and CPU capability, to store alongside results."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
    }
