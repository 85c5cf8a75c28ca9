"""``tritium bench model``: greedy decoding of a frozen ternary Llama-style decoder vs fp32 and bf16.

The model is a transformers ``LlamaForCausalLM`` built from a config (random weights, no download):
hidden 1024, 8 layers, MLP 2816, 16 heads, i.e. 103M parameters in its linear layers. The vocabulary
is 8192 with tied input/output embeddings (8.4M parameters): a 32k untied vocabulary would add 65M
full-precision parameters, more than half the model, and the benchmark would mostly measure the
embedding and the head, which `tritium.quantize` keeps in full precision by default (as does the
frozen model here). Each variant runs in its own process, so its peak RSS (VmHWM) is its own:

* ``fp32``: the model at float32; ``bf16``: the model built directly at bfloat16;
* ``ternary``: a meta-device skeleton filled by `tritium.load` from the saved frozen file, so its
  float32 linear weights never exist in that process; decoded eagerly by transformers' forward with its
  ``DynamicCache``, as the other rows;
* ``ternary-compiled``: the same model decoded as `tritium.generation.generate` does (its frozen layers that
  read the same input grouped, a `tritium.generation.prefix_cache`, the one-token forward compiled by
  `tritium.generation.decode_step`; the prefill eager), whose greedy tokens are checked against ``ternary``'s
  (they are bit-identical by construction). ``--no-compile`` leaves the forward eager (and the name says so);
* ``ternary-aot``: the same model decoded by `tritium.aot.AotDecoder` (``tritium.generate(..., compile="aot")``):
  the eager prefill into a prefix cache, then the one-token forward compiled ahead of time by AOTInductor
  (bit-identical to the eager forward; its greedy tokens are checked too); skipped with ``--no-compile``.

Each process prefills a 16-token prompt and decodes ``--tokens`` tokens greedily at batch 1 with the
KV cache, and separately prefills a 128-token prompt (``prefill128``); decode tokens/s is the median over
all repeats of all rounds (rounds alternate the variants, so load changes on a shared machine hit them
alike). Compilation happens before the timed runs and is reported apart (``compile_s``).

``--peers`` (when llama-cpp-python is importable) adds llama.cpp on the same shape, seed, threads, prompt and
token count: a model quantized with `tritium.formats.gguf.PRESET` (no input norm inside the linear layers,
which llama.cpp's graph lacks; otherwise the same as ``ternary``) is frozen, timed by tritium (``preset``)
and exported as TQ2_0 and TQ1_0 GGUF files that llama.cpp times in their own processes
(``llamacpp-tq2_0``, ``llamacpp-tq1_0``), so the ratios compare one function on the same weights; ``preset``
is timed eagerly, as ``preset-compiled`` and as ``preset-aot`` (as the ternary rows). The speed targets compare
the faster of ``preset-compiled`` and ``preset-aot`` with the faster llama.cpp type.
"""

from __future__ import annotations

import argparse
import contextlib
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

VARIANTS = ("fp32", "bf16", "ternary", "ternary-compiled", "ternary-aot")
PEERS = ("preset", "preset-compiled", "preset-aot", "llamacpp-tq2_0", "llamacpp-tq1_0")
PROMPT = 16
PROMPT_LONG = 128  # the prompt of the separate prefill measurement
TARGETS = {"decode_speedup_vs_fp32": 4.0, "linear_weight_ratio": 8.0, "peak_rss_vs_fp32": 0.35}
PEER_TARGETS = {"decode": 1.25, "prefill128": 1.5}  # the faster preset-compiled/-aot / the faster llama.cpp type


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
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="time the *-compiled rows with an eager forward (skips torch.compile)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one generation per tritium process and print where a token's time goes")
    parser.add_argument("--worker", choices=VARIANTS + PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)


def _config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(256, PROMPT + args.tokens + 1, PROMPT_LONG), tie_word_embeddings=True,
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
def _generate(model, prompt: torch.Tensor, tokens: int, around_decode=None) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, generated ids): greedy decoding with the KV cache; the decode loop runs
    inside the context manager ``around_decode`` when one is given (the profiler of `_profile`)."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **extra)
    ids = []
    with around_decode or contextlib.nullcontext():
        t1 = time.perf_counter()
        for _ in range(tokens):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ids.append(int(tok))
            out = model(input_ids=tok, use_cache=True, **{key: getattr(out, key)}, **extra)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ids


@torch.inference_mode()
def _generate_fast(model, prompt: torch.Tensor, tokens: int, step,
                   around_decode=None) -> tuple[float, float, list[int]]:
    """`_generate` as `tritium.generation.generate` decodes: a prefix cache, the eager prefill, then ``step``
    (`tritium.generation.decode_step`), its guards skipped after the first two steps as there."""
    from tritium import generation

    cache = generation.prefix_cache(model.config.num_hidden_layers, prompt.shape[1] + tokens)
    t0 = time.perf_counter()
    logits = generation.decode_step(model)(prompt, cache)
    ids = []
    with around_decode or contextlib.nullcontext(), contextlib.ExitStack() as stack:
        t1 = time.perf_counter()
        for i in range(tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            ids.append(int(tok))
            if i == 2:
                stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
            logits = step(tok, cache)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ids


def _generate_aot(decoder, prompt: torch.Tensor, tokens: int, around_decode=None) -> tuple[float, float, list[int]]:
    """`_generate` with a `tritium.aot.AotDecoder`: its eager prefill, then its compiled steps."""
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.prefill(prompt)
    ids = []
    with around_decode or contextlib.nullcontext():
        t1 = time.perf_counter()
        for _ in range(tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            ids.append(int(tok))
            logits = decoder.step(tok)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ids


@torch.inference_mode()
def _prefill_long(model, vocab: int, fast: bool, decoder=None) -> float:
    """Seconds of one forward on a `PROMPT_LONG`-token prompt (the last position's logits), KV cache filled."""
    from tritium import generation

    prompt = _prompt(vocab, PROMPT_LONG)
    t0 = time.perf_counter()
    if decoder is not None:
        decoder.reset()
        decoder.prefill(prompt)
    elif fast:
        generation.decode_step(model)(prompt, generation.prefix_cache(model.config.num_hidden_layers, PROMPT_LONG))
    else:
        params = inspect.signature(model.forward).parameters
        model(input_ids=prompt, use_cache=True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {}))
    return time.perf_counter() - t0


# Where a decoded token's time goes: profiler events by name (self times), in this order; the first match wins.
PROFILE_PARTS = (
    ("ternary linears", ("tritium::",)),
    ("head and float matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                                "mkl::", "onednn::")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("compiled code and its wrapper", ("## Call CompiledFxGraph", "Torch-Compiled Region")),
    ("torch.compile entry (guards, inputs)", ("TorchDynamo Cache Lookup", "Pregraph bytecode",
                                              "AOTDispatcher Runtime Wrapper")),
    ("other ATen ops", ("aten::",)),
)


def _profile(run, tokens: int) -> dict:
    """Microseconds per decoded token by `PROFILE_PARTS` (self times of torch.profiler events) in one profiled
    generation of ``tokens`` tokens, ``run(tokens, profiler)``; ``python and the rest`` is the decode wall time
    not covered by any event (Python between ops, the token loop), ``total`` the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from tritium import kernels

    impl = kernels._frozen_linears_impl  # eager frozen layers call it directly, without the op's profiler event

    def recorded(*args):
        with record_function("tritium::ternary_linears"):
            return impl(*args)

    prof = profile(activities=[ProfilerActivity.CPU])
    kernels._frozen_linears_impl = recorded
    try:
        _, decode_s, _ = run(tokens, prof)
    finally:
        kernels._frozen_linears_impl = impl
    parts = dict.fromkeys([name for name, _ in PROFILE_PARTS] + ["other"], 0.0)
    for event in prof.key_averages():
        part = next((name for name, prefixes in PROFILE_PARTS if event.key.startswith(prefixes)), "other")
        parts[part] += event.self_cpu_time_total
    per_token = {name: us / tokens for name, us in parts.items()}
    total = 1e6 * decode_s / tokens
    per_token["python and the rest"] = max(0.0, total - sum(per_token.values()))
    per_token["total"] = total
    return {name: round(us, 1) for name, us in per_token.items()}


def _prompt(vocab: int, n: int = PROMPT) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def _n_ctx(args: argparse.Namespace) -> int:
    return max(256, PROMPT + args.tokens + 1, PROMPT_LONG)


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
                          n_threads_batch=threads, n_ctx=_n_ctx(args), n_batch=max(PROMPT, PROMPT_LONG, 32),
                          verbose=False)
    loaded = _rss()
    prompt, long = _prompt(args.vocab)[0].tolist(), _prompt(args.vocab, PROMPT_LONG)[0].tolist()
    _llamacpp_generate(llm, prompt, min(4, args.tokens))  # warm-up
    runs = [_llamacpp_generate(llm, prompt, args.tokens) for _ in range(args.repeats)]
    prefill_long = [_llamacpp_generate(llm, long, 0)[0] for _ in range(args.repeats)]
    _write_result(args, work, threads, runs, baseline, loaded, prefill_long)
    return 0


def _write_result(args: argparse.Namespace, work: Path, threads: int, runs: list, baseline: int,
                  loaded: int, prefill_long: list[float], compile_s: float = 0.0, profiled: dict | None = None,
                  peak: int | None = None) -> None:
    result = {
        "variant": args.worker, "threads": threads,
        "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs],
        "tokens_per_s": [args.tokens / r[1] for r in runs], "tokens": runs[0][2],
        "prefill128_s": prefill_long, "compile_s": compile_s,
        "rss_after_imports": baseline, "rss_after_load": loaded, "peak_rss": peak or _peak_rss(),
        "profile": profiled,
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
    fast = args.worker.endswith("-compiled")
    ahead = args.worker.endswith("-aot")
    name = args.worker.removesuffix("-compiled").removesuffix("-aot")
    if name in ("ternary", "preset"):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        tritium.load(work / f"{name}.safetensors", model)
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
    compile_s = 0.0
    decoder = None
    if ahead:
        from tritium.aot import AotDecoder

        decoder = AotDecoder(model, max(PROMPT + args.tokens, PROMPT_LONG))
        compile_s = decoder.compile_s

        def run(tokens: int, around_decode=None) -> tuple[float, float, list[int]]:
            return _generate_aot(decoder, prompt, tokens, around_decode)
    elif fast:
        from tritium import generation

        generation._share_inputs(model)
        step = generation.decode_step(model, args.compile)
        t0 = time.perf_counter()
        generation._warm_up(model, step)
        compile_s = time.perf_counter() - t0

        def run(tokens: int, around_decode=None) -> tuple[float, float, list[int]]:
            return _generate_fast(model, prompt, tokens, step, around_decode)
    else:
        def run(tokens: int, around_decode=None) -> tuple[float, float, list[int]]:
            return _generate(model, prompt, tokens, around_decode)
    run(min(4, args.tokens))  # warm-up
    runs = [run(args.tokens) for _ in range(args.repeats)]
    _prefill_long(model, cfg.vocab_size, fast, decoder)  # warm-up
    prefill_long = [_prefill_long(model, cfg.vocab_size, fast, decoder) for _ in range(args.repeats)]
    peak = _peak_rss()  # before profiling, which holds its own records
    profiled = _profile(run, args.tokens) if args.profile else None  # after the timed runs
    _write_result(args, work, torch.get_num_threads(), runs, baseline, loaded, prefill_long, compile_s, profiled,
                  peak)
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
           "--vocab", str(args.vocab), *([] if args.compile else ["--no-compile"]),
           *(["--profile"] if args.profile else [])]


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
            "prefill128_ms": 1e3 * _median([t for r in runs for t in r["prefill128_s"]]),
            "compile_s": _median([r["compile_s"] for r in runs]),
            "peak_rss_mb": _median([r["peak_rss"] for r in runs]) / 2**20,
            "rss_after_imports_mb": _median([r["rss_after_imports"] for r in runs]) / 2**20,
            "peak_above_imports_mb": _median([r["peak_rss"] - r["rss_after_imports"] for r in runs]) / 2**20,
            "threads": runs[0]["threads"], "greedy_tokens": runs[0]["tokens"],
            "profile": _median_profile([r["profile"] for r in runs if r.get("profile")]),
        }
    return variants


def _median_profile(profiles: list[dict]) -> dict | None:
    """The per-part median of several `_profile` results (None without any)."""
    return {k: round(_median([p[k] for p in profiles]), 1) for k in profiles[0]} if profiles else None


def _profile_table(variants: dict) -> list[str]:
    """Per-token time by part for the variants that were profiled (``--profile``)."""
    profiled = {name: v["profile"] for name, v in variants.items() if v.get("profile")}
    if not profiled:
        return []
    names = list(profiled)
    width = max(len(n) for n in names) + 2
    out = ["decode time per token by part, us (torch.profiler self times in one profiled generation per process, "
           "median over processes; the profiler itself adds time):",
           f"  {'part':<38}" + "".join(f"{n:>{width}}" for n in names)]
    for part in next(iter(profiled.values())):
        out.append(f"  {part:<38}" + "".join(f"{profiled[n].get(part, 0.0):>{width}.0f}" for n in names))
    return out


def _peer_summary(work: Path, variants: dict, sizes: dict, version: str) -> dict:
    """Rows of the peers and the speed ratios of tritium to llama.cpp (> 1: tritium is faster)."""
    rows = _rows(work, tuple(n for n in PEERS if any(work.glob(f"{n}.*.json"))))
    ratios = {}
    ours_rows = {name: row for name, row in (*rows.items(), *variants.items())
                 if name.startswith(("preset", "ternary"))}
    for ours, row in ours_rows.items():
        for q in ("tq2_0", "tq1_0"):
            peer = rows[f"llamacpp-{q}"]
            ratios[f"decode_{ours}_vs_llamacpp_{q}"] = _ratio(row["tokens_per_s"], peer["tokens_per_s"])
            ratios[f"prefill_{ours}_vs_llamacpp_{q}"] = _ratio(peer["prefill_ms"], row["prefill_ms"])
            ratios[f"prefill128_{ours}_vs_llamacpp_{q}"] = _ratio(peer["prefill128_ms"], row["prefill128_ms"])
    peers = [rows[f"llamacpp-{q}"] for q in ("tq2_0", "tq1_0")]
    fast = [name for name in ("preset-compiled", "preset-aot") if name in rows]
    decode = max(fast, key=lambda name: rows[name]["tokens_per_s"])
    prefill = min(fast, key=lambda name: rows[name]["prefill128_ms"])
    ratios["decode_best_vs_best_peer"] = _ratio(rows[decode]["tokens_per_s"], max(p["tokens_per_s"] for p in peers))
    ratios["prefill128_best_vs_best_peer"] = _ratio(min(p["prefill128_ms"] for p in peers),
                                                    rows[prefill]["prefill128_ms"])
    ref = rows["preset"]["greedy_tokens"]
    same = {name: sum(a == b for a, b in zip(row["greedy_tokens"], ref, strict=True))
            for name, row in rows.items() if name != "preset"}
    targets = {"decode_vs_best_peer": PEER_TARGETS["decode"], "prefill128_vs_best_peer": PEER_TARGETS["prefill128"]}
    met = {"decode_vs_best_peer": ratios["decode_best_vs_best_peer"] >= PEER_TARGETS["decode"],
           "prefill128_vs_best_peer": ratios["prefill128_best_vs_best_peer"] >= PEER_TARGETS["prefill128"]}
    return {"llama_cpp": version, "variants": rows, "ratios": ratios, "sizes": sizes,
            "best_rows": {"decode": decode, "prefill128": prefill},
            "greedy_tokens_same_as_preset": same, "targets": targets, "targets_met": met,
            "note": "preset and llamacpp-* are the PRESET model (norm=None, as llama.cpp's graph has no input "
                    "norm in linear layers); ternary differs from it only by that norm"}


def _summarize(args: argparse.Namespace, work: Path, sizes: dict) -> dict:
    variants = _rows(work, _names(VARIANTS, args))
    fp32, tern, fast = variants["fp32"], variants["ternary"], variants["ternary-compiled"]
    ratio = _ratio
    ratios = {
        "decode_speedup_vs_fp32": ratio(tern["tokens_per_s"], fp32["tokens_per_s"]),
        "decode_speedup_vs_bf16": ratio(tern["tokens_per_s"], variants["bf16"]["tokens_per_s"]),
        "decode_compiled_vs_eager": ratio(fast["tokens_per_s"], tern["tokens_per_s"]),
        "decode_compiled_speedup_vs_fp32": ratio(fast["tokens_per_s"], fp32["tokens_per_s"]),
        "prefill128_compiled_vs_eager": ratio(tern["prefill128_ms"], fast["prefill128_ms"]),
        "linear_weight_ratio": ratio(sizes["linear_bytes_fp32"], sizes["linear_bytes_ternary"]),
        "file_size_ratio": ratio(sizes["file_bytes_fp32"], sizes["file_bytes_ternary"]),
        "peak_rss_vs_fp32": ratio(tern["peak_rss_mb"], fp32["peak_rss_mb"]),
        "peak_above_imports_vs_fp32": ratio(tern["peak_above_imports_mb"], fp32["peak_above_imports_mb"]),
    }
    if "ternary-aot" in variants:
        ratios["decode_aot_vs_eager"] = ratio(variants["ternary-aot"]["tokens_per_s"], tern["tokens_per_s"])
        ratios["decode_aot_speedup_vs_fp32"] = ratio(variants["ternary-aot"]["tokens_per_s"], fp32["tokens_per_s"])
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
                  "prompt": PROMPT, "prompt_long": PROMPT_LONG, "tokens": args.tokens, "storage": args.storage},
        "rounds": args.rounds, "repeats": args.repeats, "kernel_backend": kernels.get_backend(),
        "compiled": args.compile, "machine": machine_info(), "sizes": sizes, "variants": variants,
        "ratios": ratios, "targets": TARGETS, "targets_met": met,
        "greedy_tokens_compiled_equal_eager": fast["greedy_tokens"] == tern["greedy_tokens"],
        **({"greedy_tokens_aot_equal_eager": variants["ternary-aot"]["greedy_tokens"] == tern["greedy_tokens"]}
           if "ternary-aot" in variants else {}),
    }


def _variant_table(variants: dict, width: int) -> list[str]:
    out = [f"{'variant':<{width}} {'decode tok/s':>12} {'prefill ms':>11} {'prefill128 ms':>14} {'peak RSS MB':>12} "
           f"{'after imports':>14} {'peak - imports':>15}"]
    for name, v in variants.items():
        out.append(f"{name:<{width}} {v['tokens_per_s']:>12.1f} {v['prefill_ms']:>11.1f} {v['prefill128_ms']:>14.1f} "
                   f"{v['peak_rss_mb']:>12.0f} {v['rss_after_imports_mb']:>14.0f} {v['peak_above_imports_mb']:>15.0f}")
    return out


def _report(r: dict) -> str:
    m, s, rt = r["model"], r["sizes"], r["ratios"]
    out = [
        f"Llama decoder: hidden {m['hidden']}, {m['layers']} layers, MLP {m['intermediate']}, {m['heads']} heads, "
        f"vocab {m['vocab']} (tied); {s['linear_params'] / 1e6:.1f}M linear params; prompt {m['prompt']}, "
        f"{m['tokens']} tokens greedy, batch 1, KV cache; prefill128: one forward on a {m['prompt_long']}-token "
        "prompt",
        f"{r['machine']['cpu']}, {r['variants']['fp32']['threads']} threads, kernel backend "
        f"{r['kernel_backend']}; medians over {r['rounds']} processes x {r['repeats']} repeats",
        *_variant_table(r["variants"], 16),
        f"ternary-compiled: {'compiled' if r['compiled'] else 'NOT compiled (--no-compile)'} one-token forward "
        f"(compile {r['variants']['ternary-compiled']['compile_s']:.1f} s, before timing), shared input "
        f"quantization, prefix cache; decode {rt['decode_compiled_vs_eager']:.2f}x, prefill128 "
        f"{rt['prefill128_compiled_vs_eager']:.2f}x the eager ternary row; greedy tokens "
        f"{'identical to' if r['greedy_tokens_compiled_equal_eager'] else 'DIFFERENT from'} the eager row's",
        *([f"ternary-aot: one-token forward compiled ahead of time by AOTInductor (compile "
           f"{r['variants']['ternary-aot']['compile_s']:.1f} s, before timing), shared input quantization, prefix "
           f"cache; decode {rt['decode_aot_vs_eager']:.2f}x the eager ternary row; greedy tokens "
           f"{'identical to' if r['greedy_tokens_aot_equal_eager'] else 'DIFFERENT from'} the eager row's"]
          if "ternary-aot" in r["variants"] else []),
        f"files: fp32 {s['file_bytes_fp32'] / 2**20:.1f} MB, ternary ({m['storage']}) "
        f"{s['file_bytes_ternary'] / 2**20:.1f} MB ({rt['file_size_ratio']:.1f}x smaller)",
        f"linear weights: fp32 {s['linear_bytes_fp32'] / 2**20:.1f} MB, packed with scales "
        f"{s['linear_bytes_ternary'] / 2**20:.1f} MB ({rt['linear_weight_ratio']:.1f}x smaller)",
        *_profile_table(r["variants"]),
        "targets:",
    ]
    t, met = r["targets"], r["targets_met"]
    rows = [
        ("decode >= 4x fp32", f"{rt['decode_speedup_vs_fp32']:.2f}x (vs bf16 {rt['decode_speedup_vs_bf16']:.2f}x; "
         f"compiled {rt['decode_compiled_speedup_vs_fp32']:.2f}x"
         + (f", aot {rt['decode_aot_speedup_vs_fp32']:.2f}x" if "decode_aot_speedup_vs_fp32" in rt else "") + ")",
         met["decode_speedup_vs_fp32"]),
        (f"linear weights >= {t['linear_weight_ratio']:.0f}x smaller", f"{rt['linear_weight_ratio']:.2f}x",
         met["linear_weight_ratio"]),
        ("peak RSS <= 0.35x fp32", f"{rt['peak_rss_vs_fp32']:.3f}x", met["peak_rss_vs_fp32"]),
        ("  same, above post-import RSS", f"{rt['peak_above_imports_vs_fp32']:.3f}x",
         met["peak_above_imports_vs_fp32"]),
    ]
    out += [f"  {name:<32} {value:<40} {'met' if ok else 'NOT met'}" for name, value, ok in rows]
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
        "seed, threads, prompts and tokens; llama.cpp's default F16 KV cache; a speed comparison",
        *_variant_table(p["variants"], 16),
        f"files: preset {s['file_bytes_preset'] / 2**20:.1f} MB, TQ2_0 {s['file_bytes_tq2_0'] / 2**20:.1f} "
        f"MB, TQ1_0 {s['file_bytes_tq1_0'] / 2**20:.1f} MB",
        *_profile_table(p["variants"]),
    ]
    n = len(p["variants"]["preset"]["greedy_tokens"])
    same = p["greedy_tokens_same_as_preset"]
    out.append("greedy tokens equal to preset's: " + ", ".join(f"{name} {k}/{n}" for name, k in same.items()))
    out.append("tritium / llama.cpp speed (> 1: tritium faster):")
    for ours in sorted({k.split("_")[1] for k in rt if k.endswith("_vs_llamacpp_tq2_0")}, key=_row_order):
        out.append(f"  {ours:<16} decode {rt[f'decode_{ours}_vs_llamacpp_tq2_0']:.2f}x TQ2_0, "
                   f"{rt[f'decode_{ours}_vs_llamacpp_tq1_0']:.2f}x TQ1_0; prefill "
                   f"{rt[f'prefill_{ours}_vs_llamacpp_tq2_0']:.2f}x TQ2_0, "
                   f"{rt[f'prefill_{ours}_vs_llamacpp_tq1_0']:.2f}x TQ1_0; prefill128 "
                   f"{rt[f'prefill128_{ours}_vs_llamacpp_tq2_0']:.2f}x TQ2_0, "
                   f"{rt[f'prefill128_{ours}_vs_llamacpp_tq1_0']:.2f}x TQ1_0")
    t, met = p["targets"], p["targets_met"]
    best = p["best_rows"]
    out.append(f"targets: decode ({best['decode']}) >= {t['decode_vs_best_peer']}x the best peer: "
               f"{rt['decode_best_vs_best_peer']:.2f}x {'met' if met['decode_vs_best_peer'] else 'NOT met'}"
               f"; prefill128 ({best['prefill128']}) >= {t['prefill128_vs_best_peer']}x: "
               f"{rt['prefill128_best_vs_best_peer']:.2f}x {'met' if met['prefill128_vs_best_peer'] else 'NOT met'}")
    return "\n".join(out)


def _names(names: tuple[str, ...], args: argparse.Namespace) -> tuple[str, ...]:
    """The rows that run: the ahead-of-time ones only when compiling."""
    return names if args.compile else tuple(n for n in names if not n.endswith("-aot"))


def _row_order(name: str) -> int:
    order = [*VARIANTS, *PEERS]
    return order.index(name) if name in order else len(order)


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
    names = _names(VARIANTS + (PEERS if version else ()), args)
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
