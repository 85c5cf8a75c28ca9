"""Atomic file writes and durable appends: every file tritium writes goes through here.

A write either leaves ``path`` as it was (absent or unchanged) or replaces it with the complete new
content: the data goes to a temporary file in the same folder, which is synced, given its mode and
renamed over ``path``; the folder is synced too. No temporary file is left behind, also when the writer
raises. The mode is the one a plain ``open(path, "w")`` gives: an existing file keeps its permission
bits, a new one gets 0666 less the process umask (0644 under umask 022, 0600 under 077).
"""

from __future__ import annotations

import os
import stat
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
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def new_file_mode(path: PathLike) -> int:
    """The permission bits ``open(path, "w")`` leaves ``path`` with: its own if it is an existing regular
    file, else 0666 less the umask."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode) & 0o777
    except (OSError, ValueError):
        pass
    return 0o666 & ~umask()


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
    """Atomically create or replace ``path`` with what ``write(tmp_path)`` writes to a temporary path.

    ``write`` must have closed (flushed) the file when it returns; if it raises, ``path`` is unchanged.
    """
    path = Path(path)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            else:  # pragma: no cover - platforms without fchmod
                os.chmod(tmp_path, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
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
    """Append ``line`` (newline-terminated) to ``path`` (created with mode 0666 less the umask if absent)
    with one ``O_APPEND`` write, then sync it."""
    if not line.endswith(b"\n"):
        raise ValueError("append_line: the line must end with a newline")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(line)
        while view:  # a regular file takes the whole line at once; loop in case it does not
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
