"""Datasets for the paper experiments, read from a local data root (never downloaded at run time).

The data root is ``--data-dir``, else ``$TRITIUM_DATA``, else ``../shared/data`` (relative to the current
directory) when it exists, else ``~/.cache/tritium/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOTS = (Path("../shared/data"), Path.home() / ".cache" / "tritium" / "data")


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing from the data root."""


def data_root(arg: str | os.PathLike | None = None) -> Path:
    """The data root: ``arg``, else ``$TRITIUM_DATA``, else the first existing default root."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("TRITIUM_DATA")
    if env:
        return Path(env).expanduser()
    for root in DEFAULT_ROOTS:
        if root.is_dir():
            return root
    return DEFAULT_ROOTS[-1]


def cache_dir(name: str) -> Path:
    """A writable cache folder ``$TRITIUM_CACHE/<name>`` (default ``~/.cache/tritium/<name>``)."""
    base = Path(os.environ.get("TRITIUM_CACHE", Path.home() / ".cache" / "tritium")).expanduser()
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path
