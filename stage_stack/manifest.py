"""manifest.json: everything needed to reproduce an arrangement, versioned.

An arrangement directory holds this file plus its audio (see stage_stack.arrangement). The
manifest records, per layer, the expert (id and sha256), the prompt, seed, sampling parameters,
candidates and the picked one, gain, click mode, window plan and timings; and for the song the
sample rate, duration, BPM, context (sha256), registry source, limiter settings and the library
version. `files` maps every audio file of the arrangement to the sha256 of its samples, which is
how a reopened arrangement tells a finished write from an interrupted one, and how two
arrangements are compared.

Version history: 1 (this one).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .atomic import atomic_write_text
from .confined import RelativePath
from .errors import ArrangementError
from .generation import SamplingParams
from .layer import BeatSource, ChordSource
from .longform import WindowPlan
from .mixing import ClickMode, LimiterSettings

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingRecord(_Model):
    cfg_coef: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    greedy: bool = False
    chord_temperature: float | None = None  # an expert with a chord stream; None: `temperature`

    @classmethod
    def of(cls, params: SamplingParams) -> "SamplingRecord":
        return cls(cfg_coef=params.cfg_coef, temperature=params.temperature, top_k=params.top_k,
                   top_p=params.top_p, greedy=params.greedy, chord_temperature=params.chord_temperature)

    def params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class LimiterRecord(_Model):
    ceiling_dbtp: float = -1.0
    lookahead_ms: float = 5.0
    release_ms: float = 80.0
    oversample: int = 4
    block_ms: float = 1.0

    @classmethod
    def of(cls, settings: LimiterSettings) -> "LimiterRecord":
        return cls(**settings.__dict__)

    def settings(self) -> LimiterSettings:
        return LimiterSettings(**self.model_dump())


class ExpertRecord(_Model):
    """Which expert played a layer."""

    instrument: str
    source: str  # the expert file (absolute path), or "<in memory>"
    sha256: str | None  # None only for experts handed over in memory
    origin: str = "explicit"  # "explicit" (Arranger(experts=...)) or the registry's origin ("installed", ...)
    sample_rate: int
    frame_rate: int
    device: str
    dtype: str  # the LM's floating-point dtype
    weight_format: str | None = None  # the LM's WeightFormat (fp32, bf16, fp16, int8, int4); None in older manifests


def _layer_spec_fields() -> dict:
    """LayerSpec's fields: Layer's, in order, with its type and default (one list for both)."""
    import dataclasses
    import typing

    from .layer import RECORDED_AS, Layer

    hints = typing.get_type_hints(Layer)
    hints["params"] = SamplingRecord | None  # recorded as a pydantic model, not the dataclass
    return {RECORDED_AS.get(f.name, f.name): (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(Layer)}


LayerSpec = create_model("LayerSpec", __base__=_Model, __module__=__name__, **_layer_spec_fields())
LayerSpec.__doc__ = "A layer as requested (the fields of `stage_stack.Layer`); None = the default."


class LayerTimings(_Model):
    """Seconds per stage; `mix_s` is rendering the conditioning audio and the mix."""

    resample_s: float = 0.0
    encode_s: float = 0.0
    generate_s: float = 0.0
    decode_s: float = 0.0
    stitch_s: float = 0.0
    chords_s: float = 0.0  # hearing the context's chords (Layer.chords "heard")
    beats_s: float = 0.0  # hearing the mix's beats (Layer.beats "heard")
    mix_s: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """Per-layer work that is not the LM: encode + mix + resample + decode (+ stitching, hearing
        chords and beats)."""
        return (self.resample_s + self.encode_s + self.decode_s + self.stitch_s + self.chords_s + self.beats_s
                + self.mix_s)


def _check_layer_name(value: str) -> str:
    from .layer import LAYER_NAME

    if not LAYER_NAME.match(value):
        raise ValueError(f"{value!r} is not a layer name (letters, digits, '_', '-', '.'; it names files)")
    return value


def _check_digest(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{value!r} is not a sha256 (64 lowercase hex digits)")
    return value


LayerName = Annotated[str, AfterValidator(_check_layer_name)]
Digest = Annotated[str, AfterValidator(_check_digest)]


def parse_state(state: str) -> tuple[int, int, float | None]:
    """(take, picked, gain_db) from a `LayerRecord.state`; gain None in states written before
    gains were recorded ("2.1")."""
    head, _, gain = state.partition(" ")
    take, _, picked = head.partition(".")
    return int(take), int(picked), float(gain.removesuffix(" dB")) if gain else None


def same_state(recorded: str, now: str) -> bool:
    """Whether a layer heard `now`'s state of an earlier layer (older manifests lack the gain)."""
    if recorded == now:
        return True
    try:
        (t1, p1, g1), (t2, p2, g2) = parse_state(recorded), parse_state(now)
    except ValueError:
        return False
    return (t1, p1) == (t2, p2) and (g1 is None or g1 == g2)


class LayerRecord(_Model):
    name: LayerName
    instrument: str
    expert: ExpertRecord
    prompt: str | None = None  # the text the expert was given (None: no text)
    prompt_source: Literal["user", "default", "none"] = "none"
    seed: int
    sampling: SamplingRecord
    candidates: int = Field(ge=1)
    picked: int = Field(ge=0)
    gain_db: float
    click: ClickMode  # what this layer heard (the first layer of a song without context always hears the click)
    click_requested: ClickMode | None = None  # the layer's own setting, None = the song's
    take: int = Field(ge=1)  # 1, then +1 per redo
    files: list[RelativePath]  # candidate files, relative to the arrangement
    conditioned_on: dict[str, str]  # {earlier layer: "take.picked gain dB"} at generation time
    hears: list[LayerName] | None = None  # the earlier layers it heard (None: all of them)
    hears_requested: list[LayerName] | None = None  # the layer's own setting, None = its expert's default
    chords: ChordSource | None = None  # where its chord stream's chords came from (None: it has none)
    chords_requested: ChordSource | None = None  # the layer's own setting, None = the default
    beats: BeatSource | None = None  # "heard": it heard a click on the beats heard in its mix (None: older)
    beats_requested: BeatSource | None = None  # the layer's own setting, None = the default
    heard_bpm: float | None = None  # the tempo of the beats it heard (beats "heard")
    window_plan: WindowPlan
    timings: LayerTimings
    created: dt.datetime

    @field_validator("picked")
    @classmethod
    def _picked_in_range(cls, v: int, info) -> int:
        n = info.data.get("candidates")
        if n is not None and v >= n:
            raise ValueError(f"picked candidate {v} does not exist (the layer has {n}, numbered from 0)")
        return v

    @property
    def state(self) -> str:
        """What later layers heard of this one: its take, picked candidate and gain ("2.1 -3 dB")."""
        return f"{self.take}.{self.picked} {self.gain_db:+g} dB"


class ContextRecord(_Model):
    source: str  # the path it was read from, or "<array>"
    sha256: str  # of the source file's bytes (or the array's samples)
    sample_rate: int  # of the source
    channels: int  # of the source, before the downmix to mono
    seconds: float
    file: RelativePath = "context.wav"  # the mono copy at the song's rate inside the arrangement


class RegistryRecord(_Model):
    layers: list[str]  # registry config files, lowest first ("overrides" for API arguments)


class ArrangeRequest(_Model):
    """What `arrange` was asked for; running it again with the same request resumes."""

    layers: list[LayerSpec]
    context_sha256: str | None
    bpm: float | None
    duration: float | None
    seed: int
    click: ClickMode | None
    sample_rate: int | None


class HistoryEntry(_Model):
    time: dt.datetime
    action: str  # "arrange", "add", "pick", "redo", "remove", "mix", "undo", "prune"
    detail: str = ""


class Manifest(_Model):
    manifest_version: int = MANIFEST_VERSION
    library_version: str
    arrangement_id: str
    created: dt.datetime
    updated: dt.datetime
    sample_rate: int
    duration: float
    samples: int
    bpm: float | None
    bpm_source: Literal["given", "default"] | None
    click: ClickMode  # the song's click mode (a layer may override it)
    seed: int
    context: ContextRecord | None = None
    registry: RegistryRecord | None = None
    limiter: LimiterRecord = Field(default_factory=LimiterRecord)
    click_gain_db: float = -6.0
    request: ArrangeRequest | None = None
    layers: list[LayerRecord] = Field(default_factory=list)
    files: dict[RelativePath, Digest] = Field(default_factory=dict)  # relative path -> sha256 of its samples
    revision: int = Field(0, ge=0)  # +1 per commit; a writer refuses to commit over a revision it did not read
    previous_revision: int | None = None  # the state `undo` restores (history/revision-N.json)
    history: list[HistoryEntry] = Field(default_factory=list)

    @field_validator("manifest_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != MANIFEST_VERSION:
            raise ValueError(f"manifest version {v} is not supported; this stage-stack reads version "
                             f"{MANIFEST_VERSION}. Upgrade stage-stack")
        return v

    # -- layers ---------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise ArrangementError(f"the arrangement has no layer {name!r}; its layers are: "
                               f"{', '.join(self.layer_names) or 'none'}")

    def layer(self, name: str) -> LayerRecord:
        return self.layers[self.index(name)]

    def state_before(self, index: int, heard: dict[str, str] | None = None,
                     hears: Sequence[str] | None = None) -> dict[str, str]:
        """What a layer at `index` hears: the context and the earlier layers' take, pick and gain
        (`heard`: the states a reproduction used instead, where they are of the same take;
        `hears`: only these earlier layers)."""
        state = {}
        for layer in self.layers[:index]:
            if hears is not None and layer.name not in hears:
                continue
            state[layer.name] = layer.state
            if heard and layer.name in heard:
                take, picked, gain = parse_state(heard[layer.name])
                if take == layer.take and picked < layer.candidates:
                    state[layer.name] = heard[layer.name] if gain is not None else \
                        f"{take}.{picked} {layer.gain_db:+g} dB"
        if self.context is not None:
            state["<context>"] = self.context.sha256
        return state

    def stale_layers(self) -> list[str]:
        """Layers generated against earlier layers that were since picked, redone, removed or re-gained."""
        out = []
        for i, layer in enumerate(self.layers):
            now = self.state_before(i, hears=layer.hears)
            heard = layer.conditioned_on
            if set(heard) != set(now) or not all(same_state(heard[k], now[k]) for k in now if k != "<context>") \
                    or heard.get("<context>") != now.get("<context>"):
                out.append(layer.name)
        return out

    def log(self, action: str, detail: str = "") -> None:
        self.updated = now()
        self.history.append(HistoryEntry(time=self.updated, action=action, detail=detail))

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArrangementError(f"{path}: no such file; an arrangement directory holds a {MANIFEST_NAME}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArrangementError(f"{path}: not a readable JSON manifest ({e})") from None
        if isinstance(data, dict) and "arrangement_id" not in data:
            raise ArrangementError(f"{path}: not a stage-stack arrangement manifest (no 'arrangement_id' field)")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            fields = "\n".join(f"  field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
                               for err in e.errors())
            raise ArrangementError(f"{path}: invalid arrangement manifest:\n{fields}") from None



