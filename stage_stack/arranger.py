"""The Arranger: build a song one stem at a time, each expert hearing the mix so far.

    from stage_stack import Arranger, Layer
    arranger = Arranger(experts={"drums": "drums.safetensors", "bass": "bass.safetensors"})
    song = arranger.arrange(["drums", Layer("bass", candidates=3)], context=None, bpm=120, duration=20.0)
    song.stems["bass"], song.mix, song.sample_rate
    song.save("out/")

    song = Song.open("out/")                      # a session: each change is written atomically
    arranger.add(song, Layer("keys", prompt="warm electric piano"))
    song.pick("bass", 2)                          # the mix follows; later layers are marked stale
    arranger.redo(song, "keys", seed=7)           # downstream=True also regenerates the layers after it
    song.remove("keys"); song.remix({"bass": -3.0})

Per layer (`Arranger._render_layer`):
    1. the current mix = input context + the picked stems of the earlier layers (stage_stack.mixing);
    2. what the expert hears: the mix, the mix plus a click, or the click alone (`click` mode);
       the first layer of a song without context always hears the click (at `bpm`, else 120);
    3. resample to the expert's rate, generate (in windows when longer than the expert's window),
       decode (stage_stack.pipeline), resample back to the song's rate;
    4. the new stem joins the mix, with its gain and the limiter, before the next layer runs.

An arrangement on disk (`Arrangement`) is a directory:

    manifest.json                      what was done and how to redo it (stage_stack.manifest)
    mix.wav                            the limited mix (never includes the click)
    context.wav                        the input mix, mono at the song's rate (when one was given)
    stems/<layer>.wav                  each layer's picked candidate
    candidates/<layer>/take<T>-<i>.wav every candidate of the current take of each layer

Audio is 32-bit float WAV, so a reopened arrangement continues from exactly what was written.
`manifest.files` records the sha256 of each file's samples (`audio_digest`), not of its bytes:
libsndfile stamps float WAVs with the time of writing, and two identical songs must compare equal.
Writes are atomic at the layer level: every file is written under a temporary name, then the
manifest is replaced (the commit point), then the files are renamed into place, then the files
the old manifest had and the new one does not are deleted. A crash or Ctrl-C before the commit
point leaves the arrangement as it was; one after it is finished when the arrangement is opened
again (temporary files whose samples the manifest expects are renamed, derived files that are
still missing are rendered again, other temporary files are deleted). Running the same
`arrange` again resumes with the layers that are missing. Files the arrangement did not write
are never touched.
"""

from __future__ import annotations

import os
import re
import secrets
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import __version__
from .audio import resample, write_audio
from .errors import ArrangementError, InputError, IntegrityError
from .expert import Expert, load_expert, read_metadata, sha256_file
from .generation import SamplingParams
from .inputs import (DEFAULT_BPM, MAX_CANDIDATES, ContextAudio, check_bpm, check_duration, check_layers,
                     load_context)
from .manifest import (MANIFEST_NAME, ArrangeRequest, ContextRecord, ExpertRecord, LayerRecord, LayerSpec,
                       LayerTimings, LimiterRecord, Manifest, RegistryRecord, SamplingRecord, now)
from .mixing import (CLICK_GAIN_DB, CLICK_MODES, ClickMode, LimiterSettings, conditioning_audio, fit_length,
                     metronome, render_mix)
from .pipeline import render_stem, window_plan_for
from .placement import (DeviceInventory, DeviceMap, ExpertPool, check_device_map, expert_nbytes, parse_max_memory,
                        plan_placement)

DEFAULT_DURATION = 10.0  # seconds, when neither a duration nor a context is given
LAYER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # layer names become file names


# -- what the user asks for -------------------------------------------------------------------

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
    params      sampling parameters (default: SamplingParams(), the reference's)
    pick        which candidate the next layers hear (default: the first)
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
        if self.click is not None and self.click not in CLICK_MODES:
            raise InputError(f"layer {self.key!r}: click must be one of {', '.join(CLICK_MODES)}, got {self.click!r}")

    @property
    def key(self) -> str:
        """The layer's name: `name`, else the instrument."""
        return self.name or self.instrument

    def spec(self) -> LayerSpec:
        return LayerSpec(instrument=self.instrument, name=self.name, prompt=self.prompt, seed=self.seed,
                         gain_db=self.gain_db, candidates=self.candidates, click=self.click,
                         sampling=None if self.params is None else SamplingRecord.of(self.params), pick=self.pick)


@dataclass(frozen=True)
class Progress:
    """A progress report: layer `index` of `layers` (0-based) is at generation step `step` of `steps`."""

    layer: str
    index: int
    layers: int
    step: int
    steps: int


ProgressCallback = Callable[[Progress], None]


# -- the arrangement directory ----------------------------------------------------------------

def candidate_file(name: str, take: int, index: int) -> str:
    return f"candidates/{name}/take{take}-{index}.wav"


def stem_file(name: str) -> str:
    return f"stems/{name}.wav"


MIX_FILE = "mix.wav"
CONTEXT_FILE = "context.wav"
_OWNED = re.compile(r"^(mix\.wav|context\.wav|stems/[^/]+\.wav|candidates/[^/]+/take\d+-\d+\.wav)$")
_TEMP = re.compile(r"^\..+\.tmp(\.wav)?$")
_TAKE = re.compile(r"^candidates/[^/]+/take\d+-\d+\.wav$")


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> str:
    """Write float32 WAV, flush it to disk, and return its `audio_digest`."""
    write_audio(path, audio, sample_rate, subtype="FLOAT")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return audio_digest(path)


def audio_digest(path: str | os.PathLike) -> str:
    """sha256 of an audio file's samples (float32, as read), channel count and sample rate."""
    return _read_with_digest(path)[2]


def _read_with_digest(path: str | os.PathLike) -> tuple[np.ndarray, int, str]:
    """([frames, channels] float32, rate, digest) from one read of the file."""
    import hashlib

    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    h = hashlib.sha256(f"{rate}:{data.shape[1]}:".encode())
    h.update(np.ascontiguousarray(data).tobytes())
    return data, rate, h.hexdigest()


def _matches(path: Path, manifest: Manifest, rel: str) -> bool:
    try:
        return path.is_file() and audio_digest(path) == manifest.files.get(rel)
    except RuntimeError:  # unreadable (truncated) audio
        return False


class Arrangement:
    """An arrangement directory: manifest.json plus audio files, written atomically (module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> Manifest:
        return Manifest.load(self.manifest_path)

    def holds_another(self, other: Manifest, how: str, commands: str) -> InputError:
        """The error for an output directory that holds an arrangement this one must not overwrite."""
        return InputError(f"{self.path} already holds another arrangement ({', '.join(other.layer_names) or 'no layers'}"
                          f", created {other.created:%Y-%m-%d %H:%M}){how}. Choose another output directory, or "
                          f"{commands} {self.path}`")

    def check_new(self, arrangement_id: str) -> None:
        """Refuse a directory that holds another arrangement, or files an arrangement would overwrite."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory; choose an output directory")
        if self.exists():
            other = self.read_manifest()
            if other.arrangement_id != arrangement_id:
                raise self.holds_another(other, "", "work on that one with `stage-stack add/redo/show")
            return
        clashes = [rel for rel in self._owned_files() if rel != MANIFEST_NAME]
        if clashes:
            raise InputError(f"{self.path} holds files an arrangement would overwrite ({', '.join(clashes[:5])}) "
                             "but no manifest.json; choose an empty or new output directory")

    def _owned_files(self) -> list[str]:
        if not self.path.is_dir():
            return []
        found = []
        for path in self.path.rglob("*"):
            rel = path.relative_to(self.path).as_posix()
            if path.is_file() and _OWNED.match(rel):
                found.append(rel)
        return sorted(found)

    def commit(self, manifest: Manifest, files: Mapping[str, np.ndarray]) -> None:
        """Write `files` under temp names, replace the manifest (the commit point), rename them.

        Then the files the previous manifest referenced and this one does not are deleted.
        """
        previous = set(self.read_manifest().files) if self.exists() else set()
        self.path.mkdir(parents=True, exist_ok=True)
        temps: dict[str, Path] = {}
        committed = False
        try:
            for rel, audio in files.items():
                path = self.path / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                temps[rel] = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.wav"
                manifest.files[rel] = _write_wav(temps[rel], audio, manifest.sample_rate)
            expected = expected_files(manifest)
            manifest.files = {rel: manifest.files[rel] for rel in sorted(expected) if rel in manifest.files}
            manifest.save(self.manifest_path)  # the commit point
            committed = True
            for rel, tmp in temps.items():
                os.replace(tmp, self.path / rel)
        finally:
            if not committed:  # after the commit point the temp files are the new state: keep them
                for tmp in temps.values():
                    tmp.unlink(missing_ok=True)
        for rel in sorted(previous - set(manifest.files)):
            (self.path / rel).unlink(missing_ok=True)
        self.remove_leftovers(manifest)

    def finish_renames(self, manifest: Manifest) -> list[str]:
        """After a crash between the commit point and the renames: move each temp file whose
        samples are what the manifest expects into place."""
        finished = []
        for rel, digest in manifest.files.items():
            path = self.path / rel
            if _matches(path, manifest, rel):
                continue
            for tmp in sorted(path.parent.glob(f".{path.name}.*.tmp.wav")):
                if audio_digest(tmp) == digest:
                    os.replace(tmp, path)
                    finished.append(rel)
                    break
        return finished

    def remove_leftovers(self, manifest: Manifest) -> list[str]:
        """Delete temp files, and candidate takes the manifest does not reference (nothing else)."""
        removed = []
        for folder in [self.path, self.path / "stems", *sorted((self.path / "candidates").glob("*"))]:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                rel = path.relative_to(self.path).as_posix()
                orphan_take = _TAKE.match(rel) and rel not in manifest.files
                if path.is_file() and (_TEMP.match(path.name) or orphan_take):
                    path.unlink()
                    removed.append(rel)
        for folder in sorted((self.path / "candidates").glob("*"), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def read(self, rel: str, manifest: Manifest) -> np.ndarray:
        """An audio file of the arrangement, checked against the manifest's sha256."""
        path = self.path / rel
        try:
            data, rate, digest = _read_with_digest(path)
        except (OSError, RuntimeError):  # missing or unreadable
            digest = None
        if digest is None or digest != manifest.files.get(rel):
            raise ArrangementError(f"{path}: missing, or changed since it was written (sha256 differs from "
                                   f"{MANIFEST_NAME}). Restore it, or regenerate its layer with `stage-stack redo`")
        if rate != manifest.sample_rate or data.shape[1] != 1:
            raise ArrangementError(f"{path}: {data.shape[1]} channel(s) at {rate} Hz, but the arrangement is mono "
                                   f"at {manifest.sample_rate} Hz")
        return data[:, 0].copy()


def expected_files(manifest: Manifest) -> set[str]:
    files = {MIX_FILE}
    if manifest.context is not None:
        files.add(CONTEXT_FILE)
    for layer in manifest.layers:
        files.add(stem_file(layer.name))
        files.update(layer.files)
    return files


# -- a song -----------------------------------------------------------------------------------

@dataclass
class Song:
    """An arrangement in memory: its manifest, the context, every layer's candidates and the mix.

    When `path` is set (the song was arranged with `out=`, opened, or saved), every change is
    written there atomically.
    """

    manifest: Manifest
    context: np.ndarray | None  # the input mix at the song's rate, [samples]
    candidates: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [candidates, samples]
    mix: np.ndarray | None = None
    path: Path | None = None

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def layers(self) -> list[str]:
        return self.manifest.layer_names

    @property
    def stems(self) -> dict[str, np.ndarray]:
        """The picked candidate of each layer, in layer order, [samples] at `sample_rate`."""
        return {layer.name: self.candidates[layer.name][layer.picked] for layer in self.manifest.layers}

    @property
    def stale(self) -> list[str]:
        """Layers generated against an earlier state of the layers before them (see `Arranger.redo`)."""
        return self.manifest.stale_layers()

    # -- mixing -----------------------------------------------------------------------------
    def render_mix(self, upto: int | None = None) -> np.ndarray:
        """The limited mix of the context and the picked stems of the first `upto` layers (all: None)."""
        m = self.manifest
        layers = m.layers if upto is None else m.layers[:upto]
        stems = [(self.candidates[layer.name][layer.picked], layer.gain_db) for layer in layers]
        return render_mix(self.context, stems, m.sample_rate, m.samples, m.limiter.settings())

    def _derived(self, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        self.mix = self.render_mix()
        files = {MIX_FILE: self.mix}
        for name in names:
            files[stem_file(name)] = self.stems[name]
        return files

    def _persist(self, sources: Mapping[str, np.ndarray] | None = None, stems: Sequence[str] = ()) -> None:
        derived = self._derived(stems)
        if self.path is not None:
            Arrangement(self.path).commit(self.manifest, {**(sources or {}), **derived})

    # -- session operations that need no expert --------------------------------------------
    def pick(self, name: str, candidate: int) -> "Song":
        """Use another candidate of a layer; re-renders the mix. Later layers become stale."""
        layer = self.manifest.layer(name)
        if not 0 <= candidate < layer.candidates:
            raise InputError(f"layer {name!r} has {layer.candidates} candidate(s), numbered 0 to "
                             f"{layer.candidates - 1}; got {candidate}")
        layer.picked = candidate
        self.manifest.log("pick", f"{name} {candidate}")
        self._persist(stems=[name])
        return self

    def remove(self, name: str) -> "Song":
        """Remove a layer and its files; re-renders the mix. Later layers become stale."""
        index = self.manifest.index(name)
        del self.manifest.layers[index]
        del self.candidates[name]
        self.manifest.log("remove", name)
        self._persist()
        return self

    def remix(self, gains: Mapping[str, float] | None = None) -> "Song":
        """Re-render the mix, optionally with new gains {layer: dB}."""
        for name, gain in (gains or {}).items():
            if not (np.isfinite(gain) and -60.0 <= gain <= 24.0):
                raise InputError(f"gain for {name!r} must be from -60 to +24 dB, got {gain!r}")
            self.manifest.layer(name).gain_db = float(gain)
        self.manifest.log("mix", ", ".join(f"{k} {v:+g} dB" for k, v in (gains or {}).items()))
        self._persist()
        return self

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the whole arrangement to `directory` (WAV stems, candidates, mix, manifest.json)."""
        store = Arrangement(directory)
        if self.path is not None and store.path.resolve() == Path(self.path).resolve():
            self._persist(stems=self.layers)
            return store.path
        store.check_new(self.manifest.arrangement_id)
        sources: dict[str, np.ndarray] = {}
        if self.context is not None:
            sources[CONTEXT_FILE] = self.context
        for layer in self.manifest.layers:
            for i, rel in enumerate(layer.files):
                sources[rel] = self.candidates[layer.name][i]
        self.path = store.path
        self._persist(sources, stems=self.layers)
        return store.path

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Song":
        """Reopen an arrangement directory: finishes or undoes an interrupted write, then loads it."""
        store = Arrangement(directory)
        if not store.exists():
            raise ArrangementError(f"{store.path}: not an arrangement (no {MANIFEST_NAME}); create one with "
                                   "`stage-stack arrange ... -o DIR`")
        manifest = store.read_manifest()
        store.finish_renames(manifest)
        store.remove_leftovers(manifest)
        context = store.read(CONTEXT_FILE, manifest) if manifest.context is not None else None
        candidates = {layer.name: np.stack([store.read(rel, manifest) for rel in layer.files])
                      for layer in manifest.layers}
        song = cls(manifest, context, candidates, path=store.path)
        derived = song._derived(song.layers)
        stale = {rel: audio for rel, audio in derived.items() if not _matches(store.path / rel, manifest, rel)}
        if stale:  # derived files that do not match the manifest (lost temp files): render them again
            store.commit(manifest, stale)
        return song

    def summary(self) -> str:
        """A human-readable description (what `stage-stack show` prints)."""
        return describe(self.manifest, self.path)


def _committed(store: Arrangement, record: LayerRecord) -> bool:
    """Whether the arrangement on disk already has this take of the layer."""
    try:
        on_disk = store.read_manifest()
    except ArrangementError:
        return False
    return any(layer.name == record.name and layer.take == record.take for layer in on_disk.layers)


def describe(manifest: Manifest, path: str | os.PathLike | None = None) -> str:
    """Describe an arrangement from its manifest: song settings, then one line per layer."""
    m = manifest
    bpm = "none" if m.bpm is None else f"{m.bpm:g}" + (" (default)" if m.bpm_source == "default" else "")
    lines = [f"arrangement {m.arrangement_id}  ({path or 'not saved'})",
             f"  {m.duration:g} s at {m.sample_rate} Hz, BPM {bpm}, click {m.click}, seed {m.seed}",
             f"  context: {m.context.source if m.context else 'none'}"]
    stale = set(m.stale_layers())
    for i, layer in enumerate(m.layers):
        picked = f"candidate {layer.picked} of {layer.candidates}"
        flag = "  [stale: an earlier layer changed since; `redo` it]" if layer.name in stale else ""
        lines.append(f"  {i + 1}. {layer.name} ({layer.instrument}): take {layer.take}, {picked}, seed {layer.seed}, "
                     f"{layer.gain_db:+g} dB, click {layer.click}, {len(layer.window_plan.windows)} window(s), "
                     f"{layer.timings.total_s:.1f} s{flag}")
        if layer.prompt:
            lines.append(f"     prompt: {layer.prompt!r}")
    if not m.layers:
        lines.append("  no layers yet")
    return "\n".join(lines)


# -- the arranger -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ArrangePlan:
    """A validated `arrange` call (Arranger.validate)."""

    layers: list[Layer]
    context: ContextAudio | None
    bpm: float | None
    bpm_source: str | None
    duration: float
    seed: int
    click: ClickMode
    sample_rate: int
    request: ArrangeRequest
    store: Arrangement | None


class Arranger:
    """Chains experts layer by layer. Experts come from `experts` and/or a registry.

    experts     {instrument: expert file or loaded Expert}; these win over the registry
    registry    a stage_stack.registry.Registry (see `from_registry`)
    device_map  "auto" (the default: GPUs by free memory, else the CPU), "cpu", a device, or
                {instrument: device} (stage_stack.placement)
    max_memory  {device: bytes or "24GiB"}: experts are loaded lazily, least recently used
                ones are unloaded when a device's budget would be exceeded
    dtype       the LMs' weight format (stage_stack.expert.WeightFormat: "fp32", "bf16", "fp16", "int8",
                "int4"; aliases "float32", "bfloat16", "float16"); codecs run in float32
    click       the default click mode; None = "mix+click" when a tempo is known, else "none"
    sample_rate the songs' rate; None = the context's rate, else the highest expert rate
    limiter     the mix-bus limiter (stage_stack.mixing)
    overlap_seconds, crossfade_seconds   long-form windows (stage_stack.longform defaults)
    """

    def __init__(
        self,
        experts: Mapping[str, str | os.PathLike | Expert] | None = None,
        *,
        registry=None,
        device_map: DeviceMap = "auto",
        max_memory: Mapping[str, int | str] | None = None,
        dtype: str | torch.dtype = "fp32",
        click: ClickMode | None = None,
        sample_rate: int | None = None,
        limiter: LimiterSettings = LimiterSettings(),
        overlap_seconds: float | None = None,
        crossfade_seconds: float | None = None,
        inventory: DeviceInventory | None = None,
    ) -> None:
        if click is not None and click not in CLICK_MODES:
            raise InputError(f"click must be one of {', '.join(CLICK_MODES)}, got {click!r}")
        self.registry = registry
        self.experts = {name: (Path(src) if isinstance(src, (str, os.PathLike)) else src)
                        for name, src in (experts or {}).items()}
        self.device_map = device_map
        from .expert import resolve_format

        self.dtype = resolve_format(dtype)  # a bad name fails here, before any expert is read
        self.click = click
        self.sample_rate = sample_rate
        self.limiter = limiter
        self.overlap_seconds = overlap_seconds
        self.crossfade_seconds = crossfade_seconds
        self.inventory = inventory if inventory is not None else DeviceInventory.detect()
        self.max_memory = parse_max_memory(max_memory, self.inventory)
        check_device_map(device_map, self.instruments, self.inventory)
        self._expected_sha: dict[str, str] = {}  # instrument -> sha256 an expert file must have
        self._records: dict[str, ExpertRecord] = {}
        self._pool = ExpertPool({}, {}, {}, self._load, self.max_memory)

    @classmethod
    def from_registry(cls, user_file: str | os.PathLike | None = None, overrides: dict | None = None,
                      experts: Mapping[str, str | os.PathLike | Expert] | None = None, **kwargs) -> "Arranger":
        """An Arranger over the installed instruments (stage_stack.registry.Registry.load)."""
        from .registry import Registry

        return cls(experts, registry=Registry.load(user_file=user_file, overrides=overrides), **kwargs)

    # -- experts ----------------------------------------------------------------------------
    @property
    def instruments(self) -> list[str]:
        """Every instrument this arranger knows (registry instruments need an installed expert to run)."""
        names = set(self.experts)
        if self.registry is not None:
            names.update(self.registry.names)
        return sorted(names)

    def _source(self, name: str) -> Path | Expert:
        if name in self.experts:
            return self.experts[name]
        resolved = self.registry.resolve_expert(name)  # ExpertNotInstalledError says how to get it
        if resolved.sha256:
            self._expected_sha.setdefault(name, resolved.sha256)
        return resolved.path

    def _metadata(self, name: str):
        source = self._source(name)
        if isinstance(source, Path):
            from .registry import check_instrument

            metadata = read_metadata(source)
            check_instrument(name, metadata, source)
            return metadata
        return source.metadata

    def _prepare_experts(self, names: Sequence[str]) -> None:
        """Resolve, size and place the experts of `names` (before any generation starts)."""
        new = [n for n in dict.fromkeys(names) if n not in self._pool.sources]
        if not new:
            return
        for name in new:
            source = self._source(name)
            self._metadata(name)
            self._pool.sources[name] = source
            self._pool.sizes[name] = expert_nbytes(source, self._torch_dtype()) if isinstance(source, Path) else \
                sum(t.numel() * t.element_size() for t in list(source.lm.parameters()) + list(source.codec.parameters()))
        plan = plan_placement(self.device_map, self._pool.sizes, self.inventory, self.max_memory)
        for name in new:  # experts placed earlier keep their device
            self._pool.placement[name] = plan[name]

    def _torch_dtype(self) -> torch.dtype:
        from .expert import FORMAT_DTYPES

        return FORMAT_DTYPES[self.dtype]  # int8/int4: an upper bound (their block linears are smaller)

    def _load(self, name: str, source: Path, device: str) -> Expert:
        return load_expert(source, device=device, dtype=self.dtype, sha256=self._expected_sha.get(name))

    def adopt_experts(self, manifest: Manifest) -> None:
        """Use the expert files an arrangement recorded, for instruments not given explicitly; an
        adopted file must still have the recorded sha256 when it is loaded."""
        for record in manifest.layers:
            name = record.instrument
            recorded = Path(record.expert.source)
            if name not in self.experts and name not in self._pool.sources and recorded.is_file():
                self.experts[name] = recorded
                if record.expert.sha256:
                    self._expected_sha[name] = record.expert.sha256

    def device_of(self, instrument: str) -> str:
        """The device an instrument's expert runs on (after it was planned for an arrangement)."""
        if instrument not in self._pool.placement:
            self._prepare_experts([instrument])
        return self._pool.placement[instrument]

    def expert(self, instrument: str) -> Expert:
        """The loaded expert of an instrument (loads it on its device if needed)."""
        self.device_of(instrument)
        return self._pool.get(instrument)

    def _expert_record(self, name: str, expert: Expert) -> ExpertRecord:
        if name not in self._records:
            source = self._pool.sources[name]
            if isinstance(source, Path):
                digest = expert.sha256 or self._expected_sha.get(name) or sha256_file(source)
                where, origin = str(source.resolve()), "explicit" if name in self.experts else "registry"
            else:
                digest = expert.sha256
                where, origin = (str(expert.path) if expert.path else "<in memory>"), "in-memory"
            self._records[name] = ExpertRecord(
                instrument=name, source=where, sha256=digest, origin=origin, sample_rate=expert.sample_rate,
                frame_rate=expert.frame_rate, device=str(expert.device), dtype=str(expert.lm.final_norm.weight.dtype))
        return self._records[name]

    # -- defaults from the registry ---------------------------------------------------------
    def _registry_default(self, instrument: str, field_name: str, fallback):
        if self.registry is None or instrument not in self.registry.names:
            return fallback
        return getattr(self.registry.instrument(instrument), field_name)

    def _prompt(self, layer: Layer, expert: Expert) -> tuple[str | None, str]:
        """(the text the expert gets, where it came from); experts without a text encoder get none."""
        if expert.text is None:
            if layer.prompt:
                warnings.warn(f"the {layer.instrument!r} expert has no text encoder: prompt {layer.prompt!r} is "
                              "ignored", stacklevel=4)
            return None, "none"
        if layer.prompt:
            return layer.prompt, "user"
        default = self._registry_default(layer.instrument, "default_prompt", "") or expert.metadata.default_prompt
        return (default, "default") if default else (None, "none")

    # -- validation -------------------------------------------------------------------------
    def _as_layers(self, layers: Sequence[str | Layer]) -> list[Layer]:
        if isinstance(layers, (str, Layer)):
            layers = [layers]
        out = []
        for layer in layers:
            if isinstance(layer, str):
                layer = Layer(layer)
            elif not isinstance(layer, Layer):
                raise InputError(f"a layer is an instrument name or a Layer, got {type(layer).__name__}")
            out.append(layer)
        return out

    def _check(self, layers: list[Layer], existing: Sequence[str], bpm: float | None, song_click: ClickMode) -> None:
        check_layers(layers, self.instruments, taken=existing)
        for layer in layers:
            if bpm is None and (layer.click or song_click) != "none":
                raise InputError(f"layer {layer.key!r}: click mode {layer.click or song_click!r} needs a tempo; "
                                 "pass bpm=..., or use click='none' to condition on the mix alone")
        self._prepare_experts([layer.instrument for layer in layers])

    def _song_click(self, click: ClickMode | None, bpm: float | None) -> ClickMode:
        click = click or self.click
        if click is not None:
            if click not in CLICK_MODES:
                raise InputError(f"click must be one of {', '.join(CLICK_MODES)}, got {click!r}")
            return click
        return "mix+click" if bpm is not None else "none"

    # -- arranging --------------------------------------------------------------------------
    def arrange(
        self,
        layers: Sequence[str | Layer],
        context: str | os.PathLike | np.ndarray | None = None,
        *,
        bpm: float | None = None,
        duration: float | None = None,
        seed: int = 0,
        click: ClickMode | None = None,
        context_sample_rate: int | None = None,
        out: str | os.PathLike | None = None,
        callback: ProgressCallback | None = None,
    ) -> Song:
        """Generate `layers` in order on top of `context`; returns the Song (written to `out` if given).

        context   a path, a float array (with `context_sample_rate`) or None (start from a click)
        bpm       the tempo of the click; without a context the default is 120
        duration  seconds; default: the context's length, else 10 s
        seed      the song's seed; layer i uses seed + i unless the layer sets its own
        out       an arrangement directory; rerunning the same call there resumes it
        """
        song, pending = self.prepare(layers, context, bpm=bpm, duration=duration, seed=seed, click=click,
                                     context_sample_rate=context_sample_rate, out=out)
        for position, layer in enumerate(pending):
            self.run_layer(song, layer, callback, position=(position, len(pending)))
        return song

    def validate(self, layers, context=None, *, bpm=None, duration=None, seed=0, click=None,
                 context_sample_rate=None, out=None, sample_rate=None) -> "ArrangePlan":
        """Check an `arrange` call without doing any work (InputError & co. on bad input)."""
        layers = self._as_layers(layers)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        bpm = check_bpm(bpm)
        ctx = load_context(context, context_sample_rate)
        duration = check_duration(duration, ctx, DEFAULT_DURATION)
        if ctx is None and bpm is None:
            bpm, bpm_source = DEFAULT_BPM, "default"
        else:
            bpm_source = None if bpm is None else "given"
        song_click = self._song_click(click, bpm)
        self._check(layers, [], bpm, song_click)
        rate = sample_rate or self.sample_rate or (ctx.sample_rate if ctx is not None else
                                                   max(self._metadata(l.instrument).sample_rate for l in layers))
        request = ArrangeRequest(layers=[l.spec() for l in layers], context_sha256=ctx.sha256 if ctx else None,
                                 bpm=None if bpm_source == "default" else bpm, duration=duration, seed=seed,
                                 click=click or self.click, sample_rate=rate)
        store = Arrangement(out) if out is not None else None
        if store is not None:
            if store.exists():
                existing = store.read_manifest()
                if existing.request != request:
                    raise store.holds_another(existing, " made with different settings",
                                              "change that one with `stage-stack add/redo/remove")
            else:
                store.check_new(arrangement_id="")
        return ArrangePlan(layers, ctx, bpm, bpm_source, duration, seed, song_click, rate, request, store)

    def prepare(self, layers, context=None, *, bpm=None, duration=None, seed=0, click=None,
                context_sample_rate=None, out=None, sample_rate=None) -> tuple[Song, list[Layer]]:
        """Validate everything and create (or reopen, to resume) the song; returns it and the layers to run."""
        plan = self.validate(layers, context, bpm=bpm, duration=duration, seed=seed, click=click,
                             context_sample_rate=context_sample_rate, out=out, sample_rate=sample_rate)
        layers, ctx, bpm, bpm_source, duration, rate, store = (plan.layers, plan.context, plan.bpm, plan.bpm_source,
                                                               plan.duration, plan.sample_rate, plan.store)
        if store is not None and store.exists():  # the same request: resume
            song = Song.open(store.path)
            return song, [layer for layer in layers if layer.key not in song.layers]

        manifest = Manifest(
            library_version=__version__, arrangement_id=uuid.uuid4().hex, created=now(), updated=now(),
            sample_rate=rate, duration=duration, samples=int(round(duration * rate)), bpm=bpm, bpm_source=bpm_source,
            click=plan.click, seed=plan.seed, limiter=LimiterRecord.of(self.limiter), click_gain_db=CLICK_GAIN_DB,
            request=plan.request, registry=RegistryRecord(layers=list(self.registry.layers)) if self.registry else None)
        context_audio = None
        if ctx is not None:
            manifest.context = ContextRecord(source=ctx.source, sha256=ctx.sha256, sample_rate=ctx.sample_rate,
                                             channels=ctx.channels, seconds=round(ctx.seconds, 6))
            context_audio = fit_length(resample(ctx.audio, ctx.sample_rate, rate), manifest.samples)
        manifest.log("arrange", ", ".join(l.key for l in layers))
        song = Song(manifest, context_audio)
        if store is not None:
            song.save(store.path)
        else:
            song.mix = song.render_mix()
        return song, layers

    def add(self, song: Song, layer: str | Layer, *, callback: ProgressCallback | None = None) -> Song:
        """Add a layer at the end of the song, hearing the current mix."""
        (layer,) = self._as_layers([layer])
        self._check([layer], song.layers, song.manifest.bpm, song.manifest.click)
        song.manifest.log("add", layer.key)
        self.run_layer(song, layer, callback)
        return song

    def redo(self, song: Song, name: str, *, seed: int | None = None, prompt: str | None = None,
             downstream: bool = False, callback: ProgressCallback | None = None) -> Song:
        """Regenerate a layer with a new seed (random if not given) and/or prompt.

        With `downstream`, the layers after it are regenerated too (same seeds and prompts), so
        they hear the new take. The new take's first candidate is picked.
        """
        index = song.manifest.index(name)
        old = song.manifest.layers[index]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        redo_seed = seed if seed is not None else secrets.randbelow(2**31)
        todo = [(index, replace(self._layer_of(old), seed=redo_seed, prompt=prompt or self._layer_of(old).prompt, pick=0))]
        if downstream:
            todo += [(j, replace(self._layer_of(rec), pick=0)) for j, rec in enumerate(song.manifest.layers)
                     if j > index]
        self._prepare_experts([layer.instrument for _, layer in todo])
        song.manifest.log("redo", f"{name} seed {redo_seed}" + (" and later layers" if downstream else ""))
        for position, (_, layer) in enumerate(todo):
            self.run_layer(song, layer, callback, position=(position, len(todo)))
        return song

    @staticmethod
    def _layer_of(record: LayerRecord) -> Layer:
        return Layer(record.instrument, name=record.name, prompt=record.prompt if record.prompt_source == "user" else None,
                     seed=record.seed, gain_db=record.gain_db, candidates=record.candidates,
                     click=record.click_requested, params=record.sampling.params(), pick=record.picked)

    def reproduce(self, manifest_path: str | os.PathLike, out: str | os.PathLike | None = None,
                  callback: ProgressCallback | None = None) -> Song:
        """Generate an arrangement again from its manifest: the same experts (sha256-checked), context,
        seeds, prompts, picks, gains and settings. On the same machine the audio is identical."""
        manifest_path = Path(manifest_path)
        m = Manifest.load(manifest_path)
        stale = m.stale_layers()
        if stale:
            warnings.warn(f"layers {', '.join(stale)} were generated before earlier layers changed; they are "
                          "regenerated against the current picks, so they will differ from the originals", stacklevel=2)
        self.adopt_experts(m)
        context = None
        if m.context is not None:
            store = Arrangement(manifest_path.parent)
            audio = store.read(CONTEXT_FILE, m)
            context = ContextAudio(audio, m.sample_rate, m.context.source, m.context.sha256, m.context.channels)
        layers = [self._layer_of(record) for record in m.layers]
        song, pending = self.prepare(layers, context, bpm=m.bpm if m.bpm_source == "given" else None,
                                     duration=m.duration, seed=m.seed, click=m.click, out=out,
                                     sample_rate=m.sample_rate)
        for position, layer in enumerate(pending):
            self.run_layer(song, layer, callback, position=(position, len(pending)))
        for name in song.layers:  # expert files must be the recorded ones
            want, got = m.layer(name).expert.sha256, song.manifest.layer(name).expert.sha256
            if want and got != want:
                raise IntegrityError(f"the {name!r} expert has sha256 {got}, the manifest records {want}")
        return song

    # -- one layer --------------------------------------------------------------------------
    def run_layer(self, song: Song, layer: Layer, callback: ProgressCallback | None = None,
                  position: tuple[int, int] = (0, 1)) -> None:
        """Generate `layer` (appending it, or replacing the layer of that name) and commit it.

        `position` (this layer, layers in this call) is what progress reports count. If it fails
        or is interrupted before its commit point, `song` is left as it was.
        """
        m = song.manifest
        names = m.layer_names
        index = names.index(layer.key) if layer.key in names else len(names)
        previous = m.layers[index] if index < len(names) else None
        take = previous.take + 1 if previous is not None else 1
        audio, record = self._render_layer(song, index, layer, take, callback, position)
        before = (list(m.layers), dict(song.candidates), song.mix, dict(m.files))
        try:
            if previous is None:
                m.layers.append(record)
            else:
                m.layers[index] = record
            song.candidates[record.name] = audio
            start = time.perf_counter()
            derived = song._derived([record.name])  # the new stem joins the mix
            record.timings.mix_s = round(record.timings.mix_s + time.perf_counter() - start, 6)
            record.timings.total_s = round(record.timings.total_s + time.perf_counter() - start, 6)
            if song.path is not None:
                sources = {rel: audio[i] for i, rel in enumerate(record.files)}
                Arrangement(song.path).commit(m, {**sources, **derived})
        except BaseException:
            if song.path is None or not _committed(Arrangement(song.path), record):
                m.layers[:], song.candidates, song.mix, m.files = before
            raise

    def _render_layer(self, song: Song, index: int, layer: Layer, take: int, callback: ProgressCallback | None,
                      position: tuple[int, int]) -> tuple[np.ndarray, LayerRecord]:
        m = song.manifest
        began = time.perf_counter()
        timings = LayerTimings()

        start = time.perf_counter()
        expert = self.expert(layer.instrument)
        timings.load_s = time.perf_counter() - start

        start = time.perf_counter()
        mix = song.render_mix(upto=index)
        mix_is_empty = m.context is None and index == 0
        requested = layer.click or m.click
        mode: ClickMode = "click" if mix_is_empty else requested
        click = metronome(m.bpm, m.samples, m.sample_rate) if mode != "none" else None
        heard = conditioning_audio(mix, click, mode, m.sample_rate, m.limiter.settings())
        timings.mix_s = time.perf_counter() - start

        prompt, prompt_source = self._prompt(layer, expert)
        seed = layer.seed if layer.seed is not None else m.seed + index
        params = layer.params or SamplingParams()
        plan = window_plan_for(expert, m.duration, self.overlap_seconds, self.crossfade_seconds)

        def on_step(done: int, steps: int) -> None:
            if callback is not None:
                callback(Progress(layer.key, position[0], position[1], done, steps))

        on_step(0, 1)
        result = render_stem(expert, heard, m.sample_rate, m.duration, prompt_text=prompt,
                             prompt_is_default=prompt_source == "default", candidates=layer.candidates,
                             params=params, seed=seed, callback=on_step, plan=plan)
        for stage, seconds in result.timings.as_dict().items():
            setattr(timings, stage, getattr(timings, stage) + seconds)

        start = time.perf_counter()
        audio = fit_length(resample(result.audio, expert.sample_rate, m.sample_rate), m.samples)
        timings.resample_s += time.perf_counter() - start
        timings.total_s = time.perf_counter() - began

        record = LayerRecord(
            name=layer.key, instrument=layer.instrument, expert=self._expert_record(layer.instrument, expert),
            prompt=prompt, prompt_source=prompt_source, seed=seed, sampling=SamplingRecord.of(params),
            candidates=layer.candidates, picked=layer.pick,
            gain_db=layer.gain_db if layer.gain_db is not None else
            float(self._registry_default(layer.instrument, "default_gain_db", 0.0)),
            click=mode, click_requested=layer.click, take=take,
            files=[candidate_file(layer.key, take, i) for i in range(layer.candidates)],
            conditioned_on=m.state_before(index), window_plan=result.plan,
            timings=LayerTimings(**{k: round(v, 6) for k, v in timings.model_dump().items()}), created=now())
        return audio.astype(np.float32), record
