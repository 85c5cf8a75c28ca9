"""``tritium bench model``: greedy decoding of a frozen ternary Llama-style decoder vs fp32 and bf16.

The model is a transformers ``LlamaForCausalLM`` built from a config (random weights, no download):
hidden 1024, 8 layers, MLP 2816, 16 heads, i.e. 103M parameters in its linear layers. The vocabulary
is 8192 with tied input/output embeddings (8.4M parameters): a 32k untied vocabulary would add 65M
full-precision parameters, more than half the model, and the benchmark would mostly measure the
embedding and the head, which `tritium.quantize` keeps in full precision by default (as does the
frozen model here). Each variant runs in its own process, so its peak RSS (VmHWM) is its own:

* ``fp32``: the model at float32; ``bf16``: the model built directly at bfloat16;
* ``ternary``: a meta-device skeleton filled by `tritium.load` from the saved frozen file, so its
  float32 linear weights never exist in that process.

Each process prefills a 16-token prompt and decodes ``--tokens`` tokens greedily at batch 1 with the
KV cache; decode tokens/s is the median over all repeats of all rounds (rounds alternate the variants,
so load changes on a shared machine hit them alike).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..args import UsageError, output_file, positive_int

VARIANTS = ("fp32", "bf16", "ternary")
PROMPT = 16
TARGETS = {"decode_speedup_vs_fp32": 4.0, "linear_weight_ratio": 8.0, "peak_rss_vs_fp32": 0.35}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", type=output_file, help="write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="one round of one repeat")
    parser.add_argument("--tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="processes per variant (default 3)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="generations per process (default 3)")
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--intermediate", type=positive_int, default=2816)
    parser.add_argument("--heads", type=positive_int, default=16)
    parser.add_argument("--vocab", type=positive_int, default=8192)
    parser.add_argument("--storage", choices=("2bit", "base3"), default="2bit", help="frozen file storage")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)


def _config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(256, PROMPT + args.tokens + 1), tie_word_embeddings=True,
    )


def _rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak resident set size of this process image in bytes (VmHWM; ru_maxrss survives exec on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def _generate(model, prompt: torch.Tensor, tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, generated ids): greedy decoding with the KV cache."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **extra)
    t1 = time.perf_counter()
    ids = []
    for _ in range(tokens):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(int(tok))
        out = model(input_ids=tok, use_cache=True, **{key: getattr(out, key)}, **extra)
    return t1 - t0, time.perf_counter() - t1, ids


def _worker(args: argparse.Namespace) -> int:
    from transformers import LlamaForCausalLM

    import tritium

    work = Path(args.workdir)
    baseline = _rss()
    cfg = _config(args)
    torch.manual_seed(0)
    if args.worker == "ternary":
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        tritium.load(work / "ternary.safetensors", model)
    else:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if args.worker == "fp32" else torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
    model.eval()
    loaded = _rss()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    _generate(model, prompt, min(4, args.tokens))  # warm-up
    runs = [_generate(model, prompt, args.tokens) for _ in range(args.repeats)]
    result = {
        "variant": args.worker, "threads": torch.get_num_threads(),
        "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs],
        "tokens_per_s": [args.tokens / r[1] for r in runs], "tokens": runs[0][2],
        "rss_after_imports": baseline, "rss_after_load": loaded, "peak_rss": _peak_rss(),
    }
    (work / f"{args.worker}.{os.getpid()}.json").write_text(json.dumps(result))
    return 0


def _prepare(args: argparse.Namespace, work: Path) -> dict:
    """Save the fp32 model and the frozen model; return file sizes and linear-weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    import tritium

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args)).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    save_file(state, work / "fp32.safetensors")
    del state
    tritium.quantize(model)
    linear_params = sum(m.weight.numel() for _, m in tritium.convert.bit_layers(model))
    tritium.freeze(model)
    tritium.save(model, work / "ternary.safetensors", storage=args.storage)
    packed = sum(m.weight_packed.numel() + 4 * m.weight_scale.numel()
                 for m in model.modules() if isinstance(m, tritium.TernaryLinear))
    return {
        "params_total": sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
        + linear_params,
        "linear_params": linear_params, "linear_bytes_fp32": 4 * linear_params, "linear_bytes_ternary": packed,
        "file_bytes_fp32": os.path.getsize(work / "fp32.safetensors"),
        "file_bytes_ternary": os.path.getsize(work / "ternary.safetensors"),
    }


def _worker_cmd(variant: str, args: argparse.Namespace, work: Path) -> list[str]:
    return [sys.executable, "-m", "tritium.cli", "bench", "model", "--worker", variant, "--workdir", str(work),
           "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--vocab", str(args.vocab)]


def _spawn(variant: str, args: argparse.Namespace, work: Path) -> None:
    subprocess.run(_worker_cmd(variant, args, work), check=True)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _summarize(args: argparse.Namespace, work: Path, sizes: dict) -> dict:
    variants = {}
    for v in VARIANTS:
        runs = [json.loads(p.read_text()) for p in sorted(work.glob(f"{v}.*.json"))]
        variants[v] = {
            "tokens_per_s": _median([t for r in runs for t in r["tokens_per_s"]]),
            "tokens_per_s_all": [round(t, 2) for r in runs for t in r["tokens_per_s"]],
            "prefill_ms": 1e3 * _median([t for r in runs for t in r["prefill_s"]]),
            "peak_rss_mb": _median([r["peak_rss"] for r in runs]) / 2**20,
            "rss_after_imports_mb": _median([r["rss_after_imports"] for r in runs]) / 2**20,
            "peak_above_imports_mb": _median([r["peak_rss"] - r["rss_after_imports"] for r in runs]) / 2**20,
            "threads": runs[0]["threads"],
        }
    fp32, tern = variants["fp32"], variants["ternary"]
    ratio = _ratio
    ratios = {
        "decode_speedup_vs_fp32": ratio(tern["tokens_per_s"], fp32["tokens_per_s"]),
        "decode_speedup_vs_bf16": ratio(tern["tokens_per_s"], variants["bf16"]["tokens_per_s"]),
        "linear_weight_ratio": ratio(sizes["linear_bytes_fp32"], sizes["linear_bytes_ternary"]),
        "file_size_ratio": ratio(sizes["file_bytes_fp32"], sizes["file_bytes_ternary"]),
        "peak_rss_vs_fp32": ratio(tern["peak_rss_mb"], fp32["peak_rss_mb"]),
        "peak_above_imports_vs_fp32": ratio(tern["peak_above_imports_mb"], fp32["peak_above_imports_mb"]),
    }
    met = {
        "decode_speedup_vs_fp32": ratios["decode_speedup_vs_fp32"] >= TARGETS["decode_speedup_vs_fp32"],
        "linear_weight_ratio": ratios["linear_weight_ratio"] >= TARGETS["linear_weight_ratio"],
        "peak_rss_vs_fp32": ratios["peak_rss_vs_fp32"] <= TARGETS["peak_rss_vs_fp32"],
        "peak_above_imports_vs_fp32": ratios["peak_above_imports_vs_fp32"] <= TARGETS["peak_rss_vs_fp32"],
    }
    from tritium import kernels

    from .common import machine_info

    return {
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "heads": args.heads, "vocab": args.vocab, "tied_embeddings": True,
                  "prompt": PROMPT, "tokens": args.tokens, "storage": args.storage},
        "rounds": args.rounds, "repeats": args.repeats, "kernel_backend": kernels.get_backend(),
        "machine": machine_info(), "sizes": sizes, "variants": variants, "ratios": ratios,
        "targets": TARGETS, "targets_met": met,
    }


def _report(r: dict) -> str:
    m, s, rt = r["model"], r["sizes"], r["ratios"]
    out = [
        f"Llama decoder: hidden {m['hidden']}, {m['layers']} layers, MLP {m['intermediate']}, {m['heads']} heads, "
        f"vocab {m['vocab']} (tied); {s['linear_params'] / 1e6:.1f}M linear params; prompt {m['prompt']}, "
        f"{m['tokens']} tokens greedy, batch 1, KV cache",
        f"{r['machine']['cpu']}, {r['variants']['fp32']['threads']} threads, kernel backend "
        f"{r['kernel_backend']}; medians over {r['rounds']} processes x {r['repeats']} repeats",
        f"{'variant':<10} {'decode tok/s':>12} {'prefill ms':>11} {'peak RSS MB':>12} {'after imports':>14} "
        f"{'peak - imports':>15}",
    ]
    for name, v in r["variants"].items():
        out.append(f"{name:<10} {v['tokens_per_s']:>12.1f} {v['prefill_ms']:>11.1f} {v['peak_rss_mb']:>12.0f} "
                   f"{v['rss_after_imports_mb']:>14.0f} {v['peak_above_imports_mb']:>15.0f}")
    out += [
        f"files: fp32 {s['file_bytes_fp32'] / 2**20:.1f} MB, ternary ({m['storage']}) "
        f"{s['file_bytes_ternary'] / 2**20:.1f} MB ({rt['file_size_ratio']:.1f}x smaller)",
        f"linear weights: fp32 {s['linear_bytes_fp32'] / 2**20:.1f} MB, packed with scales "
        f"{s['linear_bytes_ternary'] / 2**20:.1f} MB ({rt['linear_weight_ratio']:.1f}x smaller)",
        "targets:",
    ]
    t, met = r["targets"], r["targets_met"]
    rows = [
        ("decode >= 4x fp32", f"{rt['decode_speedup_vs_fp32']:.2f}x (vs bf16 {rt['decode_speedup_vs_bf16']:.2f}x)",
         met["decode_speedup_vs_fp32"]),
        (f"linear weights >= {t['linear_weight_ratio']:.0f}x smaller", f"{rt['linear_weight_ratio']:.2f}x",
         met["linear_weight_ratio"]),
        ("peak RSS <= 0.35x fp32", f"{rt['peak_rss_vs_fp32']:.3f}x", met["peak_rss_vs_fp32"]),
        ("  same, above post-import RSS", f"{rt['peak_above_imports_vs_fp32']:.3f}x",
         met["peak_above_imports_vs_fp32"]),
    ]
    out += [f"  {name:<32} {value:<28} {'met' if ok else 'NOT met'}" for name, value, ok in rows]
    return "\n".join(out)


def _check(args: argparse.Namespace) -> None:
    """The model shape must give whole attention heads of an even size (rotary embeddings pair dims)."""
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        raise UsageError(f"--hidden {args.hidden} / --heads {args.heads} must be a whole, even head size")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.worker:
        return _worker(args)
    if args.quick:
        args.rounds, args.repeats = 1, 1
    with tempfile.TemporaryDirectory(prefix="tritium-bench-") as d:
        work = Path(d)
        sizes = _prepare(args, work)
        for _ in range(args.rounds):
            for v in VARIANTS:
                _spawn(v, args, work)
        result = _summarize(args, work, sizes)
    print(_report(result))
    if args.json:
        from .common import write_json

        write_json(args.json, result)
    return 0
