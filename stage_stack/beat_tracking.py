"""Hearing the beat of a mix: a beat grid from the beat tracker (stage_stack.models.beat_tracker).

    mix --resample to the tracker's rate--> BeatTracker.activation [frames]
        --autocorrelation, lag in the tempo range--> beat period
        --the phase whose comb collects the most activation--> a constant-tempo grid of beats

A grid, not the activation's peaks: the drums play to a metronome, and the songs here keep
one tempo. An expert trained on click pairs (the drums) can then hear a click on these beats
instead of the mix (`Layer.beats="heard"`): measured in benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import click_track, resample
from .models.beat_tracker import BeatTracker, load_beat_tracker_file

# The bundled tracker (configs/beat-tracker.yaml), shipped inside the package.
DEFAULT_BEAT_TRACKER = Path(__file__).parent / "weights" / "beat_tracker.safetensors"
# Tempi a grid may have: the synthetic band's range (80-160 BPM) with a margin.
MIN_BPM, MAX_BPM = 70.0, 180.0
BEATS_PER_BAR = 4


@dataclass(frozen=True)
class BeatGrid:
    period: float  # seconds per beat
    first_beat: float  # seconds, in [0, period)
    duration: float  # seconds the grid covers

    @property
    def bpm(self) -> float:
        return 60.0 / self.period

    @property
    def beats(self) -> np.ndarray:
        return np.arange(self.first_beat, self.duration, self.period)

    def click(self, sample_rate: int, length: int) -> np.ndarray:
        """The grid as a click track, as training makes clicks (an accent every 4 beats)."""
        beats = self.beats
        return click_track(beats, beats[::BEATS_PER_BAR], sample_rate, length).astype(np.float32)


def load_beat_tracker(path: str | Path | None = None) -> BeatTracker:
    """The beat tracker in `path` (default: the bundled one)."""
    path = DEFAULT_BEAT_TRACKER if path is None else Path(path)
    if not path.is_file() and path == DEFAULT_BEAT_TRACKER:
        raise FileNotFoundError(f"this install has no bundled beat tracker ({path}); train one with "
                                "`stage-stack train-beats configs/beat-tracker.yaml`, or use beats='own'")
    return load_beat_tracker_file(path)[0]


def grid_from_activation(activation: np.ndarray, frame_rate: float, duration: float,
                         min_bpm: float = MIN_BPM, max_bpm: float = MAX_BPM) -> BeatGrid:
    """The constant-tempo grid that best explains a beat activation [frames]."""
    a = np.asarray(activation, dtype=np.float64)
    shortest, longest = int(np.floor(60.0 / max_bpm * frame_rate)), int(np.ceil(60.0 / min_bpm * frame_rate))
    if a.size <= longest:
        raise ValueError(f"{a.size / frame_rate:.2f} s is too short to hear a tempo; give at least "
                         f"{2 * longest / frame_rate:.1f} s of audio")
    centred = a - a.mean()
    lags = np.arange(shortest, longest + 1)
    strength = np.array([centred[:-lag] @ centred[lag:] / (a.size - lag) for lag in lags])
    lag = int(lags[int(np.argmax(strength))])
    # a fractional period: the lag's neighbours' strengths, fitted by a parabola
    i = lag - shortest
    if 0 < i < len(lags) - 1:
        left, mid, right = strength[i - 1], strength[i], strength[i + 1]
        curve = left - 2 * mid + right
        lag = lag + (0.5 * (left - right) / curve if curve < 0 else 0.0)
    phases = np.arange(int(np.ceil(lag)))
    comb = [np.interp(np.arange(p, a.size, lag), np.arange(a.size), a).sum() for p in phases]
    phase = float(phases[int(np.argmax(comb))])
    return BeatGrid(period=float(lag / frame_rate), first_beat=phase / frame_rate, duration=float(duration))


def track_beats(tracker: BeatTracker, audio: np.ndarray, sample_rate: int) -> BeatGrid:
    """The beat grid heard in `audio` [samples] at `sample_rate`."""
    rate = tracker.config.sample_rate
    wave = resample(np.asarray(audio, dtype=np.float32), sample_rate, rate)
    return grid_from_activation(tracker.activation(wave), tracker.config.frame_rate, len(audio) / sample_rate)
