"""Gain staging: how stems are summed into the mix without ever clipping.

The mix bus, at the song's sample rate:

    bus  = context + sum_i 10^(gain_db_i / 20) * stem_i       (the input mix at 0 dB)
    mix  = true_peak_limit(bus, ceiling = -1 dBTP)

- Gains are per layer, in dB (`Layer.gain_db`, else the instrument's registry default, else 0).
- Nothing is normalised: the balance between the input mix and the new stems is what the
  experts produced times the gains, and a quiet bus passes the limiter bit for bit unchanged.
- Headroom: the limiter's ceiling is 1 dB below full scale measured as *true peak* (4x
  oversampled, ITU-R BS.1770-4 Annex 2), so even the reconstructed analogue waveform stays below
  0 dBFS and a later conversion to 16-bit PCM or a lossy codec does not clip.
- The limiter is a look-ahead peak limiter: it computes the gain each sample needs, holds the
  smallest gain over a short look-ahead so the gain is already down when a peak arrives (no
  overshoot), and recovers with an exponential release. The gain is computed on 1 ms blocks
  and interpolated, with a construction that guarantees every output sample is within the
  ceiling (see `limiter_gain`), so the limiter never lets a sample through above it.

Conditioning audio (what an expert hears, see `conditioning_audio`):
    "none"       the current mix;
    "mix+click"  the current mix plus the metronome at CLICK_GAIN_DB, limited again
                 (STAGE paper §5.4: adding the click tightens rhythmic alignment);
    "click"      the metronome alone (STAGE's "beats" context from training, reference §5).
The click never goes into the mix that is written out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

ClickMode = Literal["none", "mix+click", "click"]
CLICK_MODES: tuple[str, ...] = ("none", "mix+click", "click")
CLICK_GAIN_DB = -6.0  # the metronome sits 6 dB under full scale when added to a mix


@dataclass(frozen=True)
class LimiterSettings:
    """The mix-bus limiter. The defaults are a transparent mastering-style peak limiter."""

    ceiling_dbtp: float = -1.0  # headroom: true peaks stay at least 1 dB below full scale
    lookahead_ms: float = 5.0  # the gain reaches its target this long before the peak
    release_ms: float = 80.0  # time constant of the recovery after a peak
    oversample: int = 4  # true-peak estimation factor (BS.1770: 4x at 48 kHz)
    block_ms: float = 1.0  # gain resolution; interpolated between blocks

    def __post_init__(self) -> None:
        if not -20.0 <= self.ceiling_dbtp <= 0.0:
            raise ValueError(f"ceiling_dbtp must be in [-20, 0] dBTP, got {self.ceiling_dbtp}")
        if self.lookahead_ms < 0 or self.release_ms <= 0 or self.block_ms <= 0 or self.oversample < 1:
            raise ValueError("lookahead_ms must be >= 0 and release_ms, block_ms, oversample > 0")

    @property
    def ceiling(self) -> float:
        return db_to_gain(self.ceiling_dbtp)


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def gain_to_db(gain: float) -> float:
    return float(20.0 * np.log10(max(gain, 1e-12)))


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Crop or zero-pad the last axis to `length` samples."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[-1] >= length:
        return audio[..., :length]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, length - audio.shape[-1])]
    return np.pad(audio, pad)


def true_peak_envelope(audio: np.ndarray, sample_rate: int, oversample: int = 4) -> np.ndarray:
    """|peak| around each sample, inter-sample peaks included: [samples] -> [samples].

    The signal is oversampled with soxr; each sample gets the largest magnitude of the
    oversampled points on both sides of it (the intervals [n-1, n] and [n, n+1]) and of itself.
    """
    audio = np.asarray(audio, dtype=np.float32)
    n = audio.shape[-1]
    sample_peak = np.abs(audio)
    if oversample <= 1 or n < 2:
        return sample_peak
    import soxr

    up = np.abs(soxr.resample(audio, sample_rate, sample_rate * oversample))
    up = fit_length(up.astype(np.float32), n * oversample).reshape(n, oversample).max(axis=1)  # interval [n, n+1)
    before = np.concatenate([[0.0], up[:-1]]).astype(np.float32)  # interval [n-1, n)
    return np.maximum(sample_peak, np.maximum(up, before))


def true_peak(audio: np.ndarray, sample_rate: int, oversample: int = 4) -> float:
    """The true peak of a signal (linear, 1.0 = full scale)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.size == 0:
        return 0.0
    return float(true_peak_envelope(audio, sample_rate, oversample).max())


def _sliding_min_forward(x: np.ndarray, width: int) -> np.ndarray:
    """out[b] = min(x[b : b + width + 1]) (the window clipped at the end)."""
    if width <= 0:
        return x.copy()
    padded = np.concatenate([x, np.full(width, x[-1])])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width + 1)
    return windows.min(axis=1)


def limiter_gain(audio: np.ndarray, sample_rate: int, settings: LimiterSettings = LimiterSettings()) -> np.ndarray:
    """The gain [samples] (each in (0, 1]) that brings the signal's true peak under the ceiling.

    Why the result never exceeds the gain a sample needs (`needed[n] = min(1, ceiling/peak[n])`):
    1. block b gets the smallest `needed` of blocks b-1, b and b+1 (`spread`);
    2. look-ahead: the smallest `spread` over the next A blocks (`held`), then the mean of `held`
       over the previous A blocks (`smooth`). Every term of that mean is a minimum over a window
       that contains block b, so smooth[b] <= spread[b];
    3. release: gain[b] = min(smooth[b], gain[b-1] recovering towards 1) <= smooth[b];
    4. per sample, the gain is interpolated between the centres of two neighbouring blocks; both
       values are <= `needed` of every sample in those two blocks (step 1).
    """
    audio = np.asarray(audio, dtype=np.float32)
    n = audio.shape[-1]
    if n == 0:
        return np.ones(0, dtype=np.float32)
    peak = true_peak_envelope(audio, sample_rate, settings.oversample)
    target = settings.ceiling * (1 - 1e-6)  # a hair under, so float32 rounding cannot cross the ceiling
    needed = np.minimum(1.0, target / np.maximum(peak, 1e-12))
    if needed.min() >= 1.0:
        return np.ones(n, dtype=np.float32)  # nothing to limit: the bus passes bit for bit

    block = max(1, int(round(settings.block_ms * sample_rate / 1000)))
    n_blocks = -(-n // block)
    per_block = np.concatenate([needed, np.ones(n_blocks * block - n)]).reshape(n_blocks, block).min(axis=1)
    padded = np.concatenate([[per_block[0]], per_block, [per_block[-1]]])
    spread = np.minimum(np.minimum(padded[:-2], padded[1:-1]), padded[2:])

    lookahead = int(round(settings.lookahead_ms * sample_rate / 1000 / block))
    held = _sliding_min_forward(spread, lookahead)
    if lookahead > 0:
        # left edge padded with held[0]: its window [0, A] contains every block b <= A
        history = np.concatenate([np.full(lookahead, held[0]), held])
        smooth = np.lib.stride_tricks.sliding_window_view(history, lookahead + 1).mean(axis=1)
        smooth = np.minimum(smooth, held)  # float rounding of the mean must not exceed the bound
    else:
        smooth = held

    recover = 1.0 - np.exp(-block / (settings.release_ms * sample_rate / 1000))
    gain = np.empty_like(smooth)
    current = 1.0
    for b, target in enumerate(smooth):  # ~1000 iterations per second of audio
        current = min(target, current + (1.0 - current) * recover)
        gain[b] = current

    centres = np.arange(n_blocks) * block + (block - 1) / 2
    per_sample = np.interp(np.arange(n), centres, gain)
    return np.minimum(per_sample, needed).astype(np.float32)  # exact guard against interpolation rounding


def limit(audio: np.ndarray, sample_rate: int, settings: LimiterSettings = LimiterSettings()) -> np.ndarray:
    """Apply the true-peak limiter; the output's samples never exceed the ceiling."""
    audio = np.asarray(audio, dtype=np.float32)
    gain = limiter_gain(audio, sample_rate, settings)
    if gain.size and gain.min() >= 1.0:
        return audio.copy()
    return (audio * gain).astype(np.float32)


def mix_bus(context: np.ndarray | None, stems: Sequence[tuple[np.ndarray, float]], length: int) -> np.ndarray:
    """The unlimited sum: context at 0 dB plus each (stem, gain_db), all cut or padded to `length`."""
    bus = np.zeros(length, dtype=np.float64)
    if context is not None:
        bus += fit_length(context, length)
    for stem, gain_db in stems:
        bus += db_to_gain(gain_db) * fit_length(stem, length).astype(np.float64)
    return bus.astype(np.float32)


def render_mix(context: np.ndarray | None, stems: Sequence[tuple[np.ndarray, float]], sample_rate: int,
               length: int, settings: LimiterSettings = LimiterSettings()) -> np.ndarray:
    """The mix as written out and as the next expert hears it: `mix_bus` through the limiter."""
    return limit(mix_bus(context, stems, length), sample_rate, settings)


def conditioning_audio(mix: np.ndarray, click: np.ndarray | None, mode: ClickMode, sample_rate: int,
                       settings: LimiterSettings = LimiterSettings()) -> np.ndarray:
    """What an expert hears for one layer, from the current (limited) mix and the metronome."""
    if mode not in CLICK_MODES:
        raise ValueError(f"click mode must be one of {', '.join(CLICK_MODES)}; got {mode!r}")
    if mode == "none":
        return mix
    if click is None:
        raise ValueError(f"click mode {mode!r} needs a click track")
    click = fit_length(click, mix.shape[-1])
    if mode == "click":
        return click
    return limit(mix + db_to_gain(CLICK_GAIN_DB) * click, sample_rate, settings)


def metronome(bpm: float, length: int, sample_rate: int, beats_per_bar: int = 4) -> np.ndarray:
    """A click track at `bpm` from t = 0 with an accented downbeat every `beats_per_bar` beats."""
    from .audio import click_track

    seconds = length / sample_rate
    beats = np.arange(0.0, seconds, 60.0 / bpm)
    return click_track(beats, beats[::beats_per_bar], sample_rate, length)
