"""stage-stack: build arrangements one stem at a time with STAGE experts."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (plugins write `@stage_stack.hookimpl`)

_LAZY = {"Arranger": "arranger", "Layer": "layer", "Song": "song",
         "undo": "song", "history": "song", "prune": "song"}  # torch loads on first use, not on import


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
