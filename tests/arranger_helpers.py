"""Fixtures shared by the Arranger tests: tiny random experts (one fast codec, 1 s windows)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from stage_stack import arranger as arranger_module
from stage_stack.cli import arrange as _arrange_commands  # noqa: F401  (registers the commands on `cli`)
from stage_stack.cli import cli
from stage_stack.cli import registry as _registry_commands  # noqa: F401
from stage_stack.testing import TINY_CODEC, make_tiny_expert

# The tiny codec at 25 frames/s (hop 640) and 1 s windows keep every test to a few hundred steps.
FAST_CODEC = replace(TINY_CODEC, ratios=(8, 5, 4, 4))
SHORT_WINDOW = {"max_context_seconds": 1.0, "max_target_seconds": 1.0}
SR = FAST_CODEC.sample_rate
INSTRUMENTS = ("drums", "bass", "keys")


def make_band(folder, training=SHORT_WINDOW, instruments=INSTRUMENTS) -> dict:
    return {name: make_tiny_expert(folder / f"{name}.safetensors", instrument=name, seed=i, codec_config=FAST_CODEC,
                                   training=training)
            for i, name in enumerate(instruments)}


@pytest.fixture(scope="module")
def band(tmp_path_factory):
    """{instrument: expert file} for drums, bass and keys (made once per test session, read-only)."""
    folder = tmp_path_factory.getbasetemp() / "arranger-band"
    if not folder.is_dir():
        folder.mkdir()
        return make_band(folder)
    return {name: folder / f"{name}.safetensors" for name in INSTRUMENTS}


@pytest.fixture
def heard(monkeypatch):
    """Records what each layer's expert was given (the conditioning audio and settings)."""
    calls = []
    real = arranger_module.render_stem

    def spy(expert, context_audio, sample_rate, duration, **kwargs):
        calls.append(dict(instrument=expert.instrument, context=np.array(context_audio), sample_rate=sample_rate,
                          duration=duration, **kwargs))
        return real(expert, context_audio, sample_rate, duration, **kwargs)

    monkeypatch.setattr(arranger_module, "render_stem", spy)
    return calls


def run(*args, ok: bool = True):
    """`stage-stack ARGS...` in-process; with `ok`, fail the test unless it exits 0."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def experts(band, *names):
    """`--expert NAME=FILE` flags for these instruments of a `band`."""
    return [arg for name in names for arg in ("--expert", f"{name}={band[name]}")]
