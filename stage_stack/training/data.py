"""Multi-stem datasets and STAGE training pairs (reference §5), at audio level.

Layout (MoisesDB's, as the synthetic band writes it):

    root/<song_id>/<stem>/*.wav     one folder per stem; several WAVs in a folder are summed
                                    (zero-padded to the longest), multichannel is averaged
    root/<song_id>/metadata.json    SongMetadata (our synthetic band), or
    root/<song_id>/features.json    STAGE's per-song features (bpm, genres, moods, ...), and
    root/<song_id>/beatthis.npz     optional arrays `beats`, `downbeats` (seconds); they win

A `StemDataset` item is one STAGE pair, built as the upstream `StemmedDataset` does:

    1. coins: speed (p 0.5, uniform [0.8, 1.2] rounded to 0.01, a *time ratio*: 1.2 = 20 %
       longer) and pitch (p 0.5, integer semitones in [-4, 4]);
    2. a random window of segment/speed seconds where the target stem and at least one other
       stem are audible (peak >= 0.01), retried up to `max_tries` times;
    3. context = sum of a random non-empty subset of the other audible stems, or with p 0.5 a
       click track on the song's beats in the window (times scaled by the speed factor; the
       click itself is never stretched or pitch-shifted);
    4. resample to `sample_rate` (soxr), then the same speed and pitch applied to target and
       stem context with Rubber Band (pedalboard, R3 engine), then pad/crop to exactly
       `segment_seconds`;
    5. context length: the full segment with p 0.05, else uniform in `context_seconds`; the crop
       keeps the beginning, so the context stays aligned with the start of the target.

Bad songs (unreadable WAV, stems of different lengths or rates, missing target stem, no other
stem, invalid metadata, silence everywhere) are skipped with a logged warning and counted in
`dataset.skipped`; an epoch never stops on them. Header-level problems are found when the
dataset is built (in the main process, so the counts are exact); decoding errors and silence
are found while sampling, and then each DataLoader worker counts its own.

Differences from upstream, on purpose: silence is tested on the absolute peak (upstream uses
the signed maximum), and there is no 2 s Rubber Band timeout.
"""

from __future__ import annotations

import json
import logging
import os
import reprlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..audio import click_track, read_audio, resample
from ..errors import StageStackError

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"  # ours (SongMetadata)
FEATURES_FILE = "features.json"  # STAGE's prepared MoisesDB songs
BEATS_FILE = "beatthis.npz"  # Beat This tracker output: arrays `beats`, `downbeats`
AUDIO_SUFFIXES = (".wav", ".flac")
EXCLUDED_STEMS = ("vocals",)  # STAGE never puts vocals in a context


class DatasetError(StageStackError):
    """A dataset folder or a song's metadata cannot be used."""


# -- metadata ---------------------------------------------------------------------------------

class ChordSpan(BaseModel):
    """One chord over [start, end) seconds; `root` and `pitch_classes` are 0..11 with C = 0."""

    model_config = ConfigDict(extra="forbid")
    name: str
    root: int = Field(ge=0, le=11)
    pitch_classes: list[int] = Field(min_length=1)
    start: float = Field(ge=0)
    end: float
    bar: int = Field(ge=0)

    @field_validator("pitch_classes")
    @classmethod
    def _pitch_classes(cls, v: list[int]) -> list[int]:
        if any(not 0 <= pc <= 11 for pc in v):
            raise ValueError(f"pitch classes must be integers 0..11, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ChordSpan":
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if self.root not in self.pitch_classes:
            raise ValueError(f"root {self.root} is not among pitch_classes {self.pitch_classes}")
        return self


class SongMetadata(BaseModel):
    """Per-song metadata. Our synthetic songs fill every field; MoisesDB-like songs need only
    `bpm` or `beats`. Unknown keys are ignored, because STAGE's features.json carries many
    essentia features this library does not use."""

    model_config = ConfigDict(extra="ignore")

    bpm: float | None = Field(default=None, gt=0, le=400)
    time_signature: tuple[int, int] = (4, 4)
    first_beat: float = Field(default=0.0, ge=0)  # where a bpm-derived beat grid starts (s)
    key: str | None = None
    beats: list[float] | None = None  # seconds
    downbeats: list[float] | None = None  # seconds
    chords: list[ChordSpan] = Field(default_factory=list)
    genres: list[str] = Field(default_factory=list)
    moods: list[str] = Field(default_factory=list)
    description: str = ""
    seed: int | None = None
    duration: float | None = Field(default=None, gt=0)
    sample_rate: int | None = Field(default=None, gt=0)
    stems: list[str] = Field(default_factory=list)
    generator: str | None = None

    @field_validator("genres", "moods", mode="before")
    @classmethod
    def _split_tags(cls, v):
        if isinstance(v, str):  # STAGE's features.json: "rock, pop"
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("key", mode="before")
    @classmethod
    def _key_text(cls, v):
        if isinstance(v, (list, tuple)):  # e.g. ["A", "minor"]
            return " ".join(str(x) for x in v)
        return v

    @field_validator("beats", "downbeats")
    @classmethod
    def _sorted_times(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(t < 0 for t in v) or any(b < a for a, b in zip(v, v[1:]))):
            raise ValueError("times must be non-negative seconds in increasing order")
        return v

    @field_validator("time_signature")
    @classmethod
    def _meter(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] not in (1, 2, 4, 8, 16):
            raise ValueError(f"expected [beats per bar, note value] such as [4, 4], got {list(v)}")
        return v

    @model_validator(mode="after")
    def _has_tempo(self) -> "SongMetadata":
        if self.bpm is None and not self.beats:
            raise ValueError("needs 'bpm' (a number) or 'beats' (a list of seconds) to place the click track")
        return self

    def beat_grid(self, duration: float) -> tuple[np.ndarray, np.ndarray]:
        """(beats, downbeats) in seconds. Missing beats come from bpm, starting at `first_beat`;
        missing downbeats are every `time_signature[0]`-th beat, the first beat being one."""
        per_bar = self.time_signature[0]
        if self.beats:
            beats = np.asarray(self.beats, dtype=np.float64)
        else:
            beats = np.arange(self.first_beat, duration - 1e-9, 60.0 / self.bpm)
        if self.downbeats is not None:
            downbeats = np.asarray(self.downbeats, dtype=np.float64)
        else:
            downbeats = beats[::per_bar]
        return beats, downbeats

    def text(self) -> str:
        """The text condition: `description`, else STAGE's "Genre(s): ... Mood(s): ..." form."""
        return self.description or describe(self.genres, self.moods)


def describe(genres: list[str], moods: list[str]) -> str:
    """STAGE's description: the first three genres and moods, plural label when more than one."""
    parts = []
    for label, tags in (("Genre", genres[:3]), ("Mood", moods[:3])):
        if tags:
            parts.append(f"{label}{'s' if len(tags) > 1 else ''}: {', '.join(tags)}. ")
    return "".join(parts)


def _format_validation(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "missing":
            lines.append(f"  field '{field}': required but missing")
            continue
        got = "" if not err["loc"] else f" (got {reprlib.repr(err['input'])})"
        lines.append(f"  field '{field}': {err['msg']}{got}")
    return "\n".join(lines)


def load_song_metadata(song_dir: str | os.PathLike) -> SongMetadata:
    """Read metadata.json (or features.json) plus beatthis.npz; DatasetError names file and field."""
    song_dir = Path(song_dir)
    data: dict = {}
    source = None
    for name in (METADATA_FILE, FEATURES_FILE):
        if (song_dir / name).is_file():
            source = song_dir / name
            try:
                data = json.loads(source.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DatasetError(f"{source}: not valid JSON ({e}); rewrite it (see SongMetadata)") from None
            if not isinstance(data, dict):
                raise DatasetError(f"{source}: expected a JSON object with at least 'bpm', got {type(data).__name__}")
            break
    if (song_dir / BEATS_FILE).is_file():
        try:
            with np.load(song_dir / BEATS_FILE) as npz:
                data["beats"] = npz["beats"].astype(float).tolist()
                if "downbeats" in npz:
                    data["downbeats"] = npz["downbeats"].astype(float).tolist()
        except (OSError, ValueError, KeyError) as e:
            raise DatasetError(f"{song_dir / BEATS_FILE}: expected an npz with arrays 'beats' and 'downbeats' "
                               f"in seconds ({e})") from None
        source = source or song_dir / BEATS_FILE
    if source is None:
        raise DatasetError(f"{song_dir}: no {METADATA_FILE}, {FEATURES_FILE} or {BEATS_FILE}; write a "
                           f"{METADATA_FILE} with at least {{\"bpm\": 120}}")
    try:
        return SongMetadata.model_validate(data)
    except ValidationError as e:
        raise DatasetError(f"{source}: invalid song metadata:\n{_format_validation(e)}") from None


# -- songs on disk ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SongSource:
    """A song whose headers were checked: every stem has the same rate and length."""

    song_id: str
    folder: Path
    stems: dict[str, tuple[Path, ...]]  # stem -> audio files, summed
    metadata: SongMetadata
    sample_rate: int
    num_frames: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate


class BadSong(Exception):
    """A song cannot be used; `reason` is the key it is counted under in `skipped`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _stem_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()))


def inspect_song(folder: Path, stems: tuple[str, ...] | None = None,
                 exclude_stems: tuple[str, ...] = EXCLUDED_STEMS, required: tuple[str, ...] = ()) -> SongSource:
    """Check one song folder from headers only; raises BadSong naming the problem."""
    import soundfile as sf

    try:
        metadata = load_song_metadata(folder)
    except DatasetError as e:
        raise BadSong("bad_metadata", str(e)) from None
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name in exclude_stems or (stems is not None and sub.name not in stems):
            continue
        files = _stem_files(sub)
        if files:
            found[sub.name] = files
    for stem in required:
        if stem not in found:
            raise BadSong("missing_stem", f"{folder}: no audio in stem folder '{stem}/' (found {sorted(found)})")
    if len(found) < 2:
        raise BadSong("no_context_stems", f"{folder}: needs at least two stems, found {sorted(found)}")
    rates, lengths = {}, {}
    for stem, files in found.items():
        frames = []
        for path in files:
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                raise BadSong("unreadable", f"{path}: unreadable audio ({e}); re-export it as WAV") from None
            rates[path] = info.samplerate
            frames.append(info.frames)
        lengths[stem] = max(frames)  # files of one stem are zero-padded to the longest
    if len(set(rates.values())) > 1:
        raise BadSong("sample_rate_mismatch", f"{folder}: stems have different sample rates "
                      f"{ {str(p.relative_to(folder)): r for p, r in rates.items()} }; resample them to one rate")
    if len(set(lengths.values())) > 1:
        raise BadSong("length_mismatch", f"{folder}: stems have different lengths in samples {lengths}; "
                      "stems of one song must be sample-aligned and equally long")
    return SongSource(folder.name, folder, found, metadata, next(iter(rates.values())), next(iter(lengths.values())))


def scan_songs(root: str | os.PathLike, stems: tuple[str, ...] | None = None,
               exclude_stems: tuple[str, ...] = EXCLUDED_STEMS,
               required: tuple[str, ...] = ()) -> tuple[list[SongSource], Counter, dict[str, str]]:
    """Every usable song under `root`, sorted by name, plus (skip counts, song -> reason text)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; write one with "
                           "stage_stack.training.synth.write_dataset or point to a MoisesDB-style folder")
    songs, skipped, reasons = [], Counter(), {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            songs.append(inspect_song(folder, stems, exclude_stems, required))
        except BadSong as e:
            skipped[e.reason] += 1
            reasons[folder.name] = str(e)
            log.warning("skipping song %s (%s): %s", folder.name, e.reason, e)
    return songs, skipped, reasons


def read_stem(song: SongSource, stem: str, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) of a stem at the song's rate, mono, zero-padded past the end."""
    out = np.zeros(stop - start, dtype=np.float32)
    for path in song.stems[stem]:
        try:
            audio, _ = read_audio(path, start=start, stop=stop)
        except Exception as e:  # soundfile raises several types; any decode failure makes the song bad
            raise BadSong("unreadable", f"{path}: cannot decode frames {start}..{stop} ({e})") from None
        out[: audio.size] += audio
    return out


def peak(audio: np.ndarray) -> float:
    return float(np.abs(audio).max()) if audio.size else 0.0


# -- augmentation -----------------------------------------------------------------------------

def augment(audio: np.ndarray, sample_rate: int, speed: float = 1.0, pitch: float = 0.0,
            high_quality: bool = True) -> np.ndarray:
    """Rubber Band time stretch and pitch shift of each row of `audio` [signals, samples].

    `speed` is STAGE's time ratio (1.2 = 20 % longer, i.e. slower); `pitch` is in semitones.
    Every row gets the same settings in its own stretcher call: the offline stretcher's time
    map depends only on the ratio, so target and context stay aligned, and neither leaks into
    the other (one multichannel call couples the channels: a bass processed beside drums comes
    out different from the bass alone). The default is Rubber Band's R3 engine: the faster R2
    engine (STAGE's ENGINE_FASTER) misses the pitch by up to 12 cents when it stretches and
    shifts at once (440 Hz + 3 semitones at ratio 1.2 gives 519.6 Hz, not 523.3 Hz).
    """
    if speed == 1.0 and pitch == 0:
        return audio
    from pedalboard import time_stretch

    rows = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1, audio.shape[-1])
    out = [time_stretch(row[None], float(sample_rate), stretch_factor=1.0 / speed,
                        pitch_shift_in_semitones=float(pitch), high_quality=high_quality)[0] for row in rows]
    return np.stack(out).reshape(*audio.shape[:-1], -1)


def require_pedalboard() -> None:
    """Fail before the first epoch, not in the middle of one, when augmentation cannot run."""
    try:
        import pedalboard  # noqa: F401
    except ImportError:
        raise StageStackError("speed/pitch augmentation needs pedalboard (Rubber Band): "
                              "pip install 'stage-stack[train]', or set speed_prob=0 and pitch_prob=0") from None


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Crop or zero-pad the last axis to `length`."""
    if audio.shape[-1] >= length:
        return audio[..., :length]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, length - audio.shape[-1])]
    return np.pad(audio, pad)


def draw_augmentation(rng: np.random.Generator, speed: tuple[float, float], speed_prob: float,
                      pitch: tuple[int, int], pitch_prob: float) -> tuple[float, int]:
    """STAGE's coins: (time ratio rounded to 0.01 or 1.0, semitones or 0)."""
    s = round(float(rng.uniform(*speed)), 2) if rng.random() < speed_prob else 1.0
    p = int(rng.integers(pitch[0], pitch[1] + 1)) if rng.random() < pitch_prob else 0
    return s, p


# -- pairs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairInfo:
    song_id: str
    offset_seconds: float  # window start in the original song
    speed: float  # time ratio applied (1.0 = none)
    pitch: int  # semitones applied (0 = none)
    context_kind: Literal["stems", "click"]
    context_stems: tuple[str, ...]  # the stems summed into the context (empty for a click)
    context_seconds: float
    variant: int = 0  # the pre-tokenized variant (token cache only; 0 = as recorded)


@dataclass(frozen=True)
class TrainingPair:
    context: np.ndarray  # float32 [context samples], 5..10 s
    target: np.ndarray  # float32 [segment samples]
    description: str
    sample_rate: int
    info: PairInfo


class StemDataset:
    """STAGE training pairs from a MoisesDB-style folder (see the module docstring).

    Map-style, usable with torch's DataLoader (it has `__len__` and `__getitem__`). Item `i` of
    epoch `e` is drawn from song `i mod n_songs` with a generator seeded by (seed, e, i), so it
    is the same whatever the worker count or order; call `set_epoch` each epoch for new draws.
    `split` takes the reference's split: songs sorted by name, the last `n_valid` are "valid",
    the rest "train" ("all" keeps every song).
    """

    def __init__(self, root: str | os.PathLike, target_stem: str, sample_rate: int = 32000,
                 segment_seconds: float = 10.0, context_seconds: tuple[float, float] = (5.0, 10.0),
                 full_context_prob: float = 0.05, click_prob: float = 0.5,
                 speed: tuple[float, float] = (0.8, 1.2), speed_prob: float = 0.5,
                 pitch: tuple[int, int] = (-4, 4), pitch_prob: float = 0.5,
                 stems: tuple[str, ...] | None = None, exclude_stems: tuple[str, ...] = EXCLUDED_STEMS,
                 split: Literal["all", "train", "valid"] = "all", n_valid: int = 24,
                 samples_per_epoch: int | None = None, silence_threshold: float = 0.01, max_tries: int = 10,
                 seed: int = 0) -> None:
        if not 0 < context_seconds[0] <= context_seconds[1] <= segment_seconds:
            raise ValueError(f"context_seconds must satisfy 0 < min <= max <= segment_seconds "
                             f"({segment_seconds}), got {context_seconds}")
        if split not in ("all", "train", "valid"):
            raise ValueError(f"split must be 'all', 'train' or 'valid', got {split!r}")
        self.root, self.target_stem, self.sample_rate = Path(root), target_stem, sample_rate
        self.segment_seconds, self.context_seconds = segment_seconds, tuple(context_seconds)
        self.full_context_prob, self.click_prob = full_context_prob, click_prob
        self.speed, self.speed_prob, self.pitch, self.pitch_prob = tuple(speed), speed_prob, tuple(pitch), pitch_prob
        self.silence_threshold, self.max_tries, self.seed, self.epoch = silence_threshold, max_tries, seed, 0

        if speed_prob > 0 or pitch_prob > 0:
            require_pedalboard()
        songs, self.skipped, self.skip_reasons = scan_songs(self.root, stems, exclude_stems, required=(target_stem,))
        if split == "valid":
            songs = songs[-n_valid:] if n_valid else []
        elif split == "train":
            songs = songs[: len(songs) - n_valid]
        if not songs:
            raise DatasetError(f"{self.root}: no usable songs with a '{target_stem}' stem for split '{split}' "
                               f"(skipped: {dict(self.skipped) or 'none'}; n_valid={n_valid})")
        self.songs: list[SongSource] = songs
        self.samples_per_epoch = samples_per_epoch or len(songs)
        self._bad: set[str] = set()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> TrainingPair:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for attempt in range(len(self.songs)):
            song = self.songs[(index + attempt) % len(self.songs)]
            if song.song_id in self._bad:
                continue
            try:
                return self.make_pair(song, rng)
            except BadSong as e:
                self._bad.add(song.song_id)
                self.skipped[e.reason] += 1
                self.skip_reasons[song.song_id] = str(e)
                log.warning("skipping song %s (%s): %s", song.song_id, e.reason, e)
        raise DatasetError(f"{self.root}: every song was skipped ({dict(self.skipped)}); see the warnings above")

    # -- one pair -----------------------------------------------------------------------------
    def _audible_window(self, song: SongSource, rng: np.random.Generator, window: int):
        others = [s for s in song.stems if s != self.target_stem]
        for _ in range(self.max_tries):
            offset = int(rng.integers(0, max(song.num_frames - window, 0) + 1))
            target = read_stem(song, self.target_stem, offset, offset + window)
            if peak(target) < self.silence_threshold:
                continue
            audio = {s: read_stem(song, s, offset, offset + window) for s in others}
            audible = [s for s in others if peak(audio[s]) >= self.silence_threshold]
            if audible:
                return offset, target, audio, audible
        raise BadSong("silent", f"{song.folder}: no {window / song.sample_rate:.1f} s window with an audible "
                      f"'{self.target_stem}' and another audible stem in {self.max_tries} tries")

    def make_pair(self, song: SongSource, rng: np.random.Generator) -> TrainingPair:
        sr, n_out = self.sample_rate, int(round(self.segment_seconds * self.sample_rate))
        speed, pitch = draw_augmentation(rng, self.speed, self.speed_prob, self.pitch, self.pitch_prob)
        window = int(np.ceil(self.segment_seconds * song.sample_rate / speed))
        offset, target, stem_audio, audible = self._audible_window(song, rng, window)
        chosen = sorted(rng.choice(audible, size=int(rng.integers(1, len(audible) + 1)), replace=False).tolist())
        use_click = rng.random() < self.click_prob

        if use_click:  # the click is made at the output rate from beat times, never stretched
            start, end = offset / song.sample_rate, (offset + window) / song.sample_rate

            def in_window(times: np.ndarray) -> np.ndarray:
                return (times[(times >= start) & (times < end)] - start) * speed

            beats, downbeats = song.metadata.beat_grid(song.duration)
            context = click_track(in_window(beats), in_window(downbeats), sr, n_out)
            target = fit_length(augment(resample(target, song.sample_rate, sr)[None], sr, speed, pitch)[0], n_out)
        else:
            both = np.stack([target, np.sum([stem_audio[s] for s in chosen], axis=0)])
            both = fit_length(augment(resample(both, song.sample_rate, sr), sr, speed, pitch), n_out)
            target, context = both[0], both[1]

        lo, hi = (int(round(s * sr)) for s in self.context_seconds)
        context_len = n_out if rng.random() < self.full_context_prob else int(rng.integers(lo, hi + 1))
        context = np.ascontiguousarray(context[:context_len], dtype=np.float32)
        info = PairInfo(song.song_id, offset / song.sample_rate, speed, pitch, "click" if use_click else "stems",
                        () if use_click else tuple(chosen), context.size / sr)
        return TrainingPair(context, np.ascontiguousarray(target, dtype=np.float32), song.metadata.text(), sr, info)


def collate_pairs(pairs: list[TrainingPair]) -> dict:
    """DataLoader collate: targets stacked [B, 1, T]; contexts stay a list of [1, C_i] (lengths differ)."""
    import torch

    return {
        "target": torch.stack([torch.from_numpy(p.target)[None] for p in pairs]),
        "context": [torch.from_numpy(p.context)[None] for p in pairs],
        "description": [p.description for p in pairs],
        "info": [p.info for p in pairs],
    }
