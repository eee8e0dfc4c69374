"""Atomic file writes: a temp file beside the target, renamed over it only when complete.

Readers (and a crash or Ctrl-C half-way) see the old file or the new one, never half of one.
Every writer of user-visible files (experts, manifests, checkpoints, caches, arrangement audio)
goes through here.

Temp names carry a marker and the writer's pid (`.NAME.stage-stack-PID-RANDOM.tmp`), so they
cannot collide with a file a user made (`.draft.tmp` is not ours), and cleanup removes only
temp files of writers that are gone (`stale_temp`).
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_MARK = "stage-stack"
_TEMP = re.compile(rf"^\..+\.{TEMP_MARK}-(\d+)-[0-9a-z_]+\.tmp(\.[A-Za-z0-9]+)?$")


def temp_path(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A unique temp name beside `path` (not created): `.NAME.stage-stack-PID-RANDOM` + suffix."""
    path = Path(path)
    return path.parent / f".{path.name}.{TEMP_MARK}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


def temp_owner(name: str) -> int | None:
    """The pid in one of our temp names, else None (the file is not a stage-stack temp file)."""
    match = _TEMP.match(name)
    return int(match.group(1)) if match else None


def stale_temp(name: str) -> bool:
    """Whether `name` is a stage-stack temp file whose writer has exited (or is this process)."""
    pid = temp_owner(name)
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path in `path`'s directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_MARK}-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and some writers (safetensors' save_file) replace the file we
        # made: set the mode of what is there now, so the result is an ordinary file.
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) atomically, fsynced before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
