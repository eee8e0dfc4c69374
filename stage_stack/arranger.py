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

The arrangement directory is stage_stack.arrangement; the song in memory stage_stack.song;
the layer as asked for stage_stack.layer.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, Union

import numpy as np
import torch

from . import __version__
from .arrangement import CONTEXT_FILE, Arrangement, candidate_file
from .audio import resample
from .errors import InputError, IntegrityError
from .expert import Expert, load_expert, read_metadata, sha256_file
from .inputs import (DEFAULT_BPM, ContextAudio, check_bpm, check_duration, check_layers, check_sample_rate,
                     load_context)
from .beat_tracking import DEFAULT_BEAT_TRACKER, load_beat_tracker, track_beats
from .layer import BeatSource, ChordSource, Layer
from .manifest import (ArrangeRequest, ContextRecord, ExpertRecord, LayerRecord, LayerTimings, LimiterRecord, Manifest,
                       RegistryRecord, SamplingRecord, now, parse_state)
from .mixing import CLICK_GAIN_DB, CLICK_MODES, ClickMode, LimiterSettings, conditioning_audio, fit_length, metronome
from .pipeline import render_stem, window_plan_for
from .placement import (DeviceInventory, DeviceMap, ExpertPool, check_device_map, expert_nbytes, parse_max_memory,
                        plan_placement)
from .song import Song

if TYPE_CHECKING:
    from .models.beat_tracker import BeatTracker
    from .registry import Registry

__all__ = ["Arranger", "ArrangePlan", "Layer", "Progress", "ProgressCallback", "Song"]

DEFAULT_DURATION = 10.0  # seconds, when neither a duration nor a context is given
# A layer hears beats in a mix of at least this long (two bars at the slowest tempo a beat grid has).
MIN_BEAT_SECONDS = 4.0


@dataclass(frozen=True)
class Progress:
    """A progress report: layer `index` of `layers` (0-based) is at generation step `step` of `steps`."""

    layer: str
    index: int
    layers: int
    step: int
    steps: int


ProgressCallback = Callable[[Progress], None]
ContextSource = Union[str, os.PathLike, np.ndarray, ContextAudio, None]  # what `context=` accepts


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
    dtype       the LMs' weight format: "auto" (the default: per device, the measured best,
                stage_stack.machine.auto_weight_format: int8 on a CPU with native bf16, bf16 on
                a GPU, else fp32) or a stage_stack.expert.WeightFormat ("fp32", "bf16", "fp16",
                "int8", "int4"; aliases "float32", "bfloat16", "float16"); codecs run in float32
    click       the default click mode; None = "none": layers hear the mix alone, as the experts
                were trained (STAGE pairs are a mix *or* a click, never both summed); the first
                layer of a song without context hears the click whatever the mode
    sample_rate the songs' rate; None = the context's rate, else the highest expert rate
    limiter     the mix-bus limiter (stage_stack.mixing)
    overlap_seconds, crossfade_seconds   long-form windows (stage_stack.longform defaults)
    beat_tracker the beat tracker file for `Layer.beats` "heard" (default: the bundled one)
    """

    def __init__(
        self,
        experts: Mapping[str, str | os.PathLike | Expert] | None = None,
        *,
        registry: "Registry | None" = None,
        device_map: DeviceMap = "auto",
        max_memory: Mapping[str, int | str] | None = None,
        dtype: str | torch.dtype = "auto",
        click: ClickMode | None = None,
        sample_rate: int | None = None,
        limiter: LimiterSettings = LimiterSettings(),
        overlap_seconds: float | None = None,
        crossfade_seconds: float | None = None,
        inventory: DeviceInventory | None = None,
        beat_tracker: str | os.PathLike | None = None,
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
        self.sample_rate = None if sample_rate is None else check_sample_rate(sample_rate, "Arranger(sample_rate=...)")
        self.limiter = limiter
        self.overlap_seconds = overlap_seconds
        self.crossfade_seconds = crossfade_seconds
        self.inventory = inventory if inventory is not None else DeviceInventory.detect()
        self.max_memory = parse_max_memory(max_memory, self.inventory)
        check_device_map(device_map, self.instruments, self.inventory)
        self._expected_sha: dict[str, str] = {}  # instrument -> sha256 an expert file must have
        self._records: dict[str, ExpertRecord] = {}
        self._pool = ExpertPool({}, {}, {}, self._load, self.max_memory)
        self.beat_tracker_path = None if beat_tracker is None else Path(beat_tracker)
        self._beat_tracker: "BeatTracker | None" = None

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
        from .expert import FORMAT_DTYPES, resolve_format

        # "auto" is sized as on the first device placement would try (a GPU when there is one).
        fmt = resolve_format(self.dtype, self.inventory.names[0])
        return FORMAT_DTYPES[fmt]  # int8/int4: an upper bound (their block linears are smaller)

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
                frame_rate=expert.frame_rate, device=str(expert.device), dtype=str(expert.lm.final_norm.weight.dtype),
                weight_format=expert.weight_format)
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
        if self.registry is not None:
            for layer in layers:
                if layer.instrument not in self.instruments:
                    # the registry says why: two plugins register it (and which registry.yaml entry
                    # picks one), it is disabled, or nothing registers it
                    self.registry.instrument(layer.instrument)
        check_layers(layers, self.instruments, taken=existing)
        before = list(existing)
        for layer in layers:
            _check_hears(layer, before)
            before.append(layer.key)
        for layer in layers:
            if bpm is None and (layer.click or song_click) != "none":
                raise InputError(f"layer {layer.key!r}: click mode {layer.click or song_click!r} needs a tempo; "
                                 "pass bpm=..., or use click='none' to condition on the mix alone")
        self._prepare_experts([layer.instrument for layer in layers])
        for layer in layers:
            if layer.chords is not None and not self.expert(layer.instrument).lm.config.chord_classes:
                raise InputError(f"layer {layer.key!r}: chords={layer.chords!r} is for an expert with a chord "
                                 f"stream, and the {layer.instrument!r} expert has none; leave chords unset")

    def _song_click(self, click: ClickMode | None) -> ClickMode:
        click = click or self.click
        if click is not None:
            if click not in CLICK_MODES:
                raise InputError(f"click must be one of {', '.join(CLICK_MODES)}, got {click!r}")
            return click
        return "none"

    # -- arranging --------------------------------------------------------------------------
    def arrange(
        self,
        layers: Sequence[str | Layer],
        context: ContextSource = None,
        *,
        bpm: float | None = None,
        duration: float | None = None,
        seed: int = 0,
        click: ClickMode | None = None,
        context_sample_rate: int | None = None,
        out: str | os.PathLike | None = None,
        callback: ProgressCallback | None = None,
        wait: bool | float = False,
    ) -> Song:
        """Generate `layers` in order on top of `context`; returns the Song (written to `out` if given).

        context   a path, a float array (with `context_sample_rate`) or None (start from a click)
        bpm       the tempo of the click; without a context the default is 120
        duration  seconds; default: the context's length, else 10 s
        seed      the song's seed; layer i uses seed + i unless the layer sets its own
        out       an arrangement directory; rerunning the same call there resumes it
        wait      when another process is changing `out`: False fails at once, True waits
        """
        with Arrangement(out).lock(wait) if out is not None else nullcontext():
            song, pending = self.prepare(layers, context, bpm=bpm, duration=duration, seed=seed, click=click,
                                         context_sample_rate=context_sample_rate, out=out, wait=wait)
            for position, layer in enumerate(pending):
                self.run_layer(song, layer, callback, position=(position, len(pending)))
        return song

    def validate(
        self,
        layers: Sequence[str | Layer],
        context: ContextSource = None,
        *,
        bpm: float | None = None,
        duration: float | None = None,
        seed: int = 0,
        click: ClickMode | None = None,
        context_sample_rate: int | None = None,
        out: str | os.PathLike | None = None,
        sample_rate: int | None = None,
        allow_empty: bool = False,
    ) -> "ArrangePlan":
        """Check an `arrange` call without doing any work (InputError & co. on bad input).

        allow_empty  accept no layers (a song that gets its layers later with `add`; see `start`)
        """
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
        song_click = self._song_click(click)
        if layers or not allow_empty:
            self._check(layers, [], bpm, song_click)
        if not (sample_rate or self.sample_rate or ctx is not None or layers):
            raise InputError("a song without layers or context needs its sample rate: pass sample_rate=...")
        if sample_rate is not None:
            rate = check_sample_rate(sample_rate, "sample_rate")
        elif self.sample_rate is not None:
            rate = self.sample_rate
        else:
            rate = ctx.sample_rate if ctx is not None else max(self._metadata(l.instrument).sample_rate for l in layers)
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

    def prepare(
        self,
        layers: Sequence[str | Layer],
        context: ContextSource = None,
        *,
        bpm: float | None = None,
        duration: float | None = None,
        seed: int = 0,
        click: ClickMode | None = None,
        context_sample_rate: int | None = None,
        out: str | os.PathLike | None = None,
        sample_rate: int | None = None,
        allow_empty: bool = False,
        wait: bool | float = False,
    ) -> tuple[Song, list[Layer]]:
        """Validate everything and create (or reopen, to resume) the song; returns it and the layers to run."""
        plan = self.validate(layers, context, bpm=bpm, duration=duration, seed=seed, click=click,
                             context_sample_rate=context_sample_rate, out=out, sample_rate=sample_rate,
                             allow_empty=allow_empty)
        layers, ctx, bpm, bpm_source, duration, rate, store = (plan.layers, plan.context, plan.bpm, plan.bpm_source,
                                                               plan.duration, plan.sample_rate, plan.store)
        if store is not None and store.exists():  # the same request: resume
            song = Song.open(store.path, wait=wait)
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
        song = Song(manifest, context_audio, wait=wait)
        if store is not None:
            # Nothing is written before every expert is known to load: a broken expert file must
            # not leave a song with no layers behind.
            for instrument in dict.fromkeys(layer.instrument for layer in layers):
                self.expert(instrument)
            song.save(store.path)
        else:
            song.mix = song.render_mix()
        return song, layers

    def start(
        self,
        context: ContextSource = None,
        *,
        bpm: float | None = None,
        duration: float | None = None,
        seed: int = 0,
        click: ClickMode | None = None,
        out: str | os.PathLike | None = None,
        sample_rate: int | None = None,
        wait: bool | float = False,
    ) -> Song:
        """A new song with no layers yet (add them with `add`): from a click, or on `context`.

        Without a context the song's rate must be known: `sample_rate`, or the Arranger's.
        """
        song, _ = self.prepare([], context, bpm=bpm, duration=duration, seed=seed, click=click, out=out,
                               sample_rate=sample_rate, allow_empty=True, wait=wait)
        return song

    def add(self, song: Song, layer: str | Layer, *, callback: ProgressCallback | None = None,
            force: bool = False) -> Song:
        """Add a layer at the end of the song, hearing the current mix.

        force  overwrite a hand-edited mix.wav (or a stems/NAME.wav stage-stack did not write)
        """
        (layer,) = self._as_layers([layer])
        self._check([layer], song.layers, song.manifest.bpm, song.manifest.click)
        with song.writing():
            song.manifest.log("add", layer.key)
            self.run_layer(song, layer, callback, force=force)
        return song

    def redo(self, song: Song, name: str, *, seed: int | None = None, prompt: str | None = None,
             downstream: bool = False, callback: ProgressCallback | None = None, force: bool = False) -> Song:
        """Regenerate a layer with a new seed (random if not given) and/or prompt.

        With `downstream`, the layers after it are regenerated too (same seeds and prompts), so
        they hear the new take. The new take's first candidate is picked. Earlier takes stay on
        disk (`Song.undo` goes back to them) until `Song.prune`. A layer whose candidate files were
        deleted is regenerated from what the manifest records. `force` overwrites hand-edited stems/mix.
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
        with song.writing():
            song.manifest.log("redo", f"{name} seed {redo_seed}" + (" and later layers" if downstream else ""))
            for position, (_, layer) in enumerate(todo):
                self.run_layer(song, layer, callback, position=(position, len(todo)), force=force)
        return song

    @staticmethod
    def _layer_of(record: LayerRecord) -> Layer:
        return Layer(record.instrument, name=record.name, prompt=record.prompt if record.prompt_source == "user" else None,
                     seed=record.seed, gain_db=record.gain_db, candidates=record.candidates,
                     click=record.click_requested, params=record.sampling.params(), pick=record.picked,
                     hears=None if record.hears_requested is None else tuple(record.hears_requested),
                     chords=record.chords_requested, beats=record.beats_requested)

    def _as_made(self, record: LayerRecord) -> Layer:
        """The layer as `record` says it was made: where its chords and beats came from, not the
        defaults of today. A record from before `Layer.beats` / `Layer.chords` existed heard its mix
        and named its own chords, so it is replayed that way."""
        layer = self._layer_of(record)
        chords = record.chords
        if chords is None and self.expert(record.instrument).lm.config.chord_classes:
            chords = "own"
        return replace(layer, chords=chords, beats=record.beats or "own")

    def reproduce(self, manifest_path: str | os.PathLike, out: str | os.PathLike | None = None,
                  callback: ProgressCallback | None = None, wait: bool | float = False) -> Song:
        """Generate an arrangement again from its manifest: the same experts (sha256-checked), context,
        seeds, prompts, picks, gains and settings. On the same machine the audio is identical."""
        manifest_path = Path(manifest_path)
        m = Manifest.load(manifest_path)
        # A stale layer is reproduced as it was made when the takes it heard are still the
        # current ones (only a pick or a gain changed since); not when an earlier layer was redone.
        stale = [name for name in m.stale_layers() if not _reproducible(m, m.layer(name))]
        if stale:
            warnings.warn(f"layers {', '.join(stale)} were generated before earlier layers changed; they are "
                          "regenerated against the current takes, so they will differ from the originals", stacklevel=2)
        self.adopt_experts(m)
        context = None
        if m.context is not None:
            store = Arrangement(manifest_path.parent)
            audio = store.read(CONTEXT_FILE, m)
            context = ContextAudio(audio, m.sample_rate, m.context.source, m.context.sha256, m.context.channels)
        layers = [self._as_made(record) for record in m.layers]
        with Arrangement(out).lock(wait) if out is not None else nullcontext():
            song, pending = self.prepare(layers, context, bpm=m.bpm if m.bpm_source == "given" else None,
                                         duration=m.duration, seed=m.seed, click=m.click, out=out,
                                         sample_rate=m.sample_rate, wait=wait)
            for position, layer in enumerate(pending):
                # Each layer hears the earlier ones as its record says it did (their pick and gain
                # then), so a song whose gains or picks changed later is reproduced as it was made.
                self.run_layer(song, layer, callback, position=(position, len(pending)),
                               heard=_heard_in(m, m.layer(layer.key), song.manifest))
        for name in song.layers:  # expert files must be the recorded ones
            want, got = m.layer(name).expert.sha256, song.manifest.layer(name).expert.sha256
            if want and got != want:
                raise IntegrityError(f"the {name!r} expert has sha256 {got}, the manifest records {want}")
            made, now = m.layer(name).expert.weight_format, song.manifest.layer(name).expert.weight_format
            if made and now and made != now:
                warnings.warn(f"layer {name!r} was made with {made} weights and reproduced with {now} ones, so its "
                              f"audio differs; pass dtype={made!r} (--dtype {made}) to reproduce it exactly",
                              stacklevel=2)
        return song

    # -- one layer --------------------------------------------------------------------------
    def run_layer(self, song: Song, layer: Layer, callback: ProgressCallback | None = None,
                  position: tuple[int, int] = (0, 1), *, force: bool = False,
                  heard: Mapping[str, str] | None = None) -> None:
        """Generate `layer` (appending it, or replacing the layer of that name) and commit it.

        `position` (this layer, layers in this call) is what progress reports count. If it fails
        or is interrupted before its commit point, `song` is left as it was. The song's lock is
        held throughout. `heard` ({layer: state}, a record's `conditioned_on`) makes the layer
        hear earlier layers with those picks and gains instead of the current ones.
        """
        with song.writing():
            m = song.manifest
            names = m.layer_names
            index = names.index(layer.key) if layer.key in names else len(names)
            previous = m.layers[index] if index < len(names) else None
            current = previous.take if previous is not None else 0
            take = Arrangement(song.path).next_take(layer.key, current) if song.path is not None else current + 1
            audio, record = self._render_layer(song, index, layer, take, callback, position, heard)
            if previous is None:
                m.layers.append(record)
            else:
                m.layers[index] = record
            song.candidates[record.name] = audio
            song.damaged.pop(record.name, None)
            start = time.perf_counter()
            derived = song._derived([record.name])  # the new stem joins the mix
            record.timings.mix_s = round(record.timings.mix_s + time.perf_counter() - start, 6)
            record.timings.total_s = round(record.timings.total_s + time.perf_counter() - start, 6)
            if song.path is not None:
                sources = {rel: audio[i] for i, rel in enumerate(record.files)}
                Arrangement(song.path).commit(m, {**sources, **derived}, force=force)

    def _render_layer(self, song: Song, index: int, layer: Layer, take: int, callback: ProgressCallback | None,
                      position: tuple[int, int], as_heard: Mapping[str, str] | None = None
                      ) -> tuple[np.ndarray, LayerRecord]:
        m = song.manifest
        began = time.perf_counter()
        timings = LayerTimings()

        start = time.perf_counter()
        expert = self.expert(layer.instrument)
        timings.load_s = time.perf_counter() - start

        hears = _resolve_hears(layer, m.layers[:index], expert)
        start = time.perf_counter()
        mix = song.render_mix(upto=index, heard=as_heard, hears=hears)
        mix_is_empty = m.context is None and (index == 0 or hears == [])
        requested = layer.click or m.click
        mode: ClickMode = "click" if mix_is_empty else requested
        beats = self._beat_source(layer, m, index, hears, mode)
        heard_bpm = None
        if beats == "heard":  # a click on the beats heard in the mix, instead of the mix
            timings.mix_s = time.perf_counter() - start
            start = time.perf_counter()
            grid = track_beats(self.beat_tracker(), mix, m.sample_rate)
            heard_bpm, mode, click = round(grid.bpm, 3), "click", grid.click(m.sample_rate, m.samples)
            timings.beats_s = time.perf_counter() - start
            start = time.perf_counter()
        else:
            click = metronome(m.bpm, m.samples, m.sample_rate) if mode != "none" else None
        heard = conditioning_audio(mix, click, mode, m.sample_rate, m.limiter.settings())
        timings.mix_s += time.perf_counter() - start

        prompt, prompt_source = self._prompt(layer, expert)
        seed = layer.seed if layer.seed is not None else m.seed + index
        params = layer.params or expert.metadata.sampling_params()
        plan = window_plan_for(expert, m.duration, self.overlap_seconds, self.crossfade_seconds)

        def on_step(done: int, steps: int) -> None:
            if callback is not None:
                callback(Progress(layer.key, position[0], position[1], done, steps))

        on_step(0, 1)
        chords = self._chord_source(layer, expert, m, index, hears, mode)
        result = render_stem(expert, heard, m.sample_rate, m.duration, prompt_text=prompt,
                             prompt_is_default=prompt_source == "default", candidates=layer.candidates,
                             params=params, seed=seed, callback=on_step, plan=plan,
                             chords="heard" if chords == "heard" else None)
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
            conditioned_on=m.state_before(index, as_heard, hears), hears=hears,
            hears_requested=None if layer.hears is None else list(layer.hears), chords=chords,
            chords_requested=layer.chords, beats=beats, beats_requested=layer.beats, heard_bpm=heard_bpm,
            window_plan=result.plan,
            timings=LayerTimings(**{k: round(v, 6) for k, v in timings.model_dump().items()}), created=now())
        return audio.astype(np.float32), record

    def beat_tracker(self) -> "BeatTracker":
        """The beat tracker layers hear beats with (`Layer.beats`), loaded on first use."""
        if self._beat_tracker is None:
            self._beat_tracker = load_beat_tracker(self.beat_tracker_path)
        return self._beat_tracker

    def _beat_source(self, layer: Layer, m: Manifest, index: int, hears: list[str] | None,
                     click: ClickMode) -> BeatSource:
        """Whether the layer hears a click on the beats heard in its mix instead of the mix: its
        own choice, else "heard" for an instrument the registry marks unpitched (the drums) that
        would hear pitched material alone (click mode "none") for long enough to hear a tempo."""
        pitched_mix = self._hears_pitched(m, index, hears)
        if layer.beats is not None:
            if layer.beats == "heard" and (click != "none" or not pitched_mix):
                raise InputError(f"layer {layer.key!r}: beats='heard' replaces the mix it hears with a click on the "
                                 "beats heard there, so it needs a mix with pitched material and click mode 'none'"
                                 f" (it hears {'the click' if click != 'none' else 'no pitched layer'}); use "
                                 "beats='own', or a click mode of 'none'")
            if layer.beats == "heard" and m.duration < MIN_BEAT_SECONDS:
                raise InputError(f"layer {layer.key!r}: beats='heard' needs at least {MIN_BEAT_SECONDS:g} s to hear a "
                                 f"tempo in, the song has {m.duration:g} s; use beats='own'")
            return layer.beats
        unpitched = not self._registry_default(layer.instrument, "pitched", True)
        heard = unpitched and click == "none" and pitched_mix and m.duration >= MIN_BEAT_SECONDS
        # an install without the bundled tracker keeps the mix (`stage-stack doctor` warns)
        tracker = self.beat_tracker_path or DEFAULT_BEAT_TRACKER
        return "heard" if heard and (self._beat_tracker is not None or tracker.is_file()) else "own"

    def _chord_source(self, layer: Layer, expert: Expert, m: Manifest, index: int, hears: list[str] | None,
                      click: ClickMode) -> ChordSource | None:
        """Where the layer's chord stream takes its chords from (None: its expert has none): the
        layer's own choice, else "heard" when it hears pitched material (the song's context audio,
        or a layer of an instrument the registry does not mark unpitched), else "own"."""
        if not expert.lm.config.chord_classes:
            return None
        if layer.chords is not None:
            if layer.chords == "heard" and click == "click":
                raise InputError(f"layer {layer.key!r}: chords='heard' needs a mix to hear them in, and it hears "
                                 "the click alone; give it a context or earlier layers, or use chords='own'")
            return layer.chords
        if click == "click":
            return "own"
        return "heard" if self._hears_pitched(m, index, hears) else "own"

    def _hears_pitched(self, m: Manifest, index: int, hears: list[str] | None) -> bool:
        """Whether layer `index` hears pitched material: the song's context audio, or an earlier
        layer it hears of an instrument the registry does not mark `pitched: false`."""
        return m.context is not None or any(self._registry_default(r.instrument, "pitched", True)
                                            for r in m.layers[:index] if hears is None or r.name in hears)


def _check_hears(layer: Layer, earlier: Sequence[str]) -> None:
    if layer.hears is not None:
        unknown = [name for name in layer.hears if name not in earlier]
        if unknown:
            raise InputError(f"layer {layer.key!r}: hears {', '.join(map(repr, unknown))}, which "
                             f"{'is' if len(unknown) == 1 else 'are'} not an earlier layer; earlier layers: "
                             f"{', '.join(earlier) or 'none'}")


def _resolve_hears(layer: Layer, earlier: Sequence[LayerRecord], expert: Expert) -> list[str] | None:
    """The earlier layers `layer` hears (None: all): its own `hears`, else the earlier layers of
    the instruments its expert was trained to hear (`ExpertMetadata.hears`), when there are any."""
    if layer.hears is not None:
        _check_hears(layer, [record.name for record in earlier])
        return list(layer.hears)
    trained = expert.metadata.hears
    if not trained:
        return None
    return [record.name for record in earlier if record.instrument in trained] or None


def _heard_in(original: Manifest, record: LayerRecord, copy: Manifest) -> dict[str, str]:
    """`record.conditioned_on` in terms of `copy`'s takes: an earlier layer heard in the take the
    original still has is heard in the copy's take of it, with the recorded pick and gain."""
    out = {}
    for name, state in record.conditioned_on.items():
        if name == "<context>" or name not in original.layer_names or name not in copy.layer_names:
            continue
        take, picked, gain = parse_state(state)
        if take == original.layer(name).take:
            out[name] = f"{copy.layer(name).take}.{picked}" + ("" if gain is None else f" {gain:+g} dB")
    return out


def _reproducible(manifest: Manifest, record: LayerRecord) -> bool:
    """Whether every layer `record` heard is still in the take it heard."""
    for name, state in record.conditioned_on.items():
        if name == "<context>":
            if manifest.context is None or state != manifest.context.sha256:
                return False
        elif name not in manifest.layer_names or parse_state(state)[0] != manifest.layer(name).take:
            return False
    return True
