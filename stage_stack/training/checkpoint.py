"""Training checkpoints: one `torch.save` file per kept step, written atomically.

A checkpoint holds everything a run needs to continue exactly where it stopped: model,
optimizer and scheduler states, the step, the data position, the random generators and the
config it was started with. Files are `run_dir/checkpoints/step-00000300.pt`; the newest is the
one `latest_checkpoint` returns, older ones beyond `keep` are deleted after a successful save.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..atomic import atomic_path
from ..errors import StageStackError
from ..torchload import load_weights

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def rng_state() -> dict:
    """The global generators (python, numpy, torch CPU and CUDA) as torch-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write `state` for `step` (temp file + rename), then delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        faults.point("checkpoint:before-rename")
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    try:
        return load_weights(path, "a training checkpoint", map_location)
    except StageStackError as e:
        raise StageStackError(f"{e}. Move it aside to resume from the previous checkpoint.") from None


@contextmanager
def interrupts_between_steps(announce: bool):
    """Defer SIGINT to the end of the current step: yields `interrupted()`, true once a Ctrl-C came.
    A second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread (where signal
    handlers cannot be set) Ctrl-C is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        if announce:
            print("\nstopping after this step (Ctrl-C again to stop now, without a checkpoint)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)
