"""stage-stack: build arrangements one stem at a time with STAGE experts.

The public API is what `__all__` names; everything else is reachable from its module
(stage_stack.manifest, stage_stack.mixing, ...) but may change between versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import StageStackError  # noqa: E402  (light: no torch)
from .hookspecs import hookimpl  # noqa: E402  (plugins write `@stage_stack.hookimpl`)

# Loaded on first use, so `import stage_stack` does not import torch.
_LAZY = {
    "Arranger": "arranger", "Progress": "arranger", "ProgressCallback": "arranger",
    "Layer": "layer",
    "Song": "song", "undo": "song", "history": "song", "prune": "song",
    "SamplingParams": "generation",
    "Expert": "expert", "load_expert": "expert", "relabel_expert": "expert",
    "Registry": "registry",
    "ExportOptions": "export", "export_song": "export",
}

__all__ = ["__version__", "hookimpl", "StageStackError", *_LAZY]

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports them
    from .arranger import Arranger, Progress, ProgressCallback
    from .expert import Expert, load_expert, relabel_expert
    from .export import ExportOptions, export_song
    from .generation import SamplingParams
    from .layer import Layer
    from .registry import Registry
    from .song import Song, history, prune, undo


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
