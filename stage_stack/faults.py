"""Fault injection for the reliability tests: kill this process -9 at a named point.

`STAGE_STACK_KILL_AT=commit:manifest` (say) makes the process SIGKILL itself when it reaches
that point, so tests/test_reliability.py can check what a crash at each phase of a layer
commit, an install or a training step leaves behind. Unset (always, outside those tests) a
point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "STAGE_STACK_KILL_AT"


def point(name: str) -> None:
    """A place where a crash must leave nothing lost; dies here when STAGE_STACK_KILL_AT names it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
