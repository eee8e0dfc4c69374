"""Fault injection for the reliability tests: kill this process -9 at a named point.

`STAGE_STACK_KILL_AT=commit:after-manifest` (say; `train:stepped@6` for the 6th time) makes the process SIGKILL itself when it reaches
that point, so tests/test_reliability.py can check what a crash at each phase of a layer
commit, an install or a training step leaves behind. Unset (always, outside those tests) a
point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "STAGE_STACK_KILL_AT"


_reached: dict[str, int] = {}


def point(name: str) -> None:
    """A place where a crash must leave nothing lost; dies here when STAGE_STACK_KILL_AT names it
    (`NAME`: the first time it is reached; `NAME@N`: the N-th time)."""
    wanted = os.environ.get(ENV)
    if not wanted or not wanted.startswith(name):
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
