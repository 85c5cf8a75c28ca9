"""`tritium.atomic`: complete content or the old content, no temporary files left, umask-honouring modes."""

import os
import stat
import threading

import pytest

from tritium import atomic


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o077)``), restoring the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_bytes_text_and_with(tmp_path):
    atomic.write_bytes(tmp_path / "a", b"x" * 100)
    assert (tmp_path / "a").read_bytes() == b"x" * 100
    atomic.write_bytes(tmp_path / "a", memoryview(bytearray(b"short")))
    assert (tmp_path / "a").read_bytes() == b"short"
    atomic.write_text(tmp_path / "t", "h\u00e9llo\n")
    assert (tmp_path / "t").read_text(encoding="utf-8") == "h\u00e9llo\n"
    atomic.write_with(tmp_path / "w", lambda p: p.write_text("via path"))
    assert (tmp_path / "w").read_text() == "via path"
    assert sorted(os.listdir(tmp_path)) == ["a", "t", "w"]


def test_large_write_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_CHUNK", 7)
    data = bytes(range(256)) * 3
    atomic.write_bytes(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


@pytest.mark.parametrize("existing", [False, True])
def test_writer_failure_keeps_old_content(tmp_path, existing):
    path = tmp_path / "f"
    if existing:
        path.write_bytes(b"old")

    def writer(p):
        p.write_bytes(b"partial new content")
        raise KeyboardInterrupt  # even an interrupt leaves no trace

    with pytest.raises(KeyboardInterrupt):
        atomic.write_with(path, writer)
    assert os.listdir(tmp_path) == (["f"] if existing else [])
    if existing:
        assert path.read_bytes() == b"old"


def test_failing_sync_or_rename_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync"):
        atomic.write_bytes(path, b"new")
    monkeypatch.undo()
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename"):
        atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_missing_folder_and_folder_target(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic.write_bytes(tmp_path / "no" / "such", b"x")
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "d", b"x")
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert atomic.umask() == mask
    atomic.write_bytes(tmp_path / "b", b"x")
    atomic.write_text(tmp_path / "t", "x")
    atomic.write_with(tmp_path / "w", lambda p: p.write_bytes(b"x"))
    atomic.append_line(tmp_path / "log", b"x\n")
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "plain") == mode
    for name in ("b", "t", "w", "log"):
        assert _mode(tmp_path / name) == mode, name


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    path.chmod(0o600)
    atomic.write_bytes(path, b"new")
    assert _mode(path) == 0o600 and path.read_bytes() == b"new"
    path.chmod(0o664)
    atomic.write_text(path, "newer")
    assert _mode(path) == 0o664


def test_append_line(tmp_path):
    path = tmp_path / "log.jsonl"
    atomic.append_line(path, b'{"a": 1}\n')
    atomic.append_line(path, b'{"a": 2}\n')
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    with pytest.raises(ValueError, match="newline"):
        atomic.append_line(path, b"no newline")
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = tmp_path / "log"
    lines = [[(f"{t}-{i}-" + "x" * 3000 + "\n").encode() for i in range(20)] for t in range(4)]

    def worker(own):
        for line in own:
            atomic.append_line(path, line)

    threads = [threading.Thread(target=worker, args=(own,)) for own in lines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = path.read_bytes().splitlines(keepends=True)
    assert sorted(got) == sorted(line for own in lines for line in own)


def test_concurrent_writers_leave_one_complete_version(tmp_path):
    path = tmp_path / "f"
    versions = [bytes([v]) * 200_000 for v in range(6)]
    threads = [threading.Thread(target=atomic.write_bytes, args=(path, v)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in versions
    assert os.listdir(tmp_path) == ["f"]
