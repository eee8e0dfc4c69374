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
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .atomic import atomic_write_text
from .errors import ArrangementError
from .generation import SamplingParams
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

    @classmethod
    def of(cls, params: SamplingParams) -> "SamplingRecord":
        return cls(cfg_coef=params.cfg_coef, temperature=params.temperature, top_k=params.top_k,
                   top_p=params.top_p, greedy=params.greedy)

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
    dtype: str


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
    mix_s: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """Per-layer work that is not the LM: encode + mix + resample + decode (+ stitching)."""
        return self.resample_s + self.encode_s + self.decode_s + self.stitch_s + self.mix_s


class LayerRecord(_Model):
    name: str
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
    files: list[str]  # candidate files, relative to the arrangement
    conditioned_on: dict[str, str]  # {earlier layer: "take.picked"} at generation time
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
        """What later layers heard of this one: its take and picked candidate."""
        return f"{self.take}.{self.picked}"


class ContextRecord(_Model):
    source: str  # the path it was read from, or "<array>"
    sha256: str  # of the source file's bytes (or the array's samples)
    sample_rate: int  # of the source
    channels: int  # of the source, before the downmix to mono
    seconds: float
    file: str = "context.wav"  # the mono copy at the song's rate inside the arrangement


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
    action: str  # "arrange", "add", "pick", "redo", "remove", "mix"
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
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256 of its samples
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

    def state_before(self, index: int) -> dict[str, str]:
        """What a layer at `index` hears: the context and the earlier layers' take and pick."""
        state = {layer.name: layer.state for layer in self.layers[:index]}
        if self.context is not None:
            state["<context>"] = self.context.sha256
        return state

    def stale_layers(self) -> list[str]:
        """Layers generated against earlier layers that were since picked, redone or removed."""
        return [layer.name for i, layer in enumerate(self.layers) if layer.conditioned_on != self.state_before(i)]

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



