"""``tritium bench kernels``: the packed ternary kernel against torch fp32, bf16 and int8 dynamic
quantization, on LLM-sized linear layers, with a memory-bandwidth probe from the same run."""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, quant
from ..args import output_file, positive_int
from ..config import BitConfig
from .common import machine_info, memory_bandwidth_gb_s, time_interleaved, time_median, write_json

SHAPES = [(m, k, n) for m in (1, 128) for k, n in ((2048, 2048), (4096, 4096), (4096, 11008), (11008, 4096))]
QUICK_SHAPES = [(1, 4096, 11008), (128, 4096, 11008)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes (smoke test)")
    parser.add_argument("--shapes", type=_parse_shapes,
                        help="comma-separated MxKxN list (default: M in {1,128} x 4 LLM layers)")
    parser.add_argument("--repeats", type=positive_int, help="timed runs per method (default 20, quick 3)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's setting)")
    parser.add_argument("--back-to-back", action="store_true",
                        help="time each method in its own loop of repeated calls, its weights staying in cache when "
                             "they fit, instead of round-robin across methods (where the other methods' weights "
                             "evict them between two calls, so every call reads its weights from memory)")


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``MxKxN[,MxKxN...]`` as a list of positive ``(m, k, n)``; ArgumentTypeError otherwise."""
    shapes = []
    for s in text.split(","):
        try:
            shape = tuple(int(v) for v in s.strip().lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"expected MxKxN[,MxKxN...] with positive sizes, got {text!r}")
        shapes.append(shape)
    return shapes


def _int8_dynamic(linear: nn.Linear) -> tuple[nn.Module | None, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8), ""
    except Exception as e:  # any failure means: not available in this torch
        return None, f"{type(e).__name__}: {e}"


def _bench_shape(m: int, k: int, n: int, repeats: int, back_to_back: bool = False) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    w = linear.weight.detach()
    x = torch.randn(m, k, generator=gen)
    wb, xb = w.bfloat16(), x.bfloat16()
    q, sw = quant.quantize_weight(w, BitConfig())
    packed, sw = kernels.pack(q.to(torch.int8)), sw.reshape(-1).float()
    xq, sx = quant.quantize_act(x, 8)
    xq, sx = xq.to(torch.int8), sx.reshape(-1)

    fns = {
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "tritium": lambda: kernels.ternary_matmul(xq, packed, n, k, sx, sw),
        "tritium_quant": lambda: kernels.ternary_linear(x, packed, n, k, sw),
    }
    int8_model, int8_error = _int8_dynamic(linear)
    if int8_model is not None:
        fns["int8"] = lambda: int8_model(x)
    with torch.inference_mode():
        if back_to_back:
            ms = {name: time_median(fn, repeats=repeats, warmup=3)[0] * 1e3 for name, fn in fns.items()}
        else:
            ms = {name: t * 1e3 for name, t in time_interleaved(fns, repeats=repeats).items()}
    weight_bytes = {"fp32": 4 * n * k, "bf16": 2 * n * k, "int8": n * k, "tritium": packed.numel()}
    row: dict[str, object] = {"m": m, "k": k, "n": n}
    for name, t in ms.items():
        row[f"{name}_ms"] = t
        row[f"{name}_weight_gb_s"] = weight_bytes[name.split("_")[0]] / (t * 1e-3) / 1e9
    for name in ("tritium", "tritium_quant"):
        row[f"{name}_speedup_vs_fp32"] = ms["fp32"] / ms[name]
        row[f"{name}_speedup_vs_int8"] = ms["int8"] / ms[name] if "int8" in ms else None
    row["int8_error"] = int8_error or None
    return row


def _table(rows: list[dict[str, object]], bandwidth: float) -> str:
    head = (f"{'M':>4} {'K':>6} {'N':>6} | {'fp32':>8} {'bf16':>8} {'int8':>8} | {'tern':>7} {'tern+q':>7}"
            f" | {'x fp32':>6} {'x int8':>6} | {'tern GB/s':>9} {'% bw':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        int8 = f"{r['int8_ms']:8.3f}" if "int8_ms" in r else f"{'n/a':>8}"
        sp8 = r["tritium_quant_speedup_vs_int8"]
        lines.append(
            f"{r['m']:>4} {r['k']:>6} {r['n']:>6} | {r['fp32_ms']:8.3f} {r['bf16_ms']:8.3f} {int8} |"
            f" {r['tritium_ms']:7.3f} {r['tritium_quant_ms']:7.3f} | {r['tritium_quant_speedup_vs_fp32']:6.1f}"
            f" {'n/a' if sp8 is None else f'{sp8:6.1f}':>6} | {r['tritium_quant_weight_gb_s']:9.1f}"
            f" {100 * r['tritium_quant_weight_gb_s'] / bandwidth:5.0f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark, print a table and return (and optionally write) the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = (_parse_shapes(args.shapes) if isinstance(args.shapes, str) else args.shapes) or (
        QUICK_SHAPES if args.quick else SHAPES)
    repeats = args.repeats or (3 if args.quick else 20)
    probe = {"megabytes": 64 if args.quick else 512, "repeats": 3 if args.quick else 7}
    bandwidth = memory_bandwidth_gb_s(**probe)
    read_bandwidth = memory_bandwidth_gb_s(**probe, kind="read")
    rows = []
    for m, k, n in shapes:
        rows.append(_bench_shape(m, k, n, repeats, args.back_to_back))
    result = {
        "benchmark": "kernels",
        "backend": kernels.get_backend(),
        "available_backends": kernels.available_backends(),
        "repeats": repeats,
        "timing": "back-to-back" if args.back_to_back else "round-robin",
        "bandwidth_gb_s": bandwidth,
        "read_bandwidth_gb_s": read_bandwidth,
        "machine": machine_info(),
        "rows": rows,
    }
    print(f"tritium kernels ({result['backend']}) vs torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" median ms of {repeats} runs ({result['timing']});"
          f" memory bandwidth {read_bandwidth:.1f} GB/s read, {bandwidth:.1f} GB/s copy (read + write)")
    print(_table(rows, read_bandwidth))
    print("tern = kernel on int8 activations; tern+q = fp32 input, per-token int8 quantization fused into"
          " the same call; x fp32 / x int8 = speedup of tern+q; tern GB/s = packed weight bytes/s of tern+q;"
          f" % bw = that as % of the read bandwidth of a {probe['megabytes']} MB sum (weights that stay in cache"
          " can exceed it)")
    if result["timing"] == "round-robin":
        print("round-robin: between two calls of one method the others read their own weights (fp32, bf16 and int8"
              " copies of the layer), which evicts its weights from the caches: every call reads them from memory"
              " (compare % bw); --back-to-back times calls whose weights stay in cache when they fit")
    errors = {r["int8_error"] for r in rows if r.get("int8_error")}
    for e in errors:
        print(f"int8 dynamic quantization unavailable in this torch, skipped: {e}")
    if args.json:
        write_json(args.json, result)
    return result
