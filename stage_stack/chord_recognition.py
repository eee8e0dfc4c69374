"""Hearing the chords of a mix: one chord class per frame (stage_stack.chords), from its chroma.

    audio --STFT, bins folded onto 12 pitch classes--> chroma [12, frames]
          --cosine with 48 triad templates, averaged over ~0.5 s--> chord scores [48, frames]
          --the key whose diatonic triads explain the frames best--> the best diatonic triad per frame

An expert with a chord stream can be given these chords instead of naming its own
(`Layer(chords="heard")`): its own naming reads the context through a small codec's tokens, and
this reads the audio. Plain signal processing, no model: it is as good as the mix is tonal and
diatonic (the synthetic band's songs are). Measured in benchmarks/README.md.
"""

from __future__ import annotations

import numpy as np

from .chords import NO_CHORD, chord_pitch_classes

# Pitches folded into the chroma: a bass's low notes (C1) to a lead's upper range (C7).
LOWEST_HZ, HIGHEST_HZ = 32.7, 2093.0
# The analysis window: long enough to tell semitones apart in the bass (~2 Hz at 32.7 Hz).
WINDOW_SECONDS = 0.5
# Chord scores are averaged over this long: chords last a bar or more, notes and hits less.
SMOOTH_SECONDS = 0.5
# A chord's root counts this much more than its third and fifth in its template (bass lines
# dwell on roots).
ROOT_EMPHASIS = 1.0
# How much a pitch-class profile's likeness to the Krumhansl-Kessler key profiles counts beside
# how well the key's triads explain the frames, when the key is chosen.
PROFILE_WEIGHT = 0.15
# A frame quieter than this, relative to the loudest, has no chord (silence, or drums alone).
SILENT_RATIO = 1e-3

_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
# (scale degree in semitones, triad quality) of the triads of a major and of a minor key (natural
# minor, plus the harmonic minor's major V).
_MAJOR_TRIADS = ((0, 0), (2, 1), (4, 1), (5, 0), (7, 0), (9, 1), (11, 2))
_MINOR_TRIADS = ((0, 1), (2, 2), (3, 0), (5, 1), (7, 1), (7, 0), (8, 0), (10, 0))


def _templates() -> np.ndarray:
    t = np.zeros((NO_CHORD, 12))
    for cls in range(NO_CHORD):
        t[cls, list(chord_pitch_classes(cls))] = 1.0
        t[cls, cls // 4] += ROOT_EMPHASIS
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def diatonic_triads(tonic: int, minor: bool) -> list[int]:
    """The chord classes of a key's triads."""
    return sorted({4 * ((tonic + degree) % 12) + quality for degree, quality in
                   (_MINOR_TRIADS if minor else _MAJOR_TRIADS)})


def chroma(audio: np.ndarray, sample_rate: int, hop_length: int, frames: int) -> np.ndarray:
    """[12, frames] pitch-class energy, frame i centred on sample i * hop_length."""
    n_fft = 1 << int(np.ceil(np.log2(WINDOW_SECONDS * sample_rate)))
    audio = np.asarray(audio, dtype=np.float32)
    padded = np.pad(audio, (n_fft // 2, n_fft // 2 + frames * hop_length))
    starts = np.arange(frames) * hop_length
    window = np.hanning(n_fft).astype(np.float32)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    keep = (freqs >= LOWEST_HZ) & (freqs <= HIGHEST_HZ)
    pitch = np.round(12 * np.log2(freqs[keep] / 440.0)).astype(int) + 69  # MIDI numbers
    # Each pitch is the mean of its bins, then pitches fold onto pitch classes: a semitone spans
    # ~1 bin in the bass and ~50 at the top, and a plain sum would hear mostly the top.
    fold = np.zeros((12, int(keep.sum())), dtype=np.float32)
    bins_per_pitch = np.bincount(pitch - pitch.min())[pitch - pitch.min()]
    fold[pitch % 12, np.arange(fold.shape[1])] = 1.0 / bins_per_pitch
    out = np.empty((12, frames), dtype=np.float32)
    for lo in range(0, frames, 256):  # bounded memory for long songs
        idx = starts[lo:lo + 256, None] + np.arange(n_fft)[None]
        spectrum = np.abs(np.fft.rfft(padded[idx] * window, axis=-1))[:, keep]
        out[:, lo:lo + 256] = fold @ spectrum.T
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


def recognize_chords(audio: np.ndarray, sample_rate: int, hop_length: int, frames: int) -> np.ndarray:
    """One chord class per frame ([frames], int64): each frame's likeliest triad of the key that
    best explains the whole excerpt; NO_CHORD where the excerpt is silent."""
    c = chroma(audio, sample_rate, hop_length, frames)
    energy = c.sum(axis=0)
    silent = energy <= SILENT_RATIO * max(float(energy.max(initial=0.0)), 1e-12)
    scores = _templates() @ (c / np.maximum(np.linalg.norm(c, axis=0, keepdims=True), 1e-9))
    width = max(1, int(round(SMOOTH_SECONDS * sample_rate / hop_length)))
    kernel = np.ones(width) / width
    scores = np.stack([np.convolve(row, kernel, mode="same") for row in scores])
    profile = c[:, ~silent].sum(axis=1) if (~silent).any() else np.ones(12)

    def fit(tonic: int, minor: bool) -> float:
        explained = scores[diatonic_triads(tonic, minor)][:, ~silent].max(axis=0).mean() if (~silent).any() else 0.0
        return float(explained + PROFILE_WEIGHT * _correlation(np.roll(_MINOR_PROFILE if minor else _MAJOR_PROFILE,
                                                                        tonic), profile))

    tonic, minor = max(((t, m) for t in range(12) for m in (False, True)), key=lambda key: fit(*key))
    triads = np.array(diatonic_triads(tonic, minor))
    chords = triads[scores[triads].argmax(axis=0)].astype(np.int64)
    chords[silent] = NO_CHORD
    return chords
