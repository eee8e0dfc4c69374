"""`Layer`: one layer of an arrangement as the user asks for it (the API's dataclass).

Its fields are the single list both the API and the manifest use: `manifest.LayerSpec` (what
`arrange` was asked for, recorded so that the same call resumes) is built from them, with
`params` (a SamplingParams) recorded as `sampling` (a manifest.SamplingRecord).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Literal, get_args

import numpy as np

from .errors import InputError
from .generation import SamplingParams
from .inputs import MAX_CANDIDATES
from .mixing import CLICK_MODES, ClickMode

LAYER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # layer names become file names
# Where an expert's chord stream takes its chords from: what the layer hears, or its own naming.
ChordSource = Literal["heard", "own"]
CHORD_SOURCES: tuple[str, ...] = get_args(ChordSource)
# What gives a layer its beat: a click on the beats heard in its mix, or the mix itself.
BeatSource = Literal["heard", "own"]
BEAT_SOURCES: tuple[str, ...] = get_args(BeatSource)
RECORDED_AS = {"params": "sampling"}  # Layer field -> its LayerSpec field, where the two differ


def source_problem(name: str, value, choices: tuple[str, ...]) -> str | None:
    """What is wrong with a `chords` / `beats` setting (None when it is one of `choices` or None)."""
    if value is None or value in choices:
        return None
    return f"{name} must be one of {', '.join(choices)} (or None for the default), got {value!r}"


@dataclass(frozen=True)
class Layer:
    """One layer of an arrangement. Every field but `instrument` has a default.

    instrument  the instrument (its expert plays the layer)
    name        the layer's name, needed when an instrument is used twice (default: instrument)
    prompt      text prompt for text-conditioned experts (default: the instrument's default prompt)
    seed        sampling seed (default: the song's seed + the layer's position)
    gain_db     mix gain in dB (default: the instrument's registry default, else 0)
    candidates  variations generated in one batch; all are kept, `pick` is the one used
    click       "none", "mix+click" or "click" (default: the song's click mode)
    params      sampling parameters (default: its expert's `sampling`, else SamplingParams(), the reference's)
    pick        which candidate the next layers hear (default: the first)
    hears       the earlier layers this one hears, by name (default: what its expert was
                trained to hear, `ExpertMetadata.hears`, else all of them); the song's own
                context audio is always heard
    chords      for an expert with a chord stream: "heard" gives it the chords heard in what
                it hears (stage_stack.chord_recognition), "own" lets it name its own (default:
                "heard" when the layer hears pitched material, the song's context audio or a
                layer of a pitched instrument, else "own")
    beats       for a layer that would hear the mix alone: "heard" makes it hear a click on the
                beats heard in that mix instead (stage_stack.beat_tracking), "own" the mix
                (default: "heard" for an instrument the registry marks unpitched, the drums,
                over pitched material, else "own")
    """

    instrument: str
    name: str | None = None
    prompt: str | None = None
    seed: int | None = None
    gain_db: float | None = None
    candidates: int = 1
    click: ClickMode | None = None
    params: SamplingParams | None = None
    pick: int = 0
    hears: tuple[str, ...] | None = None
    chords: ChordSource | None = None
    beats: BeatSource | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.instrument, str) or not self.instrument:
            raise InputError(f"Layer.instrument must be an instrument name, got {self.instrument!r}")
        if self.name is not None and not LAYER_NAME.match(self.name):
            raise InputError(f"layer name {self.name!r} is not usable as a file name; use letters, digits, "
                             "'_', '-' or '.' (up to 64 characters, starting with a letter or digit)")
        if self.name is None and not LAYER_NAME.match(self.instrument):
            raise InputError(f"instrument {self.instrument!r} needs a layer name usable as a file name: "
                             f"Layer({self.instrument!r}, name='...')")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or \
                not 1 <= self.candidates <= MAX_CANDIDATES:
            raise InputError(f"layer {self.key!r}: candidates must be an integer from 1 to {MAX_CANDIDATES}, "
                             f"got {self.candidates!r}")
        if not isinstance(self.pick, int) or not 0 <= self.pick < self.candidates:
            raise InputError(f"layer {self.key!r}: pick {self.pick!r} is not one of its {self.candidates} "
                             f"candidate(s) (numbered from 0)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"layer {self.key!r}: seed must be a non-negative integer, got {self.seed!r}")
        if self.gain_db is not None and not (np.isfinite(self.gain_db) and -60.0 <= self.gain_db <= 24.0):
            raise InputError(f"layer {self.key!r}: gain_db must be from -60 to +24 dB, got {self.gain_db!r}")
        if self.hears is not None:
            if isinstance(self.hears, str) or not all(isinstance(n, str) and LAYER_NAME.match(n) for n in self.hears):
                raise InputError(f"layer {self.key!r}: hears must be a list of layer names, got {self.hears!r}")
            if self.key in self.hears:
                raise InputError(f"layer {self.key!r}: hears names the layer itself; name earlier layers only")
            object.__setattr__(self, "hears", tuple(self.hears))
        if self.click is not None and self.click not in CLICK_MODES:
            raise InputError(f"layer {self.key!r}: click must be one of {', '.join(CLICK_MODES)}, got {self.click!r}")
        for name, choices in (("beats", BEAT_SOURCES), ("chords", CHORD_SOURCES)):
            problem = source_problem(name, getattr(self, name), choices)
            if problem:
                raise InputError(f"layer {self.key!r}: {problem}")

    @property
    def key(self) -> str:
        """The layer's name: `name`, else the instrument."""
        return self.name or self.instrument

    def spec(self):
        """This layer as a manifest.LayerSpec (field for field)."""
        from .manifest import LayerSpec, SamplingRecord

        values = {RECORDED_AS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        if values["sampling"] is not None:
            values["sampling"] = SamplingRecord.of(values["sampling"])
        return LayerSpec(**values)
