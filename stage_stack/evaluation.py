"""Quality evaluation: STAGE's protocol at small scale, on held-out synthetic songs (issue 5, §6).

Protocol (`evaluate`)

    held-out songs  song i of n is `generate_song(EVAL_SEED_BASE + i, bpm=held_out_tempos(n)[i])`
                    at the expert's sample rate: seeds from 10_000 up and tempos at the midpoints
                    of n equal bins of [80, 160] BPM, moved off whole numbers. The demo experts'
                    songs have seeds `song_seed(0 or 1, i)` (32-bit hashes; a test checks that
                    they never fall in the evaluation range) and whole-number tempos, so neither
                    a song nor a tempo of the evaluation was seen in training.
    tasks           one per expert, chosen by the expert's instrument; every context is built as
                    training builds it (`training/data.py`):
        drums       from a click: the song's click track (beats, accented downbeats) -> beat F1
                    against the click's beats;
                    in context: the sum of the song's other stems -> rhythmic F1
        bass, lead  the sum of the other stems -> rhythmic F1 and chord-tone share (one pitch
                    class per note)
        keys        the same, with several pitch classes per note (chords)
        ablation    a drums expert trained without click pairs, from a click -> beat F1; the
                    paired difference with the drums expert says whether click pairs help.
    references      every metric is also computed on the song's real stem (what the metric gives
                    the data the experts learned from: its ceiling on this band) and on the real
                    stem encoded and decoded by the expert's codec (the best the expert can sound:
                    a gap between the two is the codec's, not the language model's).

Metrics

    beat F1         beats estimated from the audio alone by librosa's dynamic-programming
                    tracker, compared with the reference beats by `mir_eval.beat.f_measure`
                    (+-70 ms), after dropping beats before 5 s as `mir_eval.beat.evaluate` does
                    (trackers need a few seconds to lock on; so does a stem that starts without
                    a prompt). Two settings differ from librosa's defaults, measured on the real
                    stems of 20 held-out 10 s songs:
                      - a 16 ms hop instead of 512 samples (32 ms at 16 kHz), whose coarse tempo
                        grid lets the beats drift out of the window within 10 s
                        (real drums 0.80 -> 0.86);
                      - onset strength averaged over mel bands instead of the median, which is
                        ~0 for a bass or keys stem whose energy sits in a few bands
                        (real bass 0.27 -> 0.55);
                      - only the mel bands below 2 kHz (kick, snare and bass bodies): above it
                        hi-hats on every 8th or 16th and the demo codec's hiss pull the tempo
                        estimate to the wrong periodicity (real drums 0.86 -> 0.88, real drums
                        through the demo codec 0.64 -> 0.71).
                    The remaining misses on real drums are genuine tracker errors on this music:
                    funk kicks every three 16ths read as a 4/3 tempo, and above ~145 BPM the
                    half tempo wins librosa's prior centred on 120 BPM.
    rhythmic F1     the beat F1 of a stem against the beats of the context it was generated on.
    chord-tone      share of the stem's notes whose pitch class is in the context's chord
    share           sounding 50 ms after the note's onset (so a note detected just before a chord
                    change belongs to the new chord). Notes: onsets from the same envelope; a
                    note spans [onset + 30 ms, min(next onset, onset + 0.4 s)), skipping the
                    broadband attack; its pitch classes come from the mean constant-Q chroma over
                    the span: the strongest class (monophonic) or every class within 0.6 of the
                    strongest (polyphonic). Spans 35 dB below the stem's loudest frame (reverb
                    tails, codec noise) are not notes. A stem with no notes scores 0.
                    On the real stems: bass 0.98 and keys 0.98; the same notes at random
                    pitches: 0.23 (tests/test_evaluation.py checks these).

librosa and mir_eval are the `eval` extra; they are imported when a metric runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .audio import click_track, write_audio
from .errors import StageStackError
from .layer import BEAT_SOURCES, CHORD_SOURCES, BeatSource, ChordSource, source_problem
from .training.data import ChordSpan
from .training.synth import SCALES, STEMS, Song, generate_song, parse_key

if TYPE_CHECKING:
    from .expert import ExpertMetadata
    from .generation import SamplingParams

EVAL_SEED_BASE = 10_000
TEMPO_RANGE = (80.0, 160.0)  # the synthetic band's range
BEAT_TRIM_SECONDS = 5.0  # mir_eval.beat.evaluate's default
ANALYSIS_HOP_SECONDS = 0.016
BEAT_TRACKING_FMAX = 2000.0  # Hz, the top of the mel bands the beat tracker listens to
CHORD_LOOKAHEAD_SECONDS = 0.05
NOTE_ATTACK_SKIP_SECONDS = 0.03
NOTE_MAX_SECONDS = 0.4
CHORD_RELATIVE_THRESHOLD = 0.6
NOTE_GATE_DB = -35.0

# How each stem of the band is analysed: drums have beats only; pitched stems have notes.
NOTE_ANALYSIS = {"drums": None, "bass": "mono", "lead": "mono", "keys": "poly"}

# The targets (issue 12).
TARGET_DRUMS_FROM_CLICK_F1 = 0.8
TARGET_TEMPO_SHARE = 0.9  # of songs whose drums are played within TEMPO_TOLERANCE of the click
TEMPO_TOLERANCE = 0.04
TARGET_DRUMS_IN_CONTEXT_F1 = 0.7
TARGET_BASS_CHORD_TONE_SHARE = 0.6
TARGET_KEYS_CHORD_TONE_SHARE = 0.6

FROM_CLICK = "drums from a click"
ABLATION = "drums (no click pairs) from a click"

ProgressCallback = Callable[[str, int, int], None]  # (task, songs done, songs total)


class EvaluationError(StageStackError):
    """The evaluation cannot run with these experts or settings."""


def _librosa():
    try:
        import librosa
    except ImportError as e:
        raise EvaluationError("evaluation needs librosa and mir_eval: pip install 'stage-stack[eval]'") from e
    return librosa


def _mir_eval():
    try:
        import mir_eval
    except ImportError as e:
        raise EvaluationError("evaluation needs librosa and mir_eval: pip install 'stage-stack[eval]'") from e
    return mir_eval


# -- held-out data ----------------------------------------------------------------------------

def held_out_tempos(n: int, low: float = TEMPO_RANGE[0], high: float = TEMPO_RANGE[1]) -> list[float]:
    """n tempos spread over [low, high]: bin midpoints, never a whole number (training tempos are)."""
    if n < 1:
        raise ValueError(f"the number of tempos must be >= 1, got {n}")
    tempos = []
    for i in range(n):
        bpm = round(low + (high - low) * (i + 0.5) / n, 2)
        tempos.append(bpm + 0.5 if bpm == int(bpm) else bpm)
    return tempos


def held_out_songs(n: int, duration: float, sample_rate: int, seed_base: int = EVAL_SEED_BASE) -> list[Song]:
    """The protocol's songs. Tempos depend on n: 4 songs are not the first 4 of 20."""
    return [generate_song(seed_base + i, duration, sample_rate, bpm=bpm) for i, bpm in enumerate(held_out_tempos(n))]


def click_context(song: Song) -> np.ndarray:
    """The song's metronome as training makes it: clicks on the beats, accented downbeats."""
    n = song.stems["drums"].size
    return click_track(song.metadata.beats, song.metadata.downbeats, song.sample_rate, n)


def stems_context(song: Song, target: str, stems: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """(sum of the song's stems other than `target`, or of `stems`, their names joined with '+')."""
    others = [s for s in STEMS if s != target] if stems is None else list(stems)
    return np.sum([song.stems[s] for s in others], axis=0).astype(np.float32), "+".join(others)


# What an in-context task hears instead of its own song's stems: the controls that tell how much
# of a score comes from listening (`EvalSettings.context_source`).
CONTEXT_SOURCES = ("song", "other-song", "silence")


def parse_stems(text: str) -> tuple[str, ...]:
    """'drums, keys' -> ("drums", "keys"): a command line's stem list, as `context_stems` takes it."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def control_context(songs: Sequence[Song], index: int, target: str, source: str,
                    stems: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """The context song `index` is generated over: its own stems, the next held-out song's (other
    key, chords and tempo; cut or zero-padded to this song's length), or silence."""
    audio, name = stems_context(songs[index], target, stems)
    if source == "song":
        return audio, name
    if source == "silence":
        return np.zeros_like(audio), "silence"
    if source == "other-song":
        other = stems_context(songs[(index + 1) % len(songs)], target, stems)[0][: audio.size]
        out = np.zeros_like(audio)
        out[: other.size] = other
        return out, f"another song's {name}"
    raise EvaluationError(f"context_source must be one of {', '.join(CONTEXT_SOURCES)}, got {source!r}")


# -- beats ------------------------------------------------------------------------------------

def _hop(sample_rate: int) -> int:
    return max(1, round(ANALYSIS_HOP_SECONDS * sample_rate))


def _onset_envelope(audio: np.ndarray, sample_rate: int, fmax: float | None = None) -> np.ndarray:
    # The mean over mel bands (librosa's beat tracker uses the median; see the module docstring).
    return _librosa().onset.onset_strength(y=np.asarray(audio, dtype=np.float32), sr=sample_rate,
                                           hop_length=_hop(sample_rate), fmax=fmax)


def estimate_beats(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Beat times (s) of `audio` [samples], from the audio alone."""
    librosa = _librosa()
    hop = _hop(sample_rate)
    envelope = _onset_envelope(audio, sample_rate, fmax=min(BEAT_TRACKING_FMAX, sample_rate / 2))
    _, beats = librosa.beat.beat_track(onset_envelope=envelope, sr=sample_rate, hop_length=hop, units="time")
    return np.asarray(beats, dtype=np.float64)


def beat_f1(reference_beats: Sequence[float], estimated_beats: Sequence[float],
            trim_seconds: float = BEAT_TRIM_SECONDS) -> float:
    """mir_eval's beat F-measure (+-70 ms) of the beats at or after `trim_seconds`."""
    mir_eval = _mir_eval()
    reference = mir_eval.beat.trim_beats(np.asarray(reference_beats, dtype=np.float64), trim_seconds)
    estimated = mir_eval.beat.trim_beats(np.asarray(estimated_beats, dtype=np.float64), trim_seconds)
    if reference.size == 0:
        raise ValueError(f"no reference beat at or after {trim_seconds} s: use a longer excerpt or a shorter trim")
    if estimated.size == 0:
        return 0.0  # mir_eval says the same, with a warning
    return float(mir_eval.beat.f_measure(reference, estimated))


def stem_beat_f1(audio: np.ndarray, sample_rate: int, reference_beats: Sequence[float],
                 trim_seconds: float = BEAT_TRIM_SECONDS) -> float:
    """Beat F1 of the beats tracked in `audio` against `reference_beats`."""
    return beat_f1(reference_beats, estimate_beats(audio, sample_rate), trim_seconds)


def played_tempo(beats: Sequence[float]) -> float | None:
    """BPM from tracked beat times: 60 / the median inter-beat interval (None with < 2 beats)."""
    beats = np.asarray(beats, dtype=np.float64)
    if beats.size < 2:
        return None
    return float(60.0 / np.median(np.diff(beats)))


def tempo_matches(played: float | None, bpm: float, tolerance: float = TEMPO_TOLERANCE) -> bool:
    """Played within `tolerance` (relative) of `bpm`; half or double time does not count."""
    return played is not None and abs(played - bpm) <= tolerance * bpm


# -- notes and chords -------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectedNote:
    onset: float  # seconds
    pitch_classes: tuple[int, ...]  # 0..11, C = 0


def detect_notes(audio: np.ndarray, sample_rate: int, polyphonic: bool) -> list[DetectedNote]:
    """Notes of a pitched stem: onsets, then chroma over each note's span (see the module docstring)."""
    librosa = _librosa()
    audio = np.asarray(audio, dtype=np.float32)
    hop = _hop(sample_rate)
    envelope = _onset_envelope(audio, sample_rate)
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=sample_rate, hop_length=hop, units="time")
    if len(onsets) == 0:
        return []
    # tuning=0: the band (and every context) is at A440, so a detuned note is a wrong note.
    chroma = librosa.feature.chroma_cqt(y=audio, sr=sample_rate, hop_length=hop, norm=None, tuning=0.0)
    loudness = librosa.feature.rms(y=audio, frame_length=4 * hop, hop_length=hop)[0]
    frames = min(chroma.shape[1], loudness.size)
    times = librosa.frames_to_time(np.arange(frames), sr=sample_rate, hop_length=hop)
    floor = float(loudness.max()) * 10 ** (NOTE_GATE_DB / 20)
    ends = list(onsets[1:]) + [audio.size / sample_rate]
    notes = []
    for onset, next_onset in zip(onsets, ends):
        span = (times >= onset + NOTE_ATTACK_SKIP_SECONDS) & (times < min(next_onset, onset + NOTE_MAX_SECONDS))
        if not span.any() or loudness[:frames][span].mean() <= floor:
            continue
        profile = chroma[:, :frames][:, span].mean(axis=1)
        if polyphonic:
            classes = np.flatnonzero(profile >= CHORD_RELATIVE_THRESHOLD * profile.max())
        else:
            classes = [int(profile.argmax())]
        notes.append(DetectedNote(float(onset), tuple(int(c) for c in classes)))
    return notes


@dataclass(frozen=True)
class ChordToneCount:
    notes: int  # pitch classes counted (a chord of 3 counts 3)
    chord_tones: int

    @property
    def share(self) -> float | None:
        return self.chord_tones / self.notes if self.notes else None


def chord_at(chords: Sequence[ChordSpan], time_s: float) -> ChordSpan | None:
    for chord in chords:
        if chord.start <= time_s < chord.end:
            return chord
    return None


def chord_tone_count(notes: Sequence[DetectedNote], chords: Sequence[ChordSpan],
                     lookahead: float = CHORD_LOOKAHEAD_SECONDS) -> ChordToneCount:
    """How many detected pitch classes belong to the chord sounding `lookahead` s after their onset.

    Notes outside every chord span (after the song's end) are not counted.
    """
    counted = in_chord = 0
    for note in notes:
        chord = chord_at(chords, note.onset + lookahead) or chord_at(chords, note.onset)
        if chord is None:
            continue
        counted += len(note.pitch_classes)
        in_chord += sum(pc in chord.pitch_classes for pc in note.pitch_classes)
    return ChordToneCount(counted, in_chord)


def stem_chord_tones(audio: np.ndarray, sample_rate: int, chords: Sequence[ChordSpan],
                     instrument: str) -> ChordToneCount:
    analysis = NOTE_ANALYSIS.get(instrument)
    if analysis is None:
        raise ValueError(f"{instrument!r} has no pitched notes to compare with chords")
    return chord_tone_count(detect_notes(audio, sample_rate, polyphonic=analysis == "poly"), chords)


@dataclass
class StemScore:
    """The metrics of one stem of one song."""

    f1: float  # beat F1 (from a click) or rhythmic F1 (in context)
    chord_tone_share: float | None = None  # pitched stems only; 0 when no note was detected
    notes: int | None = None  # pitch classes counted for the share
    tempo: float | None = None  # the tempo the tracker reads in the stem (BPM)
    tempo_match: float | None = None  # 1.0 when `tempo` is within TEMPO_TOLERANCE of the song's, else 0.0
    # pitched stems: the share of those pitch classes in the song's scale (chance 7/12). A stem
    # with few chord tones but most notes in key follows the key and misses the chords; one near
    # 7/12 does not follow the song's key at all.
    in_key_share: float | None = None


def in_key_share(notes: Sequence[DetectedNote], key: str) -> float | None:
    """The share of the notes' pitch classes in `key`'s scale ("A minor"); None without notes."""
    root, mode = parse_key(key)
    scale = {(root + step) % 12 for step in SCALES[mode]}
    pitch_classes = [pc for note in notes for pc in note.pitch_classes]
    return float(np.mean([pc in scale for pc in pitch_classes])) if pitch_classes else None


def score_stem(audio: np.ndarray, sample_rate: int, instrument: str, beats: Sequence[float],
               chords: Sequence[ChordSpan], trim_seconds: float = BEAT_TRIM_SECONDS,
               bpm: float | None = None, key: str | None = None) -> StemScore:
    tracked = estimate_beats(audio, sample_rate)
    score = StemScore(beat_f1(beats, tracked, trim_seconds))
    if bpm is not None:
        score.tempo = played_tempo(tracked)
        score.tempo_match = float(tempo_matches(score.tempo, bpm))
    analysis = NOTE_ANALYSIS[instrument]
    if analysis is not None:
        notes = detect_notes(audio, sample_rate, polyphonic=analysis == "poly")
        tones = chord_tone_count(notes, chords)
        # A stem without a single note has no chord tones: it scores 0, not "no score".
        score.chord_tone_share = 0.0 if tones.share is None else tones.share
        score.notes = tones.notes
        if key:
            score.in_key_share = in_key_share(notes, key)
    return score


# -- the protocol -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSettings:
    n_tempos: int = 20
    duration: float = 10.0  # seconds generated per song
    seed_base: int = EVAL_SEED_BASE  # song i has seed seed_base + i; its generation seed is the same
    trim_seconds: float = BEAT_TRIM_SECONDS
    # None: each expert's own sampling (ExpertMetadata.sampling, what the Arranger uses), else the
    # reference's (generation.SamplingParams); a value here overrides it for every expert.
    cfg_coef: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    chord_temperature: float | None = None  # experts with a chord stream only
    # Where an expert with a chord stream takes its chords from (Layer.chords): None is what the
    # Arranger does by default ("heard" over a song's stems, "own" from a click).
    chords: ChordSource | None = None
    # Whether the drums hear a click on the beats heard in the song's stems instead of the stems
    # (Layer.beats); None: what the Arranger does by default with the installed registry.
    beats: BeatSource | None = None
    drums_in_context: bool = True  # also generate drums on the other stems (rhythmic F1)
    # The experts' weight format. fp32, not the Arranger's "auto", so that scores compare across
    # machines (auto is int8 on some CPUs and fp32 on others); quality.py --dtype auto scores what users get.
    dtype: str = "fp32"
    # Controls for the in-context tasks: whose stems they hear (CONTEXT_SOURCES) and which of
    # them (None: every stem but the target's; held-out songs have drums, bass, keys and lead).
    context_source: str = "song"
    context_stems: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.context_source not in CONTEXT_SOURCES:
            raise EvaluationError(f"context_source must be one of {', '.join(CONTEXT_SOURCES)}, "
                                  f"got {self.context_source!r}")
        if self.context_stems is not None:
            unknown = sorted(set(self.context_stems) - set(STEMS))
            if unknown or not self.context_stems:
                raise EvaluationError(f"context_stems must name stems of the held-out songs ({', '.join(STEMS)}), "
                                      f"got {list(self.context_stems)}")
        if self.n_tempos < 1:
            raise EvaluationError(f"the number of tempos must be >= 1, got {self.n_tempos}")
        # A beat every 0.75 s at 80 BPM: ask for two of them after the trim.
        if self.duration < self.trim_seconds + 1.5:
            raise EvaluationError(f"duration ({self.duration} s) must be at least 1.5 s longer than the beat trim "
                                  f"({self.trim_seconds} s), so every song keeps beats to score")
        if self.trim_seconds < 0:
            raise EvaluationError(f"trim_seconds must be >= 0, got {self.trim_seconds}")
        if self.temperature is not None and self.temperature <= 0:
            raise EvaluationError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise EvaluationError(f"top_k must be >= 0 (0 = sample from every code), got {self.top_k}")
        for name, choices in (("beats", BEAT_SOURCES), ("chords", CHORD_SOURCES)):
            problem = source_problem(name, getattr(self, name), choices)
            if problem:
                raise EvaluationError(problem)
        if self.chord_temperature is not None and self.chord_temperature < 0:
            raise EvaluationError(f"chord_temperature must be >= 0 (0 = the likeliest chord), "
                                  f"got {self.chord_temperature}")


SOURCES = ("generated", "real", "real_coded")
METRICS = ("f1", "chord_tone_share", "tempo_match", "in_key_share")  # the StemScore fields averaged per task


@dataclass
class SongScore:
    seed: int
    bpm: float
    key: str
    generated: StemScore  # the expert's stem
    real: StemScore  # the song's own stem: what the metric gives the training data
    real_coded: StemScore  # the song's stem through the expert's codec: the best the expert can sound
    seconds: float = 0.0  # generation time


@dataclass
class TaskResult:
    name: str  # e.g. "drums from a click"
    instrument: str
    expert: str  # path
    context: str  # "click" or the stems summed, e.g. "drums+keys+lead"
    metric: str  # "beat F1" or "rhythmic F1"
    songs: list[SongScore] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)  # the SamplingParams generation used
    chords: ChordSource | None = None  # an expert with a chord stream: where its chords came from (Layer.chords)
    beats: BeatSource | None = None  # whether it heard a click on the beats heard in the stems (Layer.beats)

    def mean(self, metric: str, source: str = "generated") -> float | None:
        """Mean of `metric` ("f1" or "chord_tone_share") of `source` (one of SOURCES) over the songs."""
        values = [getattr(getattr(s, source), metric) for s in self.songs]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict:
        means = {source: {metric: self.mean(metric, source) for metric in METRICS}
                 for source in SOURCES}
        return {"name": self.name, "instrument": self.instrument, "expert": self.expert, "context": self.context,
                "metric": self.metric, "songs": len(self.songs), "sampling": self.sampling, "chords": self.chords,
                "beats": self.beats, "mean": means,
                "generation_seconds": round(sum(s.seconds for s in self.songs), 2)}


@dataclass
class PairedComparison:
    """Per-song difference of `with_` minus `without` and its 95% bootstrap interval."""

    with_mean: float
    without_mean: float
    difference: float
    ci95: tuple[float, float]
    wins: int  # songs where the first scores higher
    losses: int

    @property
    def helps(self) -> bool:
        return self.ci95[0] > 0


def paired_comparison(with_: Sequence[float], without: Sequence[float], resamples: int = 10_000,
                      seed: int = 0) -> PairedComparison:
    a, b = np.asarray(with_, dtype=np.float64), np.asarray(without, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equally long, non-empty score lists, got {a.size} and {b.size}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedComparison(float(a.mean()), float(b.mean()), float(diff.mean()), (float(low), float(high)),
                            int((diff > 0).sum()), int((diff < 0).sum()))


@dataclass
class Target:
    description: str
    value: float | None
    threshold: str
    met: bool | None  # None: the task did not run
    signed: bool = False  # a difference: shown with its sign


@dataclass
class EvalReport:
    settings: EvalSettings
    tempos: list[float]
    experts: dict[str, dict]  # role -> {path, instrument, sha256}
    tasks: list[TaskResult]
    ablation: PairedComparison | None
    targets: list[Target]
    seconds: float

    def task(self, name: str) -> TaskResult | None:
        return next((t for t in self.tasks if t.name == name), None)

    def to_dict(self) -> dict:
        ablation = None
        if self.ablation is not None:
            ablation = {**asdict(self.ablation), "helps": self.ablation.helps}
        return {
            "settings": asdict(self.settings),
            "tempos": self.tempos,
            "experts": self.experts,
            "summary": [t.summary() for t in self.tasks],
            "ablation": ablation,
            "targets": [asdict(t) for t in self.targets],
            "tasks": [{**t.summary(), "per_song": [asdict(s) for s in t.songs]} for t in self.tasks],
            "seconds": round(self.seconds, 1),
        }

    def table(self) -> str:
        """A Markdown table of the task means, then the targets."""

        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines = ["| task | context | songs | metric | generated | real stem | real, coded "
                 "| chord tones: generated | real stem | real, coded "
                 f"| tempo within {TEMPO_TOLERANCE:.0%}: generated | real stem | real, coded "
                 "| in key: generated | real stem | real, coded |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in self.tasks:
            cells = [" | ".join(cell(t.mean(metric, source)) for source in SOURCES)
                     for metric in METRICS]
            context = t.context + (f" (chords {t.chords})" if t.chords else "") + \
                (" (beats heard: a click)" if t.beats == "heard" else "")
            lines.append(f"| {t.name} | {context} | {len(t.songs)} | {t.metric} | {' | '.join(cells)} |")
        lines.append("")
        for target in self.targets:
            verdict = {True: "met", False: "MISSED", None: "not run"}[target.met]
            value = "-" if target.value is None else f"{target.value:{'+' if target.signed else ''}.2f}"
            lines.append(f"- {target.description}: {value} (target {target.threshold}): {verdict}")
        if self.ablation is not None:
            a = self.ablation
            lines.append(f"- ablation: beat F1 {a.with_mean:.2f} with click pairs, {a.without_mean:.2f} without; "
                         f"difference {a.difference:+.2f}, 95% CI [{a.ci95[0]:+.2f}, {a.ci95[1]:+.2f}]; "
                         f"better on {a.wins} songs, worse on {a.losses}")
        return "\n".join(lines)


def _load(path: str | Path, dtype: str = "fp32"):
    from .expert import load_expert, sha256_file

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"expert file not found: {path}")
    expert = load_expert(path, dtype=dtype)
    return expert, {"path": str(path), "instrument": expert.instrument, "sha256": sha256_file(path),
                    "weight_format": expert.weight_format}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


class _Protocol:
    """Runs tasks on the held-out songs; songs and reference scores are computed once."""

    def __init__(self, settings: EvalSettings, progress: ProgressCallback | None, audio_dir: Path | None) -> None:
        self.settings = settings
        self.progress = progress
        self.audio_dir = audio_dir
        # the installed registry says which instruments are pitched (Layer.chords, Layer.beats)
        self.registry = _installed_registry()
        self.overrides = {k: v for k, v in (("cfg_coef", settings.cfg_coef), ("temperature", settings.temperature),
                                            ("top_k", settings.top_k),
                                            ("chord_temperature", settings.chord_temperature)) if v is not None}
        self._songs: dict[int, list[Song]] = {}
        self._references: dict[tuple, StemScore] = {}

    def params_for(self, metadata: ExpertMetadata) -> SamplingParams:
        """What an expert generates with: its own sampling (what the Arranger uses), with the
        settings' explicit values over it."""
        return replace(metadata.sampling_params(), **self.overrides)

    def songs(self, sample_rate: int) -> list[Song]:
        if sample_rate not in self._songs:
            s = self.settings
            self._songs[sample_rate] = held_out_songs(s.n_tempos, s.duration, sample_rate, s.seed_base)
        return self._songs[sample_rate]

    def score(self, audio: np.ndarray, song: Song, instrument: str) -> StemScore:
        return score_stem(audio, song.sample_rate, instrument, song.metadata.beats, song.metadata.chords,
                          self.settings.trim_seconds, bpm=song.metadata.bpm if instrument == "drums" else None,
                          key=song.metadata.key or None)

    def reference(self, song: Song, instrument: str, expert=None) -> StemScore:
        """The real stem's scores, as is or (with `expert`) through the expert's codec."""
        key = (song.sample_rate, song.metadata.seed, instrument, None if expert is None else str(expert.path))
        if key not in self._references:
            audio = song.stems[instrument]
            if expert is not None:
                audio = codec_round_trip(expert, audio)
            self._references[key] = self.score(audio, song, instrument)
        return self._references[key]

    def run(self, name: str, expert, from_click: bool) -> TaskResult:
        """Generate through the public Arranger API, as a user would: from a click, the song
        starts with no context at the song's tempo (the first layer hears the click alone); in
        context, the other stems are the context and no click is added."""
        from .arranger import Arranger, Layer

        instrument = expert.instrument
        arranger = Arranger(experts={instrument: expert}, registry=self.registry, device_map=str(expert.device))
        songs = self.songs(expert.sample_rate)
        stems = self.settings.context_stems
        if stems is None and expert.metadata.hears:
            # what the Arranger gives this expert in a song: the layers of the instruments it was
            # trained to hear (Layer.hears), here the song's stems of those instruments
            stems = tuple(expert.metadata.hears)
            unknown = sorted(set(stems) - set(STEMS))
            if unknown:
                raise EvaluationError(f"{expert.path}: the expert hears {', '.join(unknown)} (metadata 'hears'), "
                                      f"which the held-out songs do not have; they have {', '.join(STEMS)}. "
                                      f"Pass context_stems (--context-stems) to choose what it hears")
        if stems is not None and instrument in stems:
            raise EvaluationError(f"context_stems {list(stems)} include the {instrument!r} stem the expert must "
                                  f"generate; leave it out")
        source = self.settings.context_source
        context_name = "click" if from_click else control_context(songs, 0, instrument, source, stems)[1]
        result = TaskResult(name, instrument, str(expert.path), context_name,
                            "beat F1" if from_click else "rhythmic F1")
        params = self.params_for(expert.metadata)
        result.sampling = asdict(params)
        for i, song in enumerate(songs):
            layer = Layer(instrument, params=params, seed=song.metadata.seed,
                          chords=self.settings.chords if expert.lm.config.chord_classes else None,
                          beats=None if from_click else self.settings.beats)
            start = time.perf_counter()
            if from_click:
                arranged = arranger.arrange([layer], None, bpm=song.metadata.bpm, duration=self.settings.duration,
                                            seed=song.metadata.seed)
            else:
                arranged = arranger.arrange([layer], control_context(songs, i, instrument, source, stems)[0],
                                            click="none",
                                            context_sample_rate=song.sample_rate, duration=self.settings.duration,
                                            seed=song.metadata.seed)
            audio = arranged.stems[instrument]
            seconds = time.perf_counter() - start
            record = arranged.manifest.layer(instrument)
            result.chords, result.beats = record.chords, record.beats
            if self.audio_dir is not None:
                write_audio(self.audio_dir / _slug(name) / f"song_{i:03d}_{song.metadata.bpm:g}bpm.wav",
                            np.clip(audio, -1, 1), expert.sample_rate)
            result.songs.append(SongScore(
                seed=song.metadata.seed, bpm=song.metadata.bpm, key=song.metadata.key or "",
                generated=self.score(audio, song, instrument), real=self.reference(song, instrument),
                real_coded=self.reference(song, instrument, expert), seconds=round(seconds, 3)))
            if self.progress is not None:
                self.progress(name, i + 1, len(songs))
        return result


def _installed_registry():
    """The registry as installed (its instruments' `pitched`), or None where it cannot be read."""
    from .registry import Registry

    try:
        return Registry.load()
    except StageStackError:
        return None


def codec_round_trip(expert, audio: np.ndarray) -> np.ndarray:
    """`audio` [samples] at the expert's rate, encoded and decoded by its codec, same length."""
    import torch

    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None].to(expert.device)
    with torch.inference_mode():
        decoded = expert.codec.decode(expert.codec.encode(wave))[0, 0].float().cpu().numpy()
    out = np.zeros_like(audio, dtype=np.float32)
    n = min(out.size, decoded.size)
    out[:n] = decoded[:n]
    return out


def evaluate(experts: Sequence[str | Path], ablation_drums: str | Path | None = None,
             settings: EvalSettings = EvalSettings(), progress: ProgressCallback | None = None,
             audio_dir: str | Path | None = None) -> EvalReport:
    """Run the protocol (module docstring) for each expert file, by its instrument.

    `ablation_drums` is a drums expert trained without click pairs; it is scored from a click
    next to the drums expert. `audio_dir` keeps the generated stems for listening.
    """
    started = time.perf_counter()
    _librosa(), _mir_eval()  # fail before loading experts and generating, not after
    by_instrument: dict = {}  # instrument -> Expert
    described: dict[str, dict] = {}
    for path in experts:
        expert, info = _load(path, settings.dtype)
        if expert.instrument not in NOTE_ANALYSIS:
            raise EvaluationError(f"{path}: a {expert.instrument!r} expert has no held-out stem to be compared "
                                  f"with; the synthetic band has {', '.join(NOTE_ANALYSIS)}")
        if expert.instrument in by_instrument:
            raise EvaluationError(f"{path}: a second {expert.instrument!r} expert (the first is "
                                  f"{by_instrument[expert.instrument].path}); evaluate them in separate runs")
        by_instrument[expert.instrument] = expert
        described[expert.instrument] = info
    if not by_instrument:
        raise EvaluationError("no expert to evaluate")
    ablation = None
    if ablation_drums is not None:
        if "drums" not in by_instrument:
            raise EvaluationError("the ablation compares two drums experts: give the drums expert trained with "
                                  "click pairs too")
        ablation, info = _load(ablation_drums, settings.dtype)
        if ablation.instrument != "drums":
            raise EvaluationError(f"{ablation_drums}: the ablation expert must be a drums expert, "
                                  f"this one is {ablation.instrument!r}")
        described["drums (no click pairs)"] = info

    protocol = _Protocol(settings, progress, None if audio_dir is None else Path(audio_dir))
    tasks: list[TaskResult] = []
    for instrument, expert in by_instrument.items():
        if instrument != "drums":
            tasks.append(protocol.run(instrument, expert, from_click=False))
            continue
        tasks.append(protocol.run(FROM_CLICK, expert, from_click=True))
        if ablation is not None:
            tasks.append(protocol.run(ABLATION, ablation, from_click=True))
        if settings.drums_in_context:
            tasks.append(protocol.run("drums in context", expert, from_click=False))

    by_name = {t.name: t for t in tasks}
    comparison = None
    if ABLATION in by_name:
        comparison = paired_comparison([s.generated.f1 for s in by_name[FROM_CLICK].songs],
                                       [s.generated.f1 for s in by_name[ABLATION].songs])
    control = settings.context_source != "song" or settings.context_stems is not None

    def at_least(description: str, task: str, metric: str, threshold: float) -> Target:
        value = by_name[task].mean(metric) if task in by_name else None
        if control and task != FROM_CLICK:
            # a control context measures what listening is worth, not the target's task
            return Target(f"{description} (control: {by_name[task].context if task in by_name else '-'})",
                          value, f">= {threshold}", None)
        return Target(description, value, f">= {threshold}", None if value is None else value >= threshold)

    targets = [
        at_least("drums from a click, beat F1", FROM_CLICK, "f1", TARGET_DRUMS_FROM_CLICK_F1),
        at_least(f"drums from a click, share of songs played within {TEMPO_TOLERANCE:.0%} of the click's tempo",
                 FROM_CLICK, "tempo_match", TARGET_TEMPO_SHARE),
        at_least("drums in context, rhythmic F1", "drums in context", "f1", TARGET_DRUMS_IN_CONTEXT_F1),
        at_least("bass in context, chord-tone share", "bass", "chord_tone_share", TARGET_BASS_CHORD_TONE_SHARE),
        at_least("keys in context, chord-tone share", "keys", "chord_tone_share", TARGET_KEYS_CHORD_TONE_SHARE),
        Target("click pairs help (beat F1 from a click, with minus without)",
               None if comparison is None else comparison.difference, "> 0 with the 95% CI above 0",
               None if comparison is None else comparison.helps, signed=True),
    ]
    return EvalReport(settings, held_out_tempos(settings.n_tempos), described, tasks, comparison, targets,
                      time.perf_counter() - started)
