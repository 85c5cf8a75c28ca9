"""Helpers shared by the test files (tests/ is on sys.path under pytest)."""

import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: raise TimeoutError if the block runs longer than ``seconds``."""

    def boom(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
