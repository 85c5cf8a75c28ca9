"""Training throughput (tokens/s) of the `tritium run encoder|seq2seq|decoder` models on this machine.

For every task, hidden size, precision and thread count: build the model as a run would, then time a few
AdamW steps (forward, backward, gradient clipping, update, under the precision's autocast) on random
token windows drawn by the run's own collators, after untimed warm-up steps. Prints a markdown table and
appends one JSON line per measurement to ``--out`` if given. Timings on a shared machine are noisy: the
median of the timed steps is reported, as wall time and as the CPU time of this process (all its threads);
with one thread, tokens per CPU-second is what the step would reach with a core to itself.

    python scripts/lm_throughput.py --hidden 64,128,256 --threads 1,2 --out throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import tritium
from tritium.args import positive_int, positive_int_list, precision_list
from tritium.data.corpus import SPECIALS
from tritium.experiments import lm
from tritium.models.transformers import quantize_excludes

N_SENTINELS = 32


def fake_corpus(vocab_size: int, n_tokens: int = 1 << 20) -> SimpleNamespace:
    """Random token ids with the special-token layout of `tritium.data.corpus` (costs do not depend on text)."""
    n_special = len(SPECIALS) + N_SENTINELS
    ids = torch.randint(n_special, vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(train=ids, vocab_size=vocab_size, pad_id=0, bos_id=2, eos_id=3, mask_id=4,
                           n_special=n_special, sentinels=list(range(len(SPECIALS), n_special)))


def measure(task: str, hidden: int, precision: str, threads: int, args: argparse.Namespace) -> dict:
    """Median seconds per training step of one configuration, and the tokens per second it gives."""
    torch.set_num_threads(threads)
    p = tritium.parse_precision(precision)
    corpus = fake_corpus(args.vocab_size)
    torch.manual_seed(0)
    model = lm.build({"task": task, "hidden": hidden, "layers": args.layers, "seq_len": args.seq_len,
                      "head_dim": args.head_dim, "dropout": 0.0}, corpus)
    if p.train is not None:
        tritium.quantize(model, p.train, exclude=quantize_excludes(task))
    if args.compile:
        model.compile(backend=args.compile)
    batch = lm.make_batch_fn(task, corpus, corpus.train, args.batch_size, args.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    dtype = p.autocast_dtype
    times, cpu = [], []
    for step in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        b = batch(torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    sec, cpu_sec = statistics.median(times), statistics.median(cpu)
    return {"task": task, "hidden": hidden, "precision": str(p), "threads": threads, "layers": args.layers,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "vocab_size": args.vocab_size,
            "params": sum(x.numel() for x in model.parameters()), "step_s": round(sec, 4),
            "step_cpu_s": round(cpu_sec, 4), "tokens_per_s": round(args.batch_size * args.seq_len / sec),
            "tokens_per_cpu_s": round(args.batch_size * args.seq_len / cpu_sec), "compile": args.compile}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="encoder,seq2seq,decoder")
    ap.add_argument("--hidden", type=positive_int_list, default="64,128,256")
    ap.add_argument("--precision", type=precision_list, default="bf16,1.58-absmedian+bf16")
    ap.add_argument("--threads", type=positive_int_list, default="1,2")
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--head-dim", type=positive_int, default=32)
    ap.add_argument("--seq-len", type=positive_int, default=128)
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--vocab-size", type=positive_int, default=4096)
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=positive_int, default=2, help="untimed steps first")
    ap.add_argument("--compile", default=None, help="torch.compile backend (default: eager)")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    precisions = [p for p in args.precision.split(",") if p]
    print("| task | hidden | precision | threads | params | s/step | CPU s/step | tokens/s | tokens/CPU-s |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for task in tasks:
        for hidden in map(int, args.hidden.split(",")):
            for precision in precisions:
                for threads in map(int, args.threads.split(",")):
                    r = measure(task, hidden, precision, threads, args)
                    print(f"| {task} | {hidden} | {r['precision']} | {threads} | {r['params']:,} | {r['step_s']:.3f} "
                          f"| {r['step_cpu_s']:.3f} | {r['tokens_per_s']:,} | {r['tokens_per_cpu_s']:,} |", flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
