"""``tritium bench train``: one QAT training step (forward, backward, AdamW) against nn.Linear.

The block is ``Linear(d, 4d) -> GELU -> Linear(4d, d)`` with d = 1024 on an input of 8 x 256 x d, fp32
parameters, all CPU threads: in fp32, and under bf16 autocast. A tritium variant's ratios are against the
``nn.Linear`` step of the same precision, those of ``nn.Linear bf16`` against ``nn.Linear`` in fp32. All
variants run in one process, interleaved round by round so that machine noise hits them alike; wall and CPU
times are medians. Peak memory is the peak of live tensor bytes during one step (parameters, gradients,
AdamW state and activations), tracked exactly with a dispatch mode.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import tritium

from ..args import nonnegative_int, output_file, positive_int
from .common import PeakMemory, machine_info, write_json


class Variant(NamedTuple):
    spec: str | None  # the tritium.quantize spec; None: nn.Linear
    autocast: torch.dtype | None  # the CPU autocast dtype; None: fp32
    baseline: str  # the variant its ratios are against


VARIANTS = {
    "nn.Linear": Variant(None, None, "nn.Linear"),
    "tritium absmean": Variant("1.58-absmean", None, "nn.Linear"),
    "tritium absmedian": Variant("1.58-absmedian", None, "nn.Linear"),
    "nn.Linear bf16": Variant(None, torch.bfloat16, "nn.Linear"),
    "tritium absmedian bf16": Variant("1.58-absmedian", torch.bfloat16, "nn.Linear bf16"),
}


def make_block(d: int, spec: str | None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    return block if spec is None else tritium.quantize(block, spec)


def make_step(block: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None
              ) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """A closure doing one forward (under CPU autocast to ``autocast`` if given), backward and AdamW step of
    ``block`` on ``x``, and its optimizer."""
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            loss = block(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def peak_memory(d: int, variant: Variant, x: torch.Tensor) -> int:
    """Peak live tensor bytes during the second training step (the first allocates the AdamW state)."""
    block = make_block(d, variant.spec)
    step, opt = make_step(block, x, variant.autocast)
    step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    mem = PeakMemory()
    mem.count(x, *block.parameters(), *state)
    with mem:
        step()
    return mem.peak


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=positive_int, default=1024, help="model dimension d (default 1024)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the results as JSON")


def run(args: argparse.Namespace) -> dict:
    d = args.dim
    x = torch.randn(args.batch, args.seq, d)
    steps = {name: make_step(make_block(d, v.spec), x, v.autocast)[0] for name, v in VARIANTS.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved rounds
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    results = {"machine": machine_info(), "shape": {"dim": d, "batch": args.batch, "seq": args.seq},
               "repeats": args.repeats, "variants": {}}
    peaks = {name: peak_memory(d, v, x) for name, v in VARIANTS.items()}
    for name, v in VARIANTS.items():
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        base_t, base_c = statistics.median(times[v.baseline]), statistics.median(cpu[v.baseline])
        results["variants"][name] = {"median_ms": med * 1e3, "time_ratio": med / base_t,
                                     "cpu_ms": med_cpu * 1e3, "cpu_ratio": med_cpu / base_c,
                                     "peak_mib": peaks[name] / 2**20, "memory_ratio": peaks[name] / peaks[v.baseline],
                                     "baseline": v.baseline, "times_ms": [t * 1e3 for t in times[name]]}
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return results


def format_table(results: dict) -> str:
    m, s = results["machine"], results["shape"]
    lines = [
        f"training step of Linear({s['dim']}, {4 * s['dim']}) -> GELU -> Linear({4 * s['dim']}, {s['dim']}), "
        f"input {s['batch']}x{s['seq']}x{s['dim']} fp32, AdamW; {m['threads']} threads on {m['cpu']}",
        f"medians of {results['repeats']} interleaved steps; CPU time = user + system time of all threads, "
        "which other load on the machine disturbs less than wall time; bf16 = under bf16 autocast, ratios "
        "against the baseline named",
        "",
        f"{'variant':<23} {'wall ms':>8} {'ratio':>6} {'CPU ms':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}"
        "  baseline",
    ]
    for name, v in results["variants"].items():
        lines.append(f"{name:<23} {v['median_ms']:>8.1f} {v['time_ratio']:>5.2f}x {v['cpu_ms']:>8.1f} "
                     f"{v['cpu_ratio']:>5.2f}x {v['peak_mib']:>9.1f} {v['memory_ratio']:>5.2f}x  {v['baseline']}")
    return "\n".join(lines)
