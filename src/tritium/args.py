"""Command-line argument types shared by every ``tritium`` command.

Each type turns the text of one option into its value or raises `argparse.ArgumentTypeError`; `check`
applies one to a value from elsewhere (a ``--set`` entry, a protocol file). A `UsageError` is a bad
command-line value: ``tritium.cli.main`` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


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


def _ranged(kind: type, ok: Callable[[float], bool], expected: str, doc: str) -> Callable[[object], Any]:
    """An argument type: a ``kind`` number (see `_number`) for which ``ok`` holds."""

    def parse(value: object) -> Any:
        x = _number(value, kind)
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {_show(value)}")
        return x

    parse.__doc__ = doc
    return parse


positive_int = _ranged(int, lambda n: n >= 1, "a positive integer", "An integer >= 1.")
nonnegative_int = _ranged(int, lambda n: n >= 0, "an integer >= 0", "An integer >= 0.")
positive_float = _ranged(float, lambda x: x > 0, "a number > 0", "A finite number > 0.")
nonnegative_float = _ranged(float, lambda x: x >= 0, "a number >= 0", "A finite number >= 0.")
fraction = _ranged(float, lambda x: 0 < x < 1, "a number between 0 and 1 (exclusive)",
                   "A number strictly between 0 and 1.")
unit_interval = _ranged(float, lambda x: 0 <= x <= 1, "a number from 0 to 1", "A number from 0 to 1 inclusive.")
probability = _ranged(float, lambda x: 0 <= x < 1, "a probability >= 0 and < 1",
                      "A probability usable for dropout: 0 <= p < 1.")


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
