"""The ``tritium`` command line: a thin router to the modules that do the work.

Each command's module provides ``add_arguments(parser)`` and ``run(args)``; only the chosen command's
module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tritium.demo", "train a small MLP on the digits data at fp32 and 1.58 bits"),
    "run": ("tritium.experiments.runner", "run paper experiments (mlp, gnn, xor, encoder, seq2seq, decoder)"),
    "info": ("tritium.io", "describe a saved tritium model file"),
    "bench train": ("tritium.bench.train", "QAT training step vs nn.Linear"),
    "bench kernels": ("tritium.bench.kernels", "ternary kernels vs torch fp32/bf16/int8"),
    "bench optim": ("tritium.bench.optim", "WideMLP step with a 31M-row-parameter embedding: AdamW vs LazyAdamW"),
    "bench model": ("tritium.bench.model", "frozen decoder generation vs fp32/bf16"),
}


def _usage() -> str:
    lines = ["usage: tritium COMMAND [options]   (tritium COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    key = " ".join(argv[:2]) if argv[:1] == ["bench"] else " ".join(argv[:1])
    if key not in COMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module_name, help_ = COMMANDS[key]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"tritium {key}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[len(key.split()):])
    result = module.run(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
