"""A studio over the tiny test experts (tests/arranger_helpers.py), for the API and browser tests."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the studio extra is not installed: pip install -e '.[studio]'")

from stage_stack import Arranger  # noqa: E402
from stage_stack.studio.app import create_app  # noqa: E402
from stage_stack.studio.session import Studio  # noqa: E402


def make_studio(band, songs_dir, **kwargs) -> Studio:
    return Studio(songs_dir, Arranger(band), **kwargs)


def make_app(band, songs_dir, token=None, **kwargs):
    studio = make_studio(band, songs_dir, **kwargs)
    return studio, create_app(studio, token=token)
