"""Exclusive locks between processes: one writer at a time per song, and per installed.json.

A lock is `flock` on a small file that holds the pid of the process holding it, so the second
writer can say who is in the way. The kernel drops the lock when its holder dies (kill -9
included), so a crash never leaves a song locked. The lock file is never deleted: unlinking
a lock file while another process waits on it would give two holders.

Locks are re-entrant within a process (the CLI holds a song's lock for a whole command, and
the library methods it calls take it again).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import StageStackError


class LockBusyError(StageStackError):
    """Another process holds the lock (and the caller asked not to wait)."""

    def __init__(self, what: str, pid: int | None, how_to_wait: str) -> None:
        self.pid = pid
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"{what} is being changed by {who}; wait for it to finish, or {how_to_wait}")


_held: dict[str, list] = {}  # realpath -> [fd, depth]
_guard = threading.Lock()


def holder(lock_file: str | os.PathLike) -> int | None:
    """The pid written in a lock file (the last holder; it may have exited)."""
    try:
        text = Path(lock_file).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, wait: bool | float = False,
              how_to_wait: str = "pass --wait to queue behind it") -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if needed) for the `with` block.

    wait  False: fail at once with LockBusyError ("WHAT is being changed by process N");
          True: block until the lock is free; a number: wait up to that many seconds.
    """
    key = os.path.realpath(lock_file)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key][1] -= 1
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, key, what, wait, how_to_wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    with _guard:
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            _held[key][1] -= 1
            done = _held[key][1] == 0
            if done:
                del _held[key]
        if done:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _acquire(fd: int, key: str, what: str, wait: bool | float, how_to_wait: str) -> None:
    if wait is True:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + (0.0 if wait is False else float(wait))
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockBusyError(what, holder(key), how_to_wait) from None
            time.sleep(0.05)


def is_held(lock_file: str | os.PathLike) -> bool:
    """Whether this process holds the lock."""
    return os.path.realpath(lock_file) in _held
