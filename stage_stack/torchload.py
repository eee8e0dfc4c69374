"""Reading torch.save files (checkpoints, audiocraft/MusicGen weights) without running their code.

Every `torch.load` goes through `load_weights`: `weights_only=True` always, and an error that
says why the file was refused. torch's own message for a file that holds pickled objects
advises re-running with `weights_only=False`, which would execute whatever code the file
carries; that advice is never passed on.
"""

from __future__ import annotations

import os
import pickle
import re

from .errors import StageStackError


def load_weights(path: str | os.PathLike, what: str, map_location="cpu"):
    """torch.load(path, weights_only=True); StageStackError naming `what` the file should be."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refusals, truncated zip archives, files that are not torch files
        raise StageStackError(f"{path}: cannot be read as {what} ({describe_load_error(e)})") from None


def describe_load_error(error: BaseException) -> str:
    """The reason for a failed torch.load, without torch's advice to turn weights_only off."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights only load failed" in text.lower() \
            or "weights_only" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        return ("the file holds Python objects besides tensors" + (f" ({found.group(1)})" if found else "")
                + ", that is, code that would run when it is loaded; stage-stack does not load such files. "
                "Get a weights-only or safetensors version of it from its source")
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no details'}"
