"""``tritium bench optim``: a WideMLP training step with a large embedding, AdamW against LazyAdamW.

The model is the paper's WideMLP (EmbeddingBag(vocab, 1024, mean) -> ReLU -> dropout -> 1.58-bit Linear)
at the size of 20ng (vocabulary 30,208; 316 tokens per document), trained on synthetic documents whose
tokens follow a Zipf law, batch 16. Variants: `torch.optim.AdamW` (fused) on the dense gradient, and
`tritium.optim.LazyAdamW` on the embedding's sparse gradient; both update every row at every step. Each
round times a block of steps per variant, interleaved; LazyAdamW's block ends with ``sync()``, so its
time includes every deferred row update. Times are medians over rounds, per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import tritium
from tritium.models import WideMLP
from tritium.optim import LazyAdamW

from ..args import output_file, positive_int
from .common import machine_info, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=positive_int, default=30208, help="vocabulary (default: 20ng's 30,208)")
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--doc-len", type=positive_int, default=316, help="tokens per document (default: 20ng's mean)")
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=100, help="steps per timed block (default 100)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed blocks per variant (default 5)")
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the results as JSON")


def make_variant(name: str, args: argparse.Namespace):
    """A closure training ``args.steps`` steps of a fresh WideMLP with optimizer ``name``."""
    torch.manual_seed(0)
    model = tritium.quantize(WideMLP(args.vocab, 20, args.hidden), "1.58-absmedian")
    if name == "AdamW (fused)":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        model.embed.sparse = True
        opt = LazyAdamW(model.parameters(), lr=1e-3)
        opt.watch(model)
    zipf = 1.0 / torch.arange(1, args.vocab + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)

    def block() -> None:
        for _ in range(args.steps):
            ids = torch.multinomial(zipf, args.batch * args.doc_len, replacement=True, generator=g)
            offsets = torch.arange(0, ids.numel(), args.doc_len)
            loss = F.cross_entropy(model(ids, offsets), torch.randint(0, 20, (args.batch,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if isinstance(opt, LazyAdamW):
            opt.sync()

    return block


def run(args: argparse.Namespace) -> dict:
    names = ("AdamW (fused)", "LazyAdamW")
    blocks = {name: make_variant(name, args) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: allocates the optimizer state
        blocks[name]()
    for _ in range(args.repeats):
        for name in names:
            t0 = time.perf_counter()
            blocks[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times[names[0]])
    results = {"machine": machine_info(), "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "doc_len",
                                                                                  "batch", "steps")},
               "repeats": args.repeats, "variants": {}}
    for name in names:
        med = statistics.median(times[name])
        results["variants"][name] = {"median_ms": med * 1e3, "speedup": base / med,
                                     "times_ms": [t * 1e3 for t in times[name]]}
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return results


def format_table(results: dict) -> str:
    m, s = results["machine"], results["shape"]
    lines = [
        f"WideMLP training step: EmbeddingBag({s['vocab']}, {s['hidden']}) + 1.58-bit Linear, batch {s['batch']} x "
        f"{s['doc_len']} Zipf tokens; {m['threads']} threads on {m['cpu']}",
        f"median over {results['repeats']} blocks of {s['steps']} steps (LazyAdamW's including its final sync)",
        "",
        f"{'optimizer':<15} {'ms/step':>8} {'speedup':>8}",
    ]
    for name, v in results["variants"].items():
        lines.append(f"{name:<15} {v['median_ms']:>8.2f} {v['speedup']:>7.2f}x")
    return "\n".join(lines)
