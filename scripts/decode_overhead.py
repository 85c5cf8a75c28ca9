"""Per-token cost of a compiled decode step on a Llama too small to compute anything: the overhead floor.

An fp32 transformers Llama with hidden 64, 8 layers, MLP 128, 4 heads and vocabulary 256 decodes 64 tokens
greedily at batch 1, as `tritium.generate` does, in five variants, each in its own process: eager (prefix
cache, `decode_step`); compiled with tritium's exact backend (``compile=True``); compiled with plain Inductor;
plain Inductor with its C++ wrapper (`torch._inductor.config.cpp_wrapper`); compiled ahead of time
(``compile="aot"``, `tritium.aot.AotDecoder`). The model's arithmetic
is a few microseconds per token, so the time per token is what the decode loop, torch.compile's entry and
the compiled graph's wrapper cost on this machine, whatever the model's size. The last column compares the
greedy tokens with the eager run's.

    python scripts/decode_overhead.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

VARIANTS = ("eager", "exact", "inductor", "inductor+cpp_wrapper", "aot")


def measure(variant: str, threads: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tritium import generation
    from tritium.bench.model import _generate_aot, _generate_fast

    torch.set_num_threads(threads)
    if variant == "inductor+cpp_wrapper":
        import torch._inductor.config

        torch._inductor.config.cpp_wrapper = True
    if variant.startswith("inductor"):
        generation._exact_backend = "inductor"
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    if variant == "aot":
        from tritium.aot import AotDecoder

        decoder = AotDecoder(model, 128)

        def run() -> tuple[float, float, list[int]]:
            return _generate_aot(decoder, prompt, 64)
    else:
        step = generation.decode_step(model, variant != "eager")
        if variant != "eager":
            generation._warm_up(model, step)

        def run() -> tuple[float, float, list[int]]:
            return _generate_fast(model, prompt, 64, step)
    run()
    runs = [run() for _ in range(repeats)]
    return {"variant": variant, "us_per_token": statistics.median(r[1] / 64 * 1e6 for r in runs),
            "tokens": runs[0][2]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.threads, args.repeats)))
        return 0
    rows = []
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--threads", str(args.threads),
                              "--repeats", str(args.repeats)], capture_output=True, text=True)
        if out.returncode:
            print(f"{v}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny fp32 Llama (hidden 64, 8 layers), {args.threads} threads, 64 tokens, median of {args.repeats}")
    print(f"{'variant':<22}{'us/token':>10}  tokens = eager's")
    for r in rows:
        print(f"{r['variant']:<22}{r['us_per_token']:>10.0f}  {r['tokens'] == rows[0]['tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
