"""The ``tritium`` command line: a thin router to the modules that do the work.

Each command's module provides ``add_arguments(parser)`` and ``run(args)``; only the chosen command's
module is imported. The argument types below (`positive_int`, `fraction`, `regex`, `output_file`, ...)
are shared by every command. A bad argument, or a `UsageError` raised while a command checks its input,
prints one line ``error: ...`` naming the option to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tritium.demo", "train a small MLP on the digits data at fp32 and 1.58 bits"),
    "run": ("tritium.experiments.runner", "run paper experiments (mlp, gnn, xor, encoder, seq2seq, decoder)"),
    "info": ("tritium.io", "describe a saved tritium model file"),
    "bench train": ("tritium.bench.train", "QAT training step vs nn.Linear"),
    "bench kernels": ("tritium.bench.kernels", "ternary kernels vs torch fp32/bf16/int8"),
    "bench optim": ("tritium.bench.optim", "WideMLP step with a 31M-row-parameter embedding: AdamW vs LazyAdamW"),
    "bench model": ("tritium.bench.model", "frozen decoder generation vs fp32/bf16"),
}


class UsageError(ValueError):
    """A bad command-line value; `main` prints it as one line and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors raise `UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _number(value: object, kind: type) -> int | float:
    """``value`` (text or a JSON number) as an int or a finite float; ArgumentTypeError otherwise."""
    name = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"expected {name}, got {_show(value)}")
    try:
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {name}, got {_show(value)}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {_show(value)}")
    return number


def positive_int(value: object) -> int:
    """An integer >= 1."""
    n = _number(value, int)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {_show(value)}")
    return n


def nonnegative_int(value: object) -> int:
    """An integer >= 0."""
    n = _number(value, int)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {_show(value)}")
    return n


def positive_float(value: object) -> float:
    """A finite number > 0."""
    x = _number(value, float)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {_show(value)}")
    return x


def nonnegative_float(value: object) -> float:
    """A finite number >= 0."""
    x = _number(value, float)
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {_show(value)}")
    return x


def fraction(value: object) -> float:
    """A number strictly between 0 and 1."""
    x = _number(value, float)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {_show(value)}")
    return x


def unit_interval(value: object) -> float:
    """A number from 0 to 1 inclusive."""
    x = _number(value, float)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {_show(value)}")
    return x


def probability(value: object) -> float:
    """A probability usable for dropout: 0 <= p < 1."""
    x = _number(value, float)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"expected a probability >= 0 and < 1, got {_show(value)}")
    return x


def boolean(value: object) -> bool:
    """true/false (also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {_show(value)}")


def regex(value: object) -> str:
    """A valid regular expression."""
    text = str(value)
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"bad regular expression {text!r}: {e}") from None
    return text


def _items(value: object) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [x.strip() for x in str(value).split(",")] if isinstance(value, str) else [value]


def comma_list(value: object) -> str:
    """A non-empty comma list without empty items (returned as one comma-joined string)."""
    items = _items(value)
    if not items or any(str(x).strip() == "" for x in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of one or more non-empty items, got {_show(value)}")
    return ",".join(str(x).strip() for x in items)


def positive_int_list(value: object) -> str:
    """A non-empty comma list of positive integers (returned as one comma-joined string)."""
    items = _items(comma_list(value))
    try:
        return ",".join(str(positive_int(x)) for x in items)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {_show(value)}") from None


def precision_list(value: object) -> str:
    """A non-empty comma list of precision strings (`tritium.parse_precision`), returned as given."""
    from tritium.config import parse_precision

    text = comma_list(value)
    for spec in text.split(","):
        try:
            parse_precision(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def choice_list(*choices: str) -> Callable[[object], str]:
    """A type: a non-empty comma list of ``choices`` (case-insensitive, returned lower-case)."""

    def check(value: object) -> str:
        items = [x.lower() for x in _items(comma_list(value))]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown value {bad[0]!r}; choose from {', '.join(choices)}")
        return ",".join(items)

    check.__name__ = "choice_list"
    return check


def existing_file(value: object) -> str:
    """The path of an existing regular file."""
    path = Path(str(value))
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {str(value)!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a regular file: {str(value)!r}")
    return str(value)


def _writable_folder(folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what}: folder {str(existing)!r} is not writable")


def output_file(value: object) -> str:
    """A path a file can be written to: not a folder, in a folder that exists or can be created."""
    path = Path(str(value))
    if str(value) == "" or path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(value)!r} is a folder, not a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {str(value)!r}: permission denied")
    _writable_folder(path.parent, str(value))
    return str(value)


def output_dir(value: object) -> Path:
    """A folder that exists or can be created, and is writable."""
    path = Path(str(value))
    if str(value) == "":
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(value)!r} exists and is not a folder")
    _writable_folder(path, str(value))
    return path


def check(value: Any, type_: Callable[[Any], Any], option: str) -> Any:
    """``type_(value)``, with a failure raised as `UsageError` naming ``option``."""
    try:
        return type_(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UsageError(f"{option}: {e}") from None


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
