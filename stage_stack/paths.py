"""Where stage-stack keeps installed experts and shared codecs.

STAGE_STACK_HOME wins; otherwise $XDG_CACHE_HOME/stage-stack (default ~/.cache/stage-stack).
Nothing is created on import; callers create what they write into.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    if os.environ.get("STAGE_STACK_HOME"):
        return Path(os.environ["STAGE_STACK_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "stage-stack"


def experts_dir() -> Path:
    return home() / "experts"


def codec_dir() -> Path:
    return home() / "codecs"


def text_encoder_dir() -> Path:
    return home() / "text_encoders"
