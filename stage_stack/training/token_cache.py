"""Pre-tokenized STAGE pairs: encode each song once with the codec, then sample pairs as codes.

On a CPU, encoding 20 s of audio with the codec costs more than a training step of a small LM,
so `pretokenize` encodes every song a few times up front and `TokenPairDataset` builds the
training pairs from the stored codes with `data.StemDataset`'s recipe at frame resolution.

Augmentation moves to pre-tokenization: variant 0 of a song is the song as recorded; variants
1.. have the recipe's speed and/or pitch change (never neither) applied to all stems in one
Rubber Band call. The sampler picks variant 0 with `identity_prob` (0.25 = the recipe's chance
of neither coin), else one of the others, so a few variants approximate the recipe.

    out_dir/index.json                       TokenCacheIndex (codec, frame rate, entries)
    out_dir/<song_id>/variant_<k>.safetensors
        codes.<stem>        [n_q, F] int16   every stem
        codes.<a>+<b>...    [n_q, F] int16   context mixes (sums of stems), see below
        codes.@click        [n_q, F] int16   the click track of the whole variant
        peaks               [n_stems, F] f32 per-frame absolute peak of each stem

Codes of a sum of stems are not a function of the stems' codes, so the mixes are encoded as
well: for each target stem, every non-empty subset of the other stems when there are at most
`max_mixes_per_target` of them (all 7 for a 4-piece band), else that many random subsets.
A crop of a song's codes stands in for the codes of the cropped audio; the codec's receptive
field makes their first and last frames differ a little, which training tolerates.
"""

from __future__ import annotations

import itertools
import logging
import os
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..atomic import atomic_path, atomic_write_text
from ..chords import NO_CHORD, chord_class
from ..locks import exclusive
from ..audio import click_track, resample
from .data import (EXCLUDED_STEMS, BadSong, ChordSpan, DatasetError, PairInfo, SongSource, StemDataset, augment,
                   draw_augmentation, load_song_metadata, read_stem, require_pedalboard, scan_songs)

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX_FILE = "index.json"
CLICK = "@click"


class CacheEntry(BaseModel):
    """One encoded variant of one song."""

    model_config = ConfigDict(extra="forbid")
    song_id: str
    variant: int = Field(ge=0)
    file: str  # relative to the cache folder
    speed: float  # time ratio applied to the audio (1.0 = none)
    pitch: int  # semitones applied (0 = none)
    stems: list[str]  # row order of `peaks`
    mixes: list[str]  # encoded context mixes of two or more stems, "a+b" with sorted names
    n_frames: int = Field(ge=0)
    beats: list[float]  # seconds in the variant's time (scaled by speed)
    downbeats: list[float]
    description: str


class TokenCacheIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = CACHE_VERSION
    codec_config: dict
    sample_rate: int
    frame_rate: float
    n_q: int
    card: int
    entries: list[CacheEntry] = Field(default_factory=list)
    skipped: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> "TokenCacheIndex":
        path = Path(cache_dir) / INDEX_FILE
        if not path.is_file():
            raise DatasetError(f"{path}: no token cache index; build the cache with "
                               "stage_stack.training.token_cache.pretokenize")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            fields = "\n".join(f"  field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors())
            raise DatasetError(f"{path}: invalid token cache index:\n{fields}\nRebuild the cache with pretokenize "
                               "(overwrite=True).") from None


def mix_name(stems) -> str:
    return "+".join(sorted(stems))


def context_mixes(stems: list[str], target_stems: list[str], max_mixes_per_target: int,
                  rng: np.random.Generator) -> list[str]:
    """Names of the multi-stem mixes to encode so that every target has its contexts."""
    wanted: set[str] = set()
    for target in target_stems:
        others = [s for s in stems if s != target]
        subsets = [c for k in range(1, len(others) + 1) for c in itertools.combinations(others, k)]
        if len(subsets) > max_mixes_per_target:
            subsets = [subsets[i] for i in sorted(rng.choice(len(subsets), max_mixes_per_target, replace=False))]
        wanted.update(mix_name(s) for s in subsets if len(s) > 1)
    return sorted(wanted)


def frame_peaks(audio: np.ndarray, hop: int, n_frames: int) -> np.ndarray:
    """[channels, samples] -> [channels, n_frames] absolute peak per codec frame."""
    padded = np.zeros((audio.shape[0], n_frames * hop), dtype=np.float32)
    n = min(audio.shape[1], n_frames * hop)
    padded[:, :n] = np.abs(audio[:, :n])
    return padded.reshape(audio.shape[0], n_frames, hop).max(axis=2)


def encode(codec, audio: np.ndarray, chunk_seconds: float = 30.0, batch_size: int = 8) -> np.ndarray:
    """[signals, samples] -> codes [signals, n_q, ceil(samples / hop)], encoded in chunks of
    whole frames so that long songs fit in memory."""
    import torch

    hop = codec.config.hop_length
    chunk = max(1, int(chunk_seconds * codec.config.sample_rate) // hop) * hop
    device = next(codec.parameters()).device
    rows = []
    for b in range(0, audio.shape[0], batch_size):
        pieces = []
        for c in range(0, audio.shape[1], chunk):
            x = torch.from_numpy(np.ascontiguousarray(audio[b : b + batch_size, c : c + chunk]))[:, None].to(device)
            pieces.append(codec.encode(x).cpu().numpy())
        rows.append(np.concatenate(pieces, axis=-1))
    return np.concatenate(rows)


def _song_rng(seed: int, song_id: str, stream: int) -> np.random.Generator:
    """Draws for one song that do not depend on which other songs the folder holds."""
    return np.random.default_rng([seed, zlib.crc32(song_id.encode()), stream])


def pretokenize(source: str | os.PathLike | StemDataset, codec, out_dir: str | os.PathLike, *, variants: int = 4,
                target_stems: list[str] | None = None, max_mixes_per_target: int = 7,
                speed: tuple[float, float] = (0.8, 1.2), pitch: tuple[int, int] = (-4, 4),
                stems: tuple[str, ...] | None = None, exclude_stems: tuple[str, ...] = EXCLUDED_STEMS,
                seed: int = 0, chunk_seconds: float = 30.0, batch_size: int = 8, overwrite: bool = False,
                progress: bool = False) -> TokenCacheIndex:
    """Encode every song of `source` (a dataset folder, or a StemDataset's songs) into `out_dir`.

    Resumable: the index is rewritten after every song, and a variant it lists whose file exists
    is kept unless `overwrite`. Only the codec config is compared with the existing cache: use a
    new folder when you change the other settings. `target_stems` limits which targets get their
    context mixes (default: every stem). Bad songs are skipped and counted in `skipped`.
    Two processes building one cache take turns on `out_dir/.pretokenize.lock`: the second
    waits, then keeps what the first wrote.
    """
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    if variants > 1:
        require_pedalboard()
    if isinstance(source, StemDataset):
        songs, skipped = list(source.songs), Counter(source.skipped)
    else:
        songs, skipped, _ = scan_songs(source, stems, exclude_stems)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir / ".pretokenize.lock", f"the token cache {out_dir}", wait=True):
        return _pretokenize(songs, skipped, codec, out_dir, variants, target_stems, max_mixes_per_target, speed,
                            pitch, seed, chunk_seconds, batch_size, overwrite, progress)


def _pretokenize(songs, skipped, codec, out_dir: Path, variants, target_stems, max_mixes_per_target, speed, pitch,
                 seed, chunk_seconds, batch_size, overwrite, progress) -> TokenCacheIndex:
    cfg = codec.config
    index = TokenCacheIndex(codec_config=cfg.to_dict(), sample_rate=cfg.sample_rate, frame_rate=cfg.frame_rate,
                            n_q=cfg.n_q, card=cfg.card)
    entries: dict[tuple[str, int], CacheEntry] = {}  # what the index lists, kept current for resuming
    if (out_dir / INDEX_FILE).is_file() and not overwrite:
        old = TokenCacheIndex.load(out_dir)
        if old.codec_config != index.codec_config:
            raise DatasetError(f"{out_dir}: the cache was built with another codec config; use a new folder "
                               "or overwrite=True")
        entries = {(e.song_id, e.variant): e for e in old.entries if (out_dir / e.file).is_file()}

    def write_index(keep) -> None:
        index.entries = sorted((e for key, e in entries.items() if keep(key)), key=lambda e: (e.song_id, e.variant))
        index.skipped = dict(skipped)
        atomic_write_text(out_dir / INDEX_FILE, index.model_dump_json(indent=1))

    iterator = songs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(songs, desc="pretokenize", unit="song")
    for song in iterator:
        todo = [k for k in range(variants) if overwrite or (song.song_id, k) not in entries]
        if not todo:
            continue
        try:
            new = _encode_song(song, codec, out_dir, todo, target_stems, max_mixes_per_target, speed, pitch, seed,
                               chunk_seconds, batch_size)
        except BadSong as e:
            skipped[e.reason] += 1
            log.warning("skipping song %s (%s): %s", song.song_id, e.reason, e)
            continue
        entries.update(((e.song_id, e.variant), e) for e in new)
        write_index(lambda key: True)
    wanted = {(song.song_id, k) for song in songs for k in range(variants)}
    write_index(lambda key: key in wanted)
    return index


def _encode_song(song: SongSource, codec, out_dir: Path, variants: list[int], target_stems, max_mixes_per_target,
                 speed, pitch, seed, chunk_seconds, batch_size) -> list[CacheEntry]:
    from safetensors.numpy import save_file

    cfg = codec.config
    dtype = np.int16 if cfg.card <= np.iinfo(np.int16).max else np.int32
    sr, hop = cfg.sample_rate, cfg.hop_length
    names = sorted(song.stems)
    audio = np.stack([read_stem(song, s, 0, song.num_frames) for s in names])
    audio = resample(audio, song.sample_rate, sr)
    beats, downbeats = song.metadata.beat_grid(song.duration)
    targets = [t for t in (target_stems or names) if t in names]
    mixes = context_mixes(names, targets, max_mixes_per_target, _song_rng(seed, song.song_id, 0))
    entries = []
    for k in variants:
        factors = (1.0, 0)
        rng = _song_rng(seed, song.song_id, 1 + k)
        while k > 0 and factors == (1.0, 0):  # variants > 0 always change something
            factors = draw_augmentation(rng, speed, 0.5, pitch, 0.5)
        s, p = factors
        stretched = augment(audio, sr, s, p)
        length = stretched.shape[1]
        n_frames = -(-length // hop)
        scaled = [t[t * s < length / sr] * s for t in (beats, downbeats)]
        signals = [stretched[i] for i in range(len(names))]
        signals += [stretched[[names.index(x) for x in m.split("+")]].sum(axis=0) for m in mixes]
        signals.append(click_track(scaled[0], scaled[1], sr, length))
        codes = encode(codec, np.stack(signals).astype(np.float32), chunk_seconds, batch_size)[..., :n_frames]
        keys = names + mixes + [CLICK]
        entry = CacheEntry(song_id=song.song_id, variant=k, file=f"{song.song_id}/variant_{k}.safetensors",
                           speed=s, pitch=p, stems=names, mixes=mixes, n_frames=n_frames,
                           beats=[round(float(t), 6) for t in scaled[0]],
                           downbeats=[round(float(t), 6) for t in scaled[1]], description=song.metadata.text())
        tensors = {f"codes.{key}": np.ascontiguousarray(codes[i].astype(dtype)) for i, key in enumerate(keys)}
        tensors["peaks"] = frame_peaks(stretched, hop, n_frames)
        path = out_dir / entry.file
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a unique temp name: never a file someone else made
            save_file(tensors, str(tmp), metadata={"entry": entry.model_dump_json()})
        entries.append(entry)
    return entries


# -- sampling pairs from the cache ------------------------------------------------------------

@dataclass(frozen=True)
class TokenPair:
    context_codes: np.ndarray  # int64 [n_q, context frames]
    target_codes: np.ndarray  # int64 [n_q, segment frames]
    description: str
    frame_rate: float
    info: PairInfo  # offset_seconds is in the variant's (augmented) time
    # float32 [segment frames] in [0, 1]: the rise of the target stem's per-frame peak, scaled by
    # the pair's largest rise (its onsets; what `loss.onset_weight` weighs the loss with)
    target_onsets: np.ndarray | None = None
    # int64 [n_q, segment frames]: the target stem through the context codec, when the pairs
    # come from two caches (what `dropout.self_context` copies into the context)
    target_as_context: np.ndarray | None = None
    # float32 [segment frames, 12]: the pitch classes of the song's chord at each target frame, and
    # bool [segment frames]: where a chord is annotated (`chord_labels=True`; `loss.harmony_weight`)
    target_chords: np.ndarray | None = None
    target_chords_known: np.ndarray | None = None
    # int64 [segment frames]: each target frame's bin within its beat (bin 0 centred on the beat),
    # and bool [segment frames]: where the frame lies between two beats (`beat_labels=True`)
    target_beat_phase: np.ndarray | None = None
    target_beat_known: np.ndarray | None = None
    # int64 [segment frames]: each target frame's chord class, for an expert's chord stream
    # (`chord_labels=True`; stage_stack.chords)
    target_chord_class: np.ndarray | None = None


class TokenPairDataset:
    """STAGE pairs as codes from a `pretokenize` cache: `StemDataset`'s recipe in frames.

    Item `i` of epoch `e` comes from song `i mod n_songs` with a generator seeded by
    (seed, e, i). Silence is judged from the stored per-frame peaks; the stem context is a
    stored mix whose stems are all audible in the window, drawn as upstream draws subsets
    (a size uniform in 1..n audible, then a subset of that size) among the mixes stored.
    Songs shorter than one segment are skipped and counted in `skipped`.

    `context_cache_dir`: a cache of the same songs, variants and settings built with a second
    codec (an expert with a separate context codec): contexts are read from there, targets from
    `cache_dir`, at the same offsets.

    `all_stems_prob` (not in STAGE's recipe): the chance that a stem context is the largest stored
    mix of audible stems instead of upstream's draw, for an expert that must hear a dense mix.

    `context_stems` (not in STAGE's recipe): the only stems a stem context may hold, for an expert
    meant to hear chosen layers (a bass that follows the keys); None = every other stem.

    `chord_labels` (not in STAGE's recipe): each pair also carries the chord of every target frame,
    read from the song's metadata.json in `source` and moved by the variant's speed and pitch.
    `beat_labels` (not in STAGE's recipe): the same for where each target frame falls in its beat.
    """

    def __init__(self, cache_dir: str | os.PathLike, target_stem: str, segment_seconds: float = 10.0,
                 context_seconds: tuple[float, float] = (5.0, 10.0), full_context_prob: float = 0.05,
                 click_prob: float = 0.5, identity_prob: float = 0.25,
                 split: Literal["all", "train", "valid"] = "all", n_valid: int = 24,
                 samples_per_epoch: int | None = None, silence_threshold: float = 0.01, max_tries: int = 10,
                 seed: int = 0, source: str | os.PathLike | None = None,
                 context_cache_dir: str | os.PathLike | None = None, all_stems_prob: float = 0.0,
                 context_stems: tuple[str, ...] | None = None, chord_labels: bool = False,
                 beat_labels: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.source = Path(source) if source is not None else None  # the songs folder the cache was built from
        self.index = TokenCacheIndex.load(self.cache_dir)
        self.target_stem, self.frame_rate = target_stem, self.index.frame_rate
        self.segment_frames = int(round(segment_seconds * self.frame_rate))
        self.context_frames = tuple(int(round(s * self.frame_rate)) for s in context_seconds)
        if not 0 < self.context_frames[0] <= self.context_frames[1] <= self.segment_frames:
            raise ValueError(f"context_seconds must satisfy 0 < min <= max <= segment_seconds, got {context_seconds}")
        self.full_context_prob, self.click_prob, self.identity_prob = full_context_prob, click_prob, identity_prob
        if not 0.0 <= all_stems_prob <= 1.0:
            raise ValueError(f"all_stems_prob must be in [0, 1], got {all_stems_prob}")
        self.all_stems_prob = all_stems_prob
        if context_stems is not None and (not context_stems or target_stem in context_stems):
            raise ValueError(f"context_stems must name at least one stem other than the target "
                             f"'{target_stem}', got {list(context_stems)}")
        self.context_stems = None if context_stems is None else tuple(context_stems)
        self.silence_threshold, self.max_tries, self.seed, self.epoch = silence_threshold, max_tries, seed, 0
        self.skipped: Counter = Counter()
        by_song: dict[str, list[CacheEntry]] = defaultdict(list)
        for entry in self.index.entries:
            if target_stem in entry.stems:
                by_song[entry.song_id].append(entry)
        songs = sorted(by_song)
        songs = songs[-n_valid:] if split == "valid" else songs[: len(songs) - n_valid] if split == "train" else songs
        if not songs:
            if self.source is not None:
                total = len(by_song)
                what = (f"holds no song with a '{target_stem}' stem" if total == 0 else
                        f"has {total} song(s) with a '{target_stem}' stem, none left for the '{split}' split "
                        f"(n_valid is {n_valid})")
                raise DatasetError(f"{self.source}: the training data folder {what}. Put song folders there (each "
                                   f"with {target_stem}.wav and the other stems; see docs), or point data.root at "
                                   f"the right folder (token cache: {self.cache_dir})")
            raise DatasetError(f"{self.cache_dir}: no cached songs with a '{target_stem}' stem for split '{split}'")
        self.songs = [sorted(by_song[s], key=lambda e: e.variant) for s in songs]
        self.context_cache_dir = None if context_cache_dir is None else Path(context_cache_dir)
        if self.context_cache_dir is not None:
            self._check_context_cache(TokenCacheIndex.load(self.context_cache_dir))
        self.samples_per_epoch = samples_per_epoch or len(self.songs)
        self._bad: set[str] = set()
        self.chords: dict[str, list[ChordSpan]] | None = {} if chord_labels else None
        self.beats: dict[str, np.ndarray] | None = {} if beat_labels else None
        if chord_labels or beat_labels:
            self._read_labels()

    def _read_labels(self) -> None:
        """Every used song's chords and/or beats, read once, so a song without them fails before
        training."""
        which = " and ".join(name for name, on in (("chord labels (loss.harmony_weight, a chord stream)",
                                                     self.chords is not None),
                                                    ("beat labels (loss.beat_weight)", self.beats is not None)) if on)
        if self.source is None:
            raise DatasetError(f"{self.cache_dir}: {which} need the songs folder the cache was built from "
                               "(data.root), for each song's metadata.json")
        for variants in self.songs:
            song_id = variants[0].song_id
            metadata = load_song_metadata(self.source / song_id)
            if self.chords is not None:
                if not metadata.chords:
                    raise DatasetError(f"{self.source / song_id}: metadata.json has no 'chords'; loss.harmony_weight "
                                       "and an expert's chord stream need a chord per bar in every song ([{name, "
                                       "root, pitch_classes, start, end, bar}], seconds), or set "
                                       "loss.harmony_weight: 0 and train without a chord stream")
                self.chords[song_id] = sorted(metadata.chords, key=lambda c: c.start)
            if self.beats is not None:
                entry = variants[0]
                beats, _ = metadata.beat_grid(entry.n_frames / self.frame_rate / entry.speed)
                if len(beats) < 2:
                    raise DatasetError(f"{self.source / song_id}: metadata.json gives {len(beats)} beat(s); "
                                       "loss.beat_weight needs at least two ('beats' in seconds, or 'bpm'), "
                                       "or set loss.beat_weight: 0")
                self.beats[song_id] = beats

    def _check_context_cache(self, other: TokenCacheIndex) -> None:
        """The context cache must hold every used variant with the same augmentation and length."""
        theirs = {(e.song_id, e.variant): e for e in other.entries}
        if other.frame_rate != self.frame_rate or other.n_q != self.index.n_q:
            raise DatasetError(f"{self.context_cache_dir}: the context cache has {other.frame_rate} frames/s and "
                               f"{other.n_q} codebooks, the target cache ({self.cache_dir}) {self.frame_rate} and "
                               f"{self.index.n_q}: the two codecs must share the frame grid")
        for variants in self.songs:
            for e in variants:
                t = theirs.get((e.song_id, e.variant))
                same = t is not None and (t.speed, t.pitch, t.n_frames, t.mixes) == (e.speed, e.pitch, e.n_frames,
                                                                                      e.mixes)
                if not same:
                    what = "is missing" if t is None else (f"differs (speed {t.speed}/{e.speed}, pitch {t.pitch}/"
                                                           f"{e.pitch}, frames {t.n_frames}/{e.n_frames})")
                    raise DatasetError(f"{self.context_cache_dir}: song {e.song_id} variant {e.variant} {what} in the "
                                       f"context cache, against {self.cache_dir}. Build both caches from the same "
                                       "songs with the same data settings (variants, speed, pitch, mixes)")

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> TokenPair:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for attempt in range(len(self.songs)):
            variants = self.songs[(index + attempt) % len(self.songs)]
            if variants[0].song_id in self._bad:
                continue
            try:
                return self.make_pair(variants, rng)
            except BadSong as e:
                self._bad.add(variants[0].song_id)
                self.skipped[e.reason] += 1
                log.warning("skipping cached song %s (%s): %s", variants[0].song_id, e.reason, e)
        raise DatasetError(f"{self.cache_dir}: every song was skipped ({dict(self.skipped)})")

    def _pick_variant(self, variants: list[CacheEntry], rng: np.random.Generator) -> CacheEntry:
        plain = [v for v in variants if v.variant == 0]
        augmented = [v for v in variants if v.variant > 0]
        if plain and (not augmented or rng.random() < self.identity_prob):
            return plain[0]
        return augmented[int(rng.integers(len(augmented)))]

    def make_pair(self, variants: list[CacheEntry], rng: np.random.Generator) -> TokenPair:
        from safetensors import safe_open

        entry = self._pick_variant(variants, rng)
        path = self.cache_dir / entry.file
        if entry.n_frames < self.segment_frames:
            raise BadSong("too_short", f"{path}: {entry.n_frames} frames, shorter than one segment "
                          f"({self.segment_frames})")
        try:
            with safe_open(str(path), framework="numpy") as f:
                if self.context_cache_dir is None:
                    return self._pair_from(entry, f, rng)
                with safe_open(str(self.context_cache_dir / entry.file), framework="numpy") as g:
                    return self._pair_from(entry, f, rng, g)
        except BadSong:
            raise
        except Exception as e:  # missing or corrupt file: the song is unusable, the epoch goes on
            raise BadSong("unreadable", f"{path}: cannot read cached codes ({e}); rerun pretokenize") from None

    def _pair_from(self, entry: CacheEntry, f, rng: np.random.Generator, context_file=None) -> TokenPair:
        """A pair from one variant's file `f`; the context's codes from `context_file` when given."""
        T = self.segment_frames
        row = entry.stems.index(self.target_stem)
        others = [s for s in entry.stems if s != self.target_stem
                  and (self.context_stems is None or s in self.context_stems)]
        peaks = f.get_tensor("peaks")
        for _ in range(self.max_tries):
            offset = int(rng.integers(0, entry.n_frames - T + 1))
            window = peaks[:, offset : offset + T].max(axis=1)
            audible = [s for s in others if window[entry.stems.index(s)] >= self.silence_threshold]
            if window[row] >= self.silence_threshold and audible:
                break
        else:
            which = "another audible stem" if self.context_stems is None else (
                "an audible stem of " + "+".join(self.context_stems))
            raise BadSong("silent", f"{entry.file}: no window with an audible '{self.target_stem}' and {which} "
                          f"in {self.max_tries} tries")

        use_click = rng.random() < self.click_prob
        if use_click:
            key, chosen = CLICK, ()
        else:
            stored = [tuple(m.split("+")) for m in entry.mixes] + [(s,) for s in others]
            usable = [m for m in stored if self.target_stem not in m and set(m) <= set(audible)]
            size = int(rng.integers(1, len(audible) + 1))
            # drawn only when asked for, so that runs without it keep upstream's random stream
            if self.all_stems_prob and rng.random() < self.all_stems_prob:
                size = max(len(m) for m in usable)
            pool = [m for m in usable if len(m) == size] or usable
            chosen = pool[int(rng.integers(len(pool)))]
            key = mix_name(chosen)
        lo, hi = self.context_frames
        length = T if rng.random() < self.full_context_prob else int(rng.integers(lo, hi + 1))
        heard = f if context_file is None else context_file
        context = heard.get_slice(f"codes.{key}")[:, offset : offset + length].astype(np.int64)
        target = f.get_slice(f"codes.{self.target_stem}")[:, offset : offset + T].astype(np.int64)
        as_context = None
        if context_file is not None:
            as_context = context_file.get_slice(f"codes.{self.target_stem}")[:, offset : offset + T].astype(np.int64)
        info = PairInfo(entry.song_id, offset / self.frame_rate, entry.speed, entry.pitch,
                        "click" if use_click else "stems", tuple(chosen), length / self.frame_rate, entry.variant)
        chords = known = classes = None
        if self.chords is not None:
            spans = self.chords[entry.song_id]
            chords, known = chord_frames(spans, offset, T, self.frame_rate, entry.speed, entry.pitch)
            classes = chord_class_frames(spans, offset, T, self.frame_rate, entry.speed, entry.pitch)
        phase = on_grid = None
        if self.beats is not None:
            phase, on_grid = beat_phase_frames(self.beats[entry.song_id], offset, T, self.frame_rate, entry.speed)
        return TokenPair(context, target, entry.description, self.frame_rate, info,
                         onset_strength(peaks[row], offset, T), as_context, chords, known, phase, on_grid, classes)


def chord_frames(chords: list[ChordSpan], offset: int, n_frames: int, frame_rate: float, speed: float,
                 pitch: int) -> tuple[np.ndarray, np.ndarray]:
    """([n_frames, 12] float32 multi-hot, [n_frames] bool) for frames offset.. of a variant.

    A variant is the song stretched by `speed` (a time ratio) and moved `pitch` semitones, so its
    frame f sounds the song's chord at (f + 0.5) / frame_rate / speed, `pitch` semitones up.
    Frames outside every chord span are not known (all zeros).
    """
    at, known = _chord_at(chords, offset, n_frames, frame_rate, speed)
    table = np.zeros((len(chords), 12), dtype=np.float32)
    for i, c in enumerate(chords):
        table[i, [(pc + pitch) % 12 for pc in c.pitch_classes]] = 1.0
    labels = np.where(known[:, None], table[at], 0.0).astype(np.float32)
    return labels, known


def chord_class_frames(chords: list[ChordSpan], offset: int, n_frames: int, frame_rate: float, speed: float,
                       pitch: int) -> np.ndarray:
    """int64 [n_frames]: each frame's chord class (stage_stack.chords; NO_CHORD outside every
    chord span), for an expert's chord stream; frames and moves as in `chord_frames`."""
    at, known = _chord_at(chords, offset, n_frames, frame_rate, speed)
    table = np.array([chord_class((c.root + pitch) % 12, [(pc + pitch) % 12 for pc in c.pitch_classes])
                      for c in chords], dtype=np.int64)
    return np.where(known, table[at], NO_CHORD).astype(np.int64)


def _chord_at(chords: list[ChordSpan], offset: int, n_frames: int, frame_rate: float,
              speed: float) -> tuple[np.ndarray, np.ndarray]:
    """(index into `chords` (0 where unknown), known) of frames offset.. of a variant."""
    times = (offset + np.arange(n_frames) + 0.5) / frame_rate / speed
    starts = np.array([c.start for c in chords])
    ends = np.array([c.end for c in chords])
    at = np.searchsorted(starts, times, side="right") - 1
    known = (at >= 0) & (times < ends[np.clip(at, 0, None)])
    return np.clip(at, 0, None), known


BEAT_PHASE_BINS = 4  # a frame's place in its beat, for `loss.beat_weight` (bin 0 on the beat)


def beat_phase_frames(beats: np.ndarray, offset: int, n_frames: int, frame_rate: float, speed: float,
                      bins: int = BEAT_PHASE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """([n_frames] int64 bin, [n_frames] bool known) for frames offset.. of a variant.

    Frame f sounds song time (f + 0.5) / frame_rate / speed; its phase is the fraction of the way
    from the beat before to the beat after, moved by half a bin so that bin 0 is centred on the
    beat (a frame just before a beat belongs to it). Frames before the first beat or after the
    last are not known (bin 0).
    """
    beats = np.asarray(beats, dtype=np.float64)
    times = (offset + np.arange(n_frames) + 0.5) / frame_rate / speed
    at = np.searchsorted(beats, times, side="right") - 1
    known = (at >= 0) & (at < len(beats) - 1)
    lo = beats[np.clip(at, 0, len(beats) - 2)]
    hi = beats[np.clip(at + 1, 1, len(beats) - 1)]
    phase = (times - lo) / np.maximum(hi - lo, 1e-9)
    labels = np.floor((phase + 0.5 / bins) * bins).astype(np.int64) % bins
    return np.where(known, labels, 0).astype(np.int64), known


def onset_strength(peaks: np.ndarray, offset: int, n_frames: int) -> np.ndarray:
    """[n_frames] float32 in [0, 1]: how much a stem's per-frame peak rises into each frame of
    peaks[offset : offset + n_frames] (from the frame before the window), over the largest rise."""
    before = peaks[offset - 1 : offset] if offset > 0 else peaks[offset : offset + 1]
    rise = np.maximum(np.diff(np.concatenate([before, peaks[offset : offset + n_frames]])), 0.0)
    top = float(rise.max()) if rise.size else 0.0
    return (rise / top if top > 0 else rise).astype(np.float32)


def collate_token_pairs(pairs: list[TokenPair]) -> dict:
    """targets [B, n_q, T] (long); contexts a list of [n_q, C_i] for TokenLayout.left_pad; each
    optional per-frame array stacked, or None unless every pair has it."""
    import torch

    def stacked(name: str):
        arrays = [getattr(p, name) for p in pairs]
        return None if any(a is None for a in arrays) else torch.stack([torch.from_numpy(a) for a in arrays])

    return {
        "target": torch.stack([torch.from_numpy(p.target_codes) for p in pairs]),
        "context": [torch.from_numpy(p.context_codes) for p in pairs],
        "description": [p.description for p in pairs],
        "info": [p.info for p in pairs],
        **{name: stacked(name) for name in ("target_onsets", "target_as_context", "target_chords",
                                            "target_chords_known", "target_beat_phase", "target_beat_known",
                                            "target_chord_class")},
    }
