"""What a studio request may carry (pydantic): every field bounded, every name a plain file name.

The bounds are the library's own (stage_stack.inputs, arranger.Layer), so a request the studio
accepts is one the Arranger accepts; the Arranger's checks still run and their messages are
what the page shows.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..inputs import BPM_RANGE, MAX_AUDIO_SECONDS, MAX_CANDIDATES
from ..layer import BeatSource, ChordSource
from ..mixing import CLICK_MODES

# Song and layer names become directory and file names: no separators, no leading dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
ClickChoice = Literal[CLICK_MODES]  # type: ignore[valid-type]
Seed = Annotated[int, Field(ge=0, lt=2**31)]
Gain = Annotated[float, Field(ge=-60.0, le=24.0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewSong(_Request):
    """Start a song from a click."""

    name: Name
    bpm: Annotated[float, Field(ge=BPM_RANGE[0], le=BPM_RANGE[1])] = 120.0
    duration: Annotated[float, Field(gt=0, le=MAX_AUDIO_SECONDS)] = 10.0
    seed: Seed = 0
    click: ClickChoice | None = None


class Sampling(_Request):
    """A layer that gives none of these generates with its expert's own sampling
    (ExpertMetadata.sampling, else the reference's); one that gives some takes the reference's
    for the rest, as `stage-stack add --temperature ...` does."""

    temperature: Annotated[float, Field(gt=0, le=10)] | None = None
    top_k: Annotated[int, Field(ge=0, le=4096)] | None = None
    cfg: Annotated[float, Field(ge=0, le=20)] | None = None


class NewLayer(_Request):
    """Add a layer at the end of the song."""

    instrument: Name
    name: Name | None = None
    candidates: Annotated[int, Field(ge=1, le=MAX_CANDIDATES)] = 1
    seed: Seed | None = None
    prompt: Annotated[str, StringConstraints(max_length=500)] | None = None
    click: ClickChoice | None = None
    gain_db: Gain | None = None
    sampling: Sampling = Sampling()
    # the earlier layers it hears (None: what its expert was trained to hear, else all of them)
    hears: Annotated[list[Name], Field(max_length=64)] | None = None
    # an expert with a chord stream: its chords heard in what it hears, or its own (None: the default)
    chords: ChordSource | None = None
    # a click on the beats heard in the mix instead of the mix, or the mix (None: the default)
    beats: BeatSource | None = None


class Redo(_Request):
    seed: Seed | None = None
    prompt: Annotated[str, StringConstraints(max_length=500)] | None = None
    downstream: bool = False


class Pick(_Request):
    candidate: Annotated[int, Field(ge=0, lt=MAX_CANDIDATES)]


class Remix(_Request):
    gains: dict[Name, Gain]
