"""Atomic file writes and durable appends: every file tritium writes goes through here.

A write either leaves ``path`` as it was (absent or unchanged) or replaces it with the complete new
content: the data goes to a temporary file in the same folder, which is flushed, synced, given the mode
a plain ``open`` would give (0666 less the umask) and renamed over ``path``; the folder is synced too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

PathLike = str | os.PathLike

_CHUNK = 1 << 24


def umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside folder ``path`` durable (no-op where folders cannot be opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: PathLike, write: Callable[[Path], object]) -> None:
    """Atomically create or replace ``path`` with what ``write(tmp_path)`` writes to a temporary path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> None:
    """Atomically create or replace ``path`` with ``data``."""

    def _write(tmp: Path) -> None:
        view = memoryview(data).cast("B")
        with open(tmp, "wb") as f:
            for i in range(0, len(view), _CHUNK):
                f.write(view[i: i + _CHUNK])

    write_with(path, _write)


def write_text(path: PathLike, text: str) -> None:
    """Atomically create or replace ``path`` with ``text`` encoded as UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def append_line(path: PathLike, line: bytes) -> None:
    """Append ``line`` (newline-terminated) with a single write, flushed and synced."""
    if not line.endswith(b"\n"):
        raise ValueError("append_line: the line must end with a newline")
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
