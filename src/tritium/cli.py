"""The ``tritium`` command line: a thin router to the modules that do the work.

Each command's module provides ``add_arguments(parser)`` and ``run(args)``; only the chosen command's
module is imported; the argument types they share are in `tritium.args`. A bad argument, or a
`UsageError` raised while a command checks its input, prints one line ``error: ...`` naming the option to
stderr and exits with status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .args import ArgumentParser, UsageError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tritium.demo", "train a small MLP on the digits data at fp32 and 1.58 bits"),
    "run": ("tritium.experiments.runner", "run paper experiments (mlp, gnn, xor, encoder, seq2seq, decoder)"),
    "info": ("tritium.info", "describe a saved tritium model file, a GGUF file or a Hugging Face BitNet folder"),
    "export": ("tritium.formats", "convert a ternary model to GGUF (llama.cpp), an HF BitNet folder or a tritium file"),
    "generate": ("tritium.generation", "generate text with a saved transformers model (streamed, tokens/s)"),
    "bench train": ("tritium.bench.train", "QAT training step vs nn.Linear"),
    "bench kernels": ("tritium.bench.kernels", "ternary kernels vs torch fp32/bf16/int8"),
    "bench optim": ("tritium.bench.optim", "WideMLP step with a 31M-row-parameter embedding: AdamW vs LazyAdamW"),
    "bench model": ("tritium.bench.model", "frozen decoder generation vs fp32/bf16"),
}


def _usage() -> str:
    lines = ["usage: tritium COMMAND [options]   (tritium COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _names_input(e: OSError, argv: Sequence[str]) -> bool:
    """Whether an OSError is about a path given on the command line."""
    given = {a.partition("=")[2] if a.startswith("--") else a for a in argv}
    return any(f is not None and str(f) in given for f in (e.filename, e.filename2))


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run ``tritium COMMAND ...``; returns the exit status (2 for a bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    key = " ".join(argv[:2]) if argv[:1] == ["bench"] else " ".join(argv[:1])
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if key not in COMMANDS:
        print(f"error: unknown command {key!r}; commands: {', '.join(COMMANDS)} (tritium --help)", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[key]
    module = importlib.import_module(module_name)
    parser = ArgumentParser(prog=f"tritium {key}", description=help_)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[len(key.split()):])
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        result = module.run(args)
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if not _names_input(e, argv):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
