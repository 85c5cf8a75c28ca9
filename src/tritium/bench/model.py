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

``--peers`` (when llama-cpp-python is importable) adds llama.cpp on the same shape, seed, threads, prompt and
token count: a model quantized with `tritium.formats.gguf.PRESET` (no input norm inside the linear layers,
which llama.cpp's graph lacks; otherwise the same as ``ternary``) is frozen, timed by tritium (``preset``)
and exported as TQ2_0 and TQ1_0 GGUF files that llama.cpp times in their own processes
(``llamacpp-tq2_0``, ``llamacpp-tq1_0``), so the ratios compare one function on the same weights.
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
PEERS = ("preset", "llamacpp-tq2_0", "llamacpp-tq1_0")
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
    parser.add_argument("--peers", action="store_true",
                        help="also time llama.cpp (llama-cpp-python) on the same model exported as TQ2_0/TQ1_0 GGUF")
    parser.add_argument("--worker", choices=VARIANTS + PEERS, help=argparse.SUPPRESS)
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


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _n_ctx(args: argparse.Namespace) -> int:
    return max(256, PROMPT + args.tokens + 1)


def _llamacpp_generate(llm, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, generated ids): llama.cpp's greedy decoding, one token per eval."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the last evaluated token's logits (the only ones computed)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    ids = []
    for _ in range(tokens):
        tok = int(np.argmax(last_logits()))
        ids.append(tok)
        llm.eval([tok])
    return t1 - t0, time.perf_counter() - t1, ids


def _llamacpp_worker(args: argparse.Namespace) -> int:
    """Time llama.cpp on the GGUF file of ``args.worker`` and write its results like `_worker`."""
    import llama_cpp

    work = Path(args.workdir)
    baseline = _rss()
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(work / f"{args.worker}.gguf"), n_threads=threads,
                          n_threads_batch=threads, n_ctx=_n_ctx(args), n_batch=max(PROMPT, 32), verbose=False)
    loaded = _rss()
    prompt = _prompt(args.vocab)[0].tolist()
    _llamacpp_generate(llm, prompt, min(4, args.tokens))  # warm-up
    runs = [_llamacpp_generate(llm, prompt, args.tokens) for _ in range(args.repeats)]
    _write_result(args, work, threads, runs, baseline, loaded)
    return 0


def _write_result(args: argparse.Namespace, work: Path, threads: int, runs: list, baseline: int,
                  loaded: int) -> None:
    result = {
        "variant": args.worker, "threads": threads,
        "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs],
        "tokens_per_s": [args.tokens / r[1] for r in runs], "tokens": runs[0][2],
        "rss_after_imports": baseline, "rss_after_load": loaded, "peak_rss": _peak_rss(),
    }
    (work / f"{args.worker}.{os.getpid()}.json").write_text(json.dumps(result))


def _worker(args: argparse.Namespace) -> int:
    if args.worker.startswith("llamacpp-"):
        return _llamacpp_worker(args)
    from transformers import LlamaForCausalLM

    import tritium

    work = Path(args.workdir)
    baseline = _rss()
    cfg = _config(args)
    torch.manual_seed(0)
    if args.worker in ("ternary", "preset"):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        tritium.load(work / f"{args.worker}.safetensors", model)
    else:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if args.worker == "fp32" else torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
    model.eval()
    loaded = _rss()
    prompt = _prompt(cfg.vocab_size)
    _generate(model, prompt, min(4, args.tokens))  # warm-up
    runs = [_generate(model, prompt, args.tokens) for _ in range(args.repeats)]
    _write_result(args, work, torch.get_num_threads(), runs, baseline, loaded)
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


def _prepare_peers(args: argparse.Namespace, work: Path) -> dict:
    """Save the `PRESET` model (same shape and seed) frozen, and as TQ2_0 and TQ1_0 GGUF files; return sizes."""
    from transformers import LlamaForCausalLM

    import tritium
    from tritium.formats.gguf import PRESET

    torch.manual_seed(0)
    model = tritium.freeze(tritium.quantize(LlamaForCausalLM(_config(args)).eval(), PRESET))
    tritium.save(model, work / "preset.safetensors", storage=args.storage)
    sizes = {"file_bytes_preset": os.path.getsize(work / "preset.safetensors")}
    for qtype in ("tq2_0", "tq1_0"):
        path = work / f"llamacpp-{qtype}.gguf"
        tritium.export(model, path, qtype=qtype)
        sizes[f"file_bytes_{qtype}"] = os.path.getsize(path)
    return sizes


def _llama_cpp() -> tuple[str | None, str | None]:
    """(llama-cpp-python version, None) when it can be imported, else (None, why not)."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        return None, f"{type(e).__name__}: {e}"
    return getattr(llama_cpp, "__version__", "unknown"), None


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


def _rows(work: Path, names: tuple[str, ...]) -> dict:
    variants = {}
    for v in names:
        runs = [json.loads(p.read_text()) for p in sorted(work.glob(f"{v}.*.json"))]
        variants[v] = {
            "tokens_per_s": _median([t for r in runs for t in r["tokens_per_s"]]),
            "tokens_per_s_all": [round(t, 2) for r in runs for t in r["tokens_per_s"]],
            "prefill_ms": 1e3 * _median([t for r in runs for t in r["prefill_s"]]),
            "peak_rss_mb": _median([r["peak_rss"] for r in runs]) / 2**20,
            "rss_after_imports_mb": _median([r["rss_after_imports"] for r in runs]) / 2**20,
            "peak_above_imports_mb": _median([r["peak_rss"] - r["rss_after_imports"] for r in runs]) / 2**20,
            "threads": runs[0]["threads"], "greedy_tokens": runs[0]["tokens"],
        }
    return variants


def _peer_summary(work: Path, variants: dict, sizes: dict, version: str) -> dict:
    """Rows of the peers and the speed ratios of tritium to llama.cpp (> 1: tritium is faster)."""
    rows = _rows(work, PEERS)
    ratios = {}
    for ours, row in (("preset", rows["preset"]), ("ternary", variants["ternary"])):
        for q in ("tq2_0", "tq1_0"):
            peer = rows[f"llamacpp-{q}"]
            ratios[f"decode_{ours}_vs_llamacpp_{q}"] = _ratio(row["tokens_per_s"], peer["tokens_per_s"])
            ratios[f"prefill_{ours}_vs_llamacpp_{q}"] = _ratio(peer["prefill_ms"], row["prefill_ms"])
    ref = rows["preset"]["greedy_tokens"]
    same = {f"llamacpp-{q}": sum(a == b for a, b in zip(rows[f"llamacpp-{q}"]["greedy_tokens"], ref, strict=True))
            for q in ("tq2_0", "tq1_0")}
    return {"llama_cpp": version, "variants": rows, "ratios": ratios, "sizes": sizes,
            "greedy_tokens_same_as_preset": same,
            "note": "preset and llamacpp-* are the PRESET model (norm=None, as llama.cpp's graph has no input "
                    "norm in linear layers); ternary differs from it only by that norm"}


def _summarize(args: argparse.Namespace, work: Path, sizes: dict) -> dict:
    variants = _rows(work, VARIANTS)
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
    if "peers" in r:
        out.append(_peer_report(r["peers"]))
    return "\n".join(out)


def _peer_report(p: dict) -> str:
    if "skipped" in p:
        return f"--peers: llama.cpp skipped: {p['skipped']}"
    s, rt = p["sizes"], p["ratios"]
    out = [
        f"peers: llama.cpp (llama-cpp-python {p['llama_cpp']}) on the PRESET model (norm=None: llama.cpp's graph "
        "has no input norm in linear layers; 'ternary' above differs from it only by that norm); same shape, "
        "seed, threads, prompt and tokens; llama.cpp's default F16 KV cache; a speed comparison",
        f"{'variant':<16} {'decode tok/s':>12} {'prefill ms':>11} {'peak RSS MB':>12} {'after imports':>14} "
        f"{'peak - imports':>15}",
    ]
    for name, v in p["variants"].items():
        out.append(f"{name:<16} {v['tokens_per_s']:>12.1f} {v['prefill_ms']:>11.1f} {v['peak_rss_mb']:>12.0f} "
                   f"{v['rss_after_imports_mb']:>14.0f} {v['peak_above_imports_mb']:>15.0f}")
    out.append(f"files: preset {s['file_bytes_preset'] / 2**20:.1f} MB, TQ2_0 {s['file_bytes_tq2_0'] / 2**20:.1f} "
               f"MB, TQ1_0 {s['file_bytes_tq1_0'] / 2**20:.1f} MB")
    n = len(p["variants"]["preset"]["greedy_tokens"])
    same = p["greedy_tokens_same_as_preset"]
    out.append(f"greedy tokens equal to preset's: TQ2_0 {same['llamacpp-tq2_0']}/{n}, "
               f"TQ1_0 {same['llamacpp-tq1_0']}/{n}")
    out.append("tritium / llama.cpp speed (> 1: tritium faster):")
    for ours in ("preset", "ternary"):
        out.append(f"  {ours:<8} decode {rt[f'decode_{ours}_vs_llamacpp_tq2_0']:.2f}x TQ2_0, "
                   f"{rt[f'decode_{ours}_vs_llamacpp_tq1_0']:.2f}x TQ1_0; prefill "
                   f"{rt[f'prefill_{ours}_vs_llamacpp_tq2_0']:.2f}x TQ2_0, "
                   f"{rt[f'prefill_{ours}_vs_llamacpp_tq1_0']:.2f}x TQ1_0")
    return "\n".join(out)


def _check(args: argparse.Namespace) -> None:
    """The model shape must give whole attention heads of an even size (rotary embeddings pair dims)."""
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        raise UsageError(f"--hidden {args.hidden} / --heads {args.heads} must be a whole, even head size")
    if args.peers and (args.hidden % 256 or args.intermediate % 256):
        raise UsageError(f"--peers needs --hidden and --intermediate that are multiples of 256 (llama.cpp's TQ "
                         f"block), got {args.hidden} and {args.intermediate}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.worker:
        return _worker(args)
    if args.quick:
        args.rounds, args.repeats = 1, 1
    version, why = _llama_cpp() if args.peers else (None, None)
    names = VARIANTS + (PEERS if version else ())
    with tempfile.TemporaryDirectory(prefix="tritium-bench-") as d:
        work = Path(d)
        sizes = _prepare(args, work)
        peer_sizes = _prepare_peers(args, work) if version else {}
        for _ in range(args.rounds):
            for v in names:
                _spawn(v, args, work)
        result = _summarize(args, work, sizes)
        if version:
            result["peers"] = _peer_summary(work, result["variants"], peer_sizes, version)
        elif why:
            result["peers"] = {"skipped": f"llama-cpp-python cannot be imported ({why}); "
                                          "pip install 'tritium[llamacpp]'"}
    print(_report(result))
    if args.json:
        from .common import write_json

        write_json(args.json, result)
    return 0
