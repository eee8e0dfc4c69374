"""A synthetic band: drums, bass, keys and lead rendered with numpy, deterministic by seed.

This is the project's own training and test data (nothing is downloaded). A song is:

    style (genre, tempo range, drum/bass/keys patterns) + key + a 4-bar chord progression
      -> a score: drum hits on a 16th grid (with fills and crashes) and notes
         (bass on the chord roots, keys voicing the chords, a lead melody on chord tones)
      -> stems rendered from per-song timbres: drum one-shots from swept sines and shaped
         noise; pitched parts from wavetables whose harmonics, filter, envelope, detune and
         vibrato are drawn per song
      -> levels set so that no stem and no mix clips.

`generate_song` returns a `Song` with the stems, the score and a `SongMetadata`;
`write_dataset` writes songs in the MoisesDB-style layout `StemDataset` reads:

    root/<song_id>/<stem>/<stem>.wav      (16-bit mono, one file per stem)
    root/<song_id>/metadata.json          (SongMetadata: bpm, key, chords, beats, ...)

Everything random comes from one `numpy.random.Generator` seeded by the song seed, so a seed
always gives the same song, bit for bit. One chord per 4/4 bar; times are exact multiples of a
16th note (no swing, no humanised timing) so that beat and chord annotations are exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audio import write_audio
from .data import METADATA_FILE, ChordSpan, SongMetadata, describe

STEMS = ("drums", "bass", "keys", "lead")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
FLAT_KEYS = {"major": {5, 10, 3, 8, 1, 6}, "minor": {2, 7, 0, 5, 10, 3}}  # F Bb Eb Ab Db Gb / D G C F Bb Eb
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Scale degrees (0 = tonic) of 4-bar progressions that are common in each mode.
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 4), (3, 0, 4, 5), (0, 3, 5, 4), (1, 4, 0, 5)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4), (0, 3, 6, 2), (0, 2, 3, 4)),
}
CHORD_SUFFIX = {(4, 7): "", (3, 7): "m", (3, 6): "dim", (4, 8): "aug",
                (4, 7, 11): "maj7", (3, 7, 10): "m7", (4, 7, 10): "7", (3, 6, 10): "m7b5"}
STEPS_PER_BAR = 16  # 16th notes in a 4/4 bar
GENERATOR = "stage_stack.training.synth/1"

# Patterns are 16 steps per bar. Drums: "x" hit, "g" ghost (soft), "o" open hi-hat.
# Bass and keys: (step, length in steps, octave up) per note / chord.
BASS_PATTERNS = {
    "eighths": tuple((s, 2, 0) for s in range(0, 16, 2)),
    "quarters": ((0, 4, 0), (4, 4, 0), (8, 4, 0), (12, 4, 0)),
    "octaves": tuple((s, 2, (s // 2) % 2) for s in range(0, 16, 2)),
    "syncopated": ((0, 3, 0), (3, 3, 0), (6, 2, 0), (8, 3, 0), (11, 3, 0), (14, 2, 0)),
    "funk": ((0, 2, 0), (3, 1, 1), (4, 1, 0), (6, 2, 0), (8, 1, 0), (10, 2, 1), (13, 1, 0), (14, 2, 0)),
    "offbeat": ((2, 2, 0), (6, 2, 0), (10, 2, 0), (14, 2, 0)),
    "long": ((0, 6, 0), (6, 2, 0), (8, 8, 0)),
    "half": ((0, 8, 0), (8, 8, 0)),
    "hiphop": ((0, 3, 0), (7, 1, 0), (8, 6, 0)),
}
KEYS_PATTERNS = {
    "pad": ((0, 16),),
    "half": ((0, 8), (8, 8)),
    "quarters": ((0, 4), (4, 4), (8, 4), (12, 4)),
    "offbeat_stabs": ((2, 1), (6, 1), (10, 1), (14, 1)),
    "stabs16": ((0, 1), (3, 1), (6, 2), (10, 1), (12, 2)),
    "arpeggio": tuple((s, 2) for s in range(0, 16, 2)),  # one chord tone per 8th, cycling
}


@dataclass(frozen=True)
class Style:
    genre: str
    bpm: tuple[int, int]
    kick: tuple[str, ...]  # bar A, bar B
    snare: str
    hats: str
    bass: tuple[str, ...]
    keys: tuple[str, ...]
    clap: bool = False  # a clap instead of a snare


STYLES = (
    Style("rock", (100, 150), ("x.......x.x.....", "x.....x.x......."), "....x.......x...", "x.x.x.x.x.x.x.x.",
          ("eighths", "quarters"), ("quarters", "half", "pad")),
    Style("pop", (90, 130), ("x.....x...x.....", "x.......x.....x."), "....x.......x...", "x.x.x.x.x.x.x.x.",
          ("syncopated", "eighths"), ("pad", "offbeat_stabs", "arpeggio")),
    Style("electronic", (118, 140), ("x...x...x...x...", "x...x...x...x.x."), "....x.......x...", "x.o.x.o.x.o.x.o.",
          ("offbeat", "octaves"), ("pad", "arpeggio", "offbeat_stabs"), clap=True),
    Style("funk", (95, 120), ("x..x..x...x..x..", "x.x...x...x..x.."), "....x..g.g..x..g", "xxxxxxxxxxxxxxxx",
          ("funk", "octaves"), ("stabs16", "offbeat_stabs")),
    Style("hip hop", (80, 100), ("x......xx.x.....", "x.x....x..x....."), "....x.......x...", "x.x.x.x.x.x.x.x.",
          ("hiphop", "long"), ("pad", "quarters")),
    Style("disco", (110, 130), ("x...x...x...x...", "x...x...x...x..."), "....x.......x...", "x.o.x.o.x.o.x.o.",
          ("octaves",), ("offbeat_stabs", "quarters")),
    Style("ballad", (80, 96), ("x.......x.......", "x.......x.x....."), "....x.......x...", "x.x.x.x.x.x.x.x.",
          ("long", "half"), ("arpeggio", "pad")),
)
MOODS = {"major": ("happy", "uplifting", "bright", "warm"), "minor": ("dark", "melancholic", "dramatic", "moody")}


# -- the score --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Note:
    stem: str
    pitch: int  # MIDI note number
    start: float  # seconds
    end: float  # seconds (note off; the release rings after it)
    velocity: float  # 0..1


@dataclass(frozen=True)
class DrumHit:
    instrument: str  # kick, snare, clap, hat, open_hat, tom_high, tom_mid, tom_low, crash
    step: int  # 16th-note index from the start of the song
    time: float  # seconds = step * 16th duration
    velocity: float
    fill: bool = False  # part of a fill (the last beats of a phrase)


@dataclass
class Song:
    metadata: SongMetadata
    stems: dict[str, np.ndarray]  # stem -> float32 [samples]
    notes: list[Note]
    drum_hits: list[DrumHit]
    sample_rate: int
    timbres: dict[str, dict] = field(default_factory=dict)  # per-stem synthesis parameters (for inspection)

    def mix(self) -> np.ndarray:
        return np.sum([self.stems[s] for s in self.stems], axis=0).astype(np.float32)

    def notes_of(self, stem: str) -> list[Note]:
        return [n for n in self.notes if n.stem == stem]

    def chord_at(self, time: float) -> ChordSpan:
        for chord in self.metadata.chords:
            if chord.start <= time < chord.end:
                return chord
        raise ValueError(f"no chord at {time:.3f} s (song length {self.metadata.duration} s)")


# -- music theory -----------------------------------------------------------------------------

def midi_to_hz(pitch: float) -> float:
    return 440.0 * 2.0 ** ((pitch - 69) / 12)


def note_names(key_root: int, mode: str) -> tuple[str, ...]:
    """Flats in flat keys, so that C minor's VII is Bb and not A#."""
    return FLAT_NAMES if key_root in FLAT_KEYS[mode] else NOTE_NAMES


def diatonic_chord(key_root: int, mode: str, degree: int, seventh: bool) -> tuple[int, list[int], str]:
    """(root pitch class, pitch classes root first, name) of the chord on a scale degree."""
    scale = SCALES[mode]
    steps = (0, 2, 4, 6) if seventh else (0, 2, 4)
    pcs = [(key_root + scale[(degree + s) % 7]) % 12 for s in steps]
    intervals = tuple((pc - pcs[0]) % 12 for pc in pcs[1:])
    return pcs[0], pcs, note_names(key_root, mode)[pcs[0]] + CHORD_SUFFIX[intervals]


def voice_chord(pcs: list[int], previous: list[int] | None, low: int = 52, high: int = 76) -> list[int]:
    """Close voicing of `pcs` in [low, high] that moves least from the previous voicing."""
    candidates = []
    for inversion in range(len(pcs)):
        order = pcs[inversion:] + pcs[:inversion]
        for base in range(low, low + 12):
            if base % 12 != order[0]:
                continue
            notes = [base]
            for pc in order[1:]:
                notes.append(notes[-1] + (pc - notes[-1]) % 12)
            if notes[-1] <= high:
                candidates.append(notes)
    if previous is None:
        return min(candidates, key=lambda v: abs(np.mean(v) - (low + high) / 2))
    return min(candidates, key=lambda v: sum(abs(a - b) for a, b in zip(sorted(v), sorted(previous))))


# -- synthesis --------------------------------------------------------------------------------

TABLE_SIZE = 2048


@dataclass(frozen=True)
class Timbre:
    """A pitched instrument: wavetable oscillator(s) -> lowpass that closes over time -> ADSR."""

    harmonics: tuple[float, ...]  # amplitude of harmonic 1, 2, ... before the filter
    cutoff: float  # lowpass cutoff (Hz) at the note start
    dark_cutoff: float  # cutoff the filter settles to
    filter_decay: float  # seconds for the cutoff to settle
    resonance: float  # gain of a bump at the cutoff
    attack: float
    decay: float  # time constant of the decay to `sustain`
    sustain: float
    release: float
    detune_cents: float  # 0 = one oscillator, else a second one this far up
    vibrato: float  # depth in semitones (0 = none)
    vibrato_rate: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "harmonics"}


ORGAN_DRAWBARS = {1: 1.0, 2: 0.8, 3: 0.6, 4: 0.5, 6: 0.35, 8: 0.25}  # harmonic -> level


def _harmonic_law(rng: np.random.Generator, family: str, n: int = 64) -> tuple[float, ...]:
    k = np.arange(1, n + 1, dtype=np.float64)
    odd = (k % 2 == 1).astype(np.float64)
    law = {
        "saw": 1 / k,
        "square": odd / k + 0.05 / k,
        "triangle": odd / k**2,
        "soft": 1 / k**3,
        "organ": np.array([ORGAN_DRAWBARS.get(int(i), 0.0) for i in k]),
        "reed": (1 / k) * (1 + odd),
    }[family]
    jitter = np.clip(1 + 0.25 * rng.standard_normal(n), 0.2, 2.0)
    jitter[0] = 1.0
    return tuple(law * jitter)


def _wavetable(timbre: Timbre, f0: float, cutoff: float, sample_rate: int) -> np.ndarray:
    """One period of the filtered waveform, normalised to peak 1, with a wrap-around sample."""
    amps = np.asarray(timbre.harmonics)
    freqs = f0 * np.arange(1, amps.size + 1)
    response = 1 / np.sqrt(1 + (freqs / cutoff) ** 4)
    response *= 1 + timbre.resonance * np.exp(-0.5 * ((freqs - cutoff) / (0.15 * cutoff)) ** 2)
    amps = amps * response * (freqs < 0.45 * sample_rate)  # band-limited: no aliasing
    spectrum = np.zeros(TABLE_SIZE // 2 + 1, dtype=np.complex128)
    spectrum[1 : amps.size + 1] = -1j * amps[: TABLE_SIZE // 2]
    table = np.fft.irfft(spectrum, n=TABLE_SIZE)
    table /= max(np.abs(table).max(), 1e-9)
    return np.append(table, table[0]).astype(np.float32)


def _lookup(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    pos = (phase % 1.0) * TABLE_SIZE
    i = pos.astype(np.int64)
    frac = (pos - i).astype(np.float32)
    return table[i] + frac * (table[i + 1] - table[i])


class NoteRenderer:
    """Renders notes of one timbre; identical (pitch, length) notes are rendered once."""

    def __init__(self, timbre: Timbre, sample_rate: int) -> None:
        self.timbre, self.sample_rate = timbre, sample_rate
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def render(self, pitch: int, hold_samples: int) -> np.ndarray:
        key = (pitch, hold_samples)
        if key not in self._cache:
            self._cache[key] = self._render(pitch, hold_samples)
        return self._cache[key]

    def _render(self, pitch: int, hold_samples: int) -> np.ndarray:
        tb, sr = self.timbre, self.sample_rate
        f0 = midi_to_hz(pitch)
        n = hold_samples + int(tb.release * sr)
        t = np.arange(n) / sr
        if tb.vibrato > 0:  # delayed vibrato, so short notes stay in tune
            depth = tb.vibrato * np.clip((t - 0.15) / 0.3, 0, 1)
            ratio = 2 ** (depth * np.sin(2 * np.pi * tb.vibrato_rate * t) / 12)
            cycles = np.cumsum(ratio) * f0 / sr
        else:
            cycles = f0 * t
        oscillators = [(cycles, f0)]
        if tb.detune_cents:
            detune = 2 ** (tb.detune_cents / 1200)
            oscillators.append((cycles * detune + 0.37, f0 * detune))
        out = np.zeros(n, dtype=np.float32)
        closing = np.exp(-t / tb.filter_decay).astype(np.float32)
        for phase, freq in oscillators:
            bright = _lookup(_wavetable(tb, freq, tb.cutoff, sr), phase)
            dark = _lookup(_wavetable(tb, freq, tb.dark_cutoff, sr), phase)
            out += dark + closing * (bright - dark)
        out /= len(oscillators)
        return out * self._envelope(t, hold_samples / sr)

    def _envelope(self, t: np.ndarray, hold: float) -> np.ndarray:
        tb = self.timbre
        rise = np.clip(t / tb.attack, 0, 1)
        level = tb.sustain + (1 - tb.sustain) * np.exp(-np.maximum(t - tb.attack, 0) / tb.decay)
        fall = np.clip(1 - (t - hold) / tb.release, 0, 1)
        return (rise * level * fall).astype(np.float32)


def _shaped_noise(rng: np.random.Generator, n: int, sample_rate: int, low: float, high: float) -> np.ndarray:
    """White noise band-passed in the frequency domain (2nd-order-like skirts), peak 1."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sample_rate) + 1e-3
    spectrum *= 1 / np.sqrt(1 + (low / f) ** 4) / np.sqrt(1 + (f / high) ** 4)
    noise = np.fft.irfft(spectrum, n=n)
    return noise / max(np.abs(noise).max(), 1e-9)


def _decay(n: int, sample_rate: int, tau: float, start: float = 0.0) -> np.ndarray:
    """Exponential decay with time constant `tau` from `start` seconds on, silence before."""
    t = np.arange(n) / sample_rate - start
    return np.where(t >= 0, np.exp(-np.maximum(t, 0) / tau), 0.0)


def _swept_sine(n: int, sample_rate: int, f_start: float, f_end: float, tau_pitch: float) -> np.ndarray:
    t = np.arange(n) / sample_rate
    freq = f_end + (f_start - f_end) * np.exp(-t / tau_pitch)
    return np.sin(2 * np.pi * np.cumsum(freq) / sample_rate)


def _fade_out(x: np.ndarray, sample_rate: int, seconds: float = 0.005) -> np.ndarray:
    n = min(int(seconds * sample_rate), x.size)
    x[-n:] *= np.linspace(1, 0, n)
    return x


def drum_kit(rng: np.random.Generator, sample_rate: int) -> tuple[dict[str, np.ndarray], dict]:
    """One-shot samples (float32, peak <= 1) with per-song tuning; returns (kit, parameters)."""
    sr = sample_rate
    p = dict(
        kick_start=rng.uniform(100, 180), kick_end=rng.uniform(42, 60), kick_sweep=rng.uniform(0.02, 0.06),
        kick_decay=rng.uniform(0.12, 0.35), kick_click=rng.uniform(0.1, 0.4),
        snare_tone=rng.uniform(160, 260), snare_low=rng.uniform(800, 2000), snare_high=rng.uniform(5000, 11000),
        snare_decay=rng.uniform(0.08, 0.2), snare_body=rng.uniform(0.3, 0.7),
        hat_low=rng.uniform(6000, 9000), hat_decay=rng.uniform(0.015, 0.05), open_decay=rng.uniform(0.15, 0.35),
        tom_base=rng.uniform(90, 130), crash_low=rng.uniform(3000, 6000), crash_decay=rng.uniform(0.5, 1.0),
    )
    kit = {}
    n = int(0.5 * sr)
    kick = _swept_sine(n, sr, p["kick_start"], p["kick_end"], p["kick_sweep"]) * _decay(n, sr, p["kick_decay"])
    kick += p["kick_click"] * _shaped_noise(rng, n, sr, 1000, 8000) * _decay(n, sr, 0.003)
    kit["kick"] = kick
    n = int(0.4 * sr)
    body = np.sin(2 * np.pi * p["snare_tone"] * np.arange(n) / sr) * _decay(n, sr, 0.06)
    rattle = _shaped_noise(rng, n, sr, p["snare_low"], p["snare_high"]) * _decay(n, sr, p["snare_decay"])
    kit["snare"] = p["snare_body"] * body + (1 - p["snare_body"]) * rattle
    # a clap: three quick noise bursts (several hands) and a short room tail after the last
    claps = sum(_decay(n, sr, 0.004, start) for start in (0.0, 0.011, 0.022)) + 0.6 * _decay(n, sr, 0.08, 0.022)
    kit["clap"] = _shaped_noise(rng, n, sr, 900, 3500) * claps
    n = int(0.6 * sr)
    hiss = _shaped_noise(rng, n, sr, p["hat_low"], 16000)
    kit["hat"] = hiss * _decay(n, sr, p["hat_decay"])
    kit["open_hat"] = hiss * _decay(n, sr, p["open_decay"])
    n = int(0.6 * sr)
    for name, ratio in (("tom_high", 1.5), ("tom_mid", 1.25), ("tom_low", 1.0)):
        f = p["tom_base"] * ratio
        kit[name] = _swept_sine(n, sr, 1.3 * f, f, 0.05) * _decay(n, sr, 0.25)
    n = int(2.0 * sr)
    kit["crash"] = _shaped_noise(rng, n, sr, p["crash_low"], 15000) * _decay(n, sr, p["crash_decay"])
    kit = {k: _fade_out(v / max(np.abs(v).max(), 1e-9), sr).astype(np.float32) for k, v in kit.items()}
    return kit, {k: round(float(v), 4) for k, v in p.items()}


DRUM_GAINS = {"kick": 1.0, "snare": 0.7, "clap": 0.7, "hat": 0.28, "open_hat": 0.25, "tom_high": 0.6,
              "tom_mid": 0.6, "tom_low": 0.6, "crash": 0.35}


def random_timbre(rng: np.random.Generator, role: str) -> Timbre:
    """A per-song timbre for `role` (bass, keys, lead) drawn from role-appropriate ranges."""
    if role == "bass":
        family = rng.choice(["saw", "square", "soft", "triangle"])
        cutoff = rng.uniform(400, 1500)
        return Timbre(_harmonic_law(rng, family), cutoff, cutoff * rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.3),
                      rng.uniform(0, 1.5), attack=0.005, decay=rng.uniform(0.2, 0.8), sustain=rng.uniform(0.4, 0.9),
                      release=rng.uniform(0.03, 0.08), detune_cents=0.0, vibrato=0.0, vibrato_rate=5.0)
    if role == "keys":
        family = rng.choice(["saw", "organ", "soft", "triangle", "reed"])
        cutoff = rng.uniform(1200, 5000)
        pad_like = rng.random() < 0.4
        return Timbre(_harmonic_law(rng, family), cutoff, cutoff * rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.8),
                      rng.uniform(0, 0.8), attack=rng.uniform(0.05, 0.2) if pad_like else rng.uniform(0.003, 0.015),
                      decay=rng.uniform(0.3, 1.5), sustain=rng.uniform(0.5, 0.9) if pad_like else rng.uniform(0.1, 0.5),
                      release=rng.uniform(0.1, 0.4), detune_cents=float(rng.choice([0.0, rng.uniform(4, 12)])),
                      vibrato=0.0, vibrato_rate=5.0)
    if role == "lead":
        family = rng.choice(["saw", "square", "triangle", "reed"])
        cutoff = rng.uniform(1500, 6000)
        return Timbre(_harmonic_law(rng, family), cutoff, cutoff * rng.uniform(0.4, 0.9), rng.uniform(0.1, 0.5),
                      rng.uniform(0, 1.0), attack=rng.uniform(0.005, 0.04), decay=rng.uniform(0.2, 0.8),
                      sustain=rng.uniform(0.5, 0.9), release=rng.uniform(0.05, 0.2),
                      detune_cents=float(rng.choice([0.0, rng.uniform(3, 8)])), vibrato=rng.uniform(0.0, 0.3),
                      vibrato_rate=rng.uniform(4.5, 6.5))
    raise ValueError(f"unknown role {role!r}; expected bass, keys or lead")


def _room(rng: np.random.Generator, x: np.ndarray, sample_rate: int, wet: float) -> np.ndarray:
    """A cheap reverb: FFT convolution with a decaying noise tail, same length as `x`."""
    n_ir = int(rng.uniform(0.3, 1.0) * sample_rate)
    ir = rng.standard_normal(n_ir) * _decay(n_ir, sample_rate, n_ir / sample_rate / 5)
    ir *= wet / np.sqrt(np.sum(ir**2))
    size = 1 << int(np.ceil(np.log2(x.size + n_ir)))
    tail = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: x.size]
    return (x + tail).astype(np.float32)


# -- composition ------------------------------------------------------------------------------

def _drum_hits(rng: np.random.Generator, style: Style, n_bars: int, sixteenth: float) -> list[DrumHit]:
    hits: list[DrumHit] = []
    phrase = 4 if rng.random() < 0.6 else 8  # bars per phrase; a fill may close each one
    fill_prob = rng.uniform(0.6, 1.0)
    snare = "clap" if style.clap else "snare"

    def add(instrument: str, step: int, velocity: float, fill: bool = False) -> None:
        hits.append(DrumHit(instrument, step, step * sixteenth, float(np.clip(velocity, 0.05, 1.0)), fill))

    crash = True  # on the first beat of the song and after every fill
    for bar in range(n_bars):
        base = bar * STEPS_PER_BAR
        if crash:
            add("crash", base, 0.9)
        fill_start = 16
        if bar % phrase == phrase - 1 and rng.random() < fill_prob:
            fill_start = int(rng.choice([8, 12]))
        kick = style.kick[bar % 2]
        for step in range(STEPS_PER_BAR):
            s = base + step
            jitter = rng.uniform(-0.06, 0.06)
            if step >= fill_start:
                continue
            if kick[step] == "x":
                add("kick", s, 0.95 + jitter)
            if style.snare[step] in "xg":
                add(snare, s, (0.9 if style.snare[step] == "x" else 0.3) + jitter)
            if style.hats[step] in "xo":
                accent = 0.8 if step % 4 == 0 else 0.55
                add("open_hat" if style.hats[step] == "o" else "hat", s, accent + jitter)
        crash = fill_start < 16
        if crash:
            kind = rng.choice(["snare", "toms", "mixed"])
            toms = ("tom_high", "tom_high", "tom_mid", "tom_mid", "tom_low", "tom_low", "tom_low", "tom_low")
            for i, step in enumerate(range(fill_start, 16)):
                velocity = 0.5 + 0.45 * i / max(15 - fill_start, 1)  # crescendo into the next bar
                if kind == "snare" or (kind == "mixed" and i % 2 == 0):
                    add(snare, base + step, velocity, fill=True)
                else:
                    add(toms[int(i * 8 / (16 - fill_start))], base + step, velocity, fill=True)
            add("kick", base + fill_start, 0.9, fill=True)
    return hits


def _bass_notes(rng: np.random.Generator, style: Style, chords: list[ChordSpan], sixteenth: float) -> list[Note]:
    pattern = BASS_PATTERNS[str(rng.choice(style.bass))]
    gate = rng.uniform(0.55, 0.95)
    notes = []
    for chord in chords:
        root = 28 + (chord.root - 4) % 12  # E1 .. D#2: the lowest octave a bass plays in
        for step, length, octave_up in pattern:
            start = chord.start + step * sixteenth
            if start >= chord.end:
                break
            end = min(start + length * sixteenth * gate, chord.end)
            velocity = (0.9 if step % 4 == 0 else 0.75) + rng.uniform(-0.05, 0.05)
            notes.append(Note("bass", root + 12 * octave_up, start, end, velocity))
    return notes


def _keys_notes(rng: np.random.Generator, style: Style, chords: list[ChordSpan], sixteenth: float) -> list[Note]:
    name = str(rng.choice(style.keys))
    pattern = KEYS_PATTERNS[name]
    gate = 1.0 if name == "pad" else rng.uniform(0.5, 0.9)
    notes, voicing = [], None
    for chord in chords:
        voicing = voice_chord(list(chord.pitch_classes), voicing)
        for i, (step, length) in enumerate(pattern):
            start = chord.start + step * sixteenth
            if start >= chord.end:
                break
            end = min(start + length * sixteenth * gate, chord.end)
            velocity = 0.7 + rng.uniform(-0.05, 0.05)
            if name == "arpeggio":  # up and down through the voicing
                cycle = voicing + voicing[-2:0:-1]
                notes.append(Note("keys", cycle[i % len(cycle)], start, end, velocity))
            else:
                notes.extend(Note("keys", p, start, end, velocity) for p in voicing)
    return notes


def _lead_notes(rng: np.random.Generator, key_root: int, mode: str, chords: list[ChordSpan],
                progression_bars: int, sixteenth: float) -> list[Note]:
    """A motif over one progression cycle, repeated with a varied last bar every other time.

    Rhythm on the 8th-note grid; strong beats take a chord tone near the previous note, other
    notes step along the scale, so the line is singable and fits the chords.
    """
    low, high = 64, 86
    scale_notes = [p for p in range(low, high + 1) if (p - key_root) % 12 in SCALES[mode]]
    onset_prob = rng.uniform(0.4, 0.7)
    rhythm = [e for e in range(16) if e == 0 or rng.random() < (0.85 if e % 2 == 0 else onset_prob)]
    gate = rng.uniform(0.6, 0.95)
    silent_intro = len(chords) > 2 * progression_bars and rng.random() < 0.4

    def melody(cycle_chords: list[ChordSpan], previous: int) -> list[tuple[float, float, int]]:
        line = []
        for bar_pair in range(0, len(cycle_chords), 2):
            for e_i, eighth in enumerate(rhythm):
                bar = bar_pair + eighth // 8
                if bar >= len(cycle_chords):
                    break
                chord = cycle_chords[bar]
                start = chord.start + (eighth % 8) * 2 * sixteenth
                nxt = rhythm[e_i + 1] if e_i + 1 < len(rhythm) else 16
                length = min(nxt - eighth, 4) * 2 * sixteenth * gate
                if eighth % 2 == 0:
                    tones = [p for p in scale_notes if p % 12 in chord.pitch_classes]
                    tones.sort(key=lambda p: abs(p - previous))
                    pitch = tones[int(rng.integers(0, 2))]
                else:
                    i = scale_notes.index(previous) if previous in scale_notes else len(scale_notes) // 2
                    move = int(rng.choice([-2, -1, 1, 2]))
                    if (i < 3 and move < 0) or (i > len(scale_notes) - 4 and move > 0):
                        move = -move  # stay inside the range
                    pitch = scale_notes[int(np.clip(i + move, 0, len(scale_notes) - 1))]
                line.append((start, min(start + length, chord.end), pitch))
                previous = pitch
        return line

    notes: list[Note] = []
    motif: list[tuple[float, float, int]] | None = None
    first_start = 0.0
    for cycle, begin in enumerate(range(0, len(chords), progression_bars)):
        cycle_chords = chords[begin : begin + progression_bars]
        if silent_intro and cycle == 0:
            continue
        if motif is None:
            motif, first_start = melody(cycle_chords, scale_notes[len(scale_notes) // 2]), cycle_chords[0].start
            line = motif
        else:
            shift = cycle_chords[0].start - first_start
            line = [(s + shift, e + shift, p) for s, e, p in motif if s + shift < cycle_chords[-1].end]
            if cycle % 2 == 1 and len(cycle_chords) == progression_bars:  # answer phrase: new last bar
                last = cycle_chords[-1]
                kept = [n for n in line if n[0] < last.start]
                previous = kept[-1][2] if kept else scale_notes[len(scale_notes) // 2]
                line = kept + [n for n in melody(cycle_chords, previous) if n[0] >= last.start]
            line = [(s, min(e, chords[-1].end), p) for s, e, p in line]
        for s, e, p in line:
            accent = 0.85 if round(s / sixteenth) % 4 == 0 else 0.72
            notes.append(Note("lead", p, s, e, accent + rng.uniform(-0.05, 0.05)))
    return notes


def _render_pitched(notes: list[Note], timbre: Timbre, n_samples: int, sample_rate: int) -> np.ndarray:
    out = np.zeros(n_samples, dtype=np.float32)
    renderer = NoteRenderer(timbre, sample_rate)
    for note in notes:
        start = int(round(note.start * sample_rate))
        hold = max(int(round((note.end - note.start) * sample_rate)), 1)
        audio = renderer.render(note.pitch, hold)
        end = min(start + audio.size, n_samples)
        out[start:end] += note.velocity * audio[: end - start]
    return out


def _render_drums(hits: list[DrumHit], kit: dict[str, np.ndarray], n_samples: int, sample_rate: int) -> np.ndarray:
    out = np.zeros(n_samples, dtype=np.float32)
    for hit in hits:
        start = int(round(hit.time * sample_rate))
        sample = kit[hit.instrument]
        end = min(start + sample.size, n_samples)
        out[start:end] += hit.velocity * DRUM_GAINS[hit.instrument] * sample[: end - start]
    return out


def generate_song(seed: int, duration: float = 30.0, sample_rate: int = 32000, bpm: float | None = None,
                  key: str | None = None) -> Song:
    """Compose and render one song. `key` is like "A minor" or "F# major"; bpm in [80, 160]."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    rng = np.random.default_rng(seed)
    if bpm is not None and not 40 <= bpm <= 300:
        raise ValueError(f"bpm must be in [40, 300], got {bpm}")
    candidates = [s for s in STYLES if bpm is None or s.bpm[0] <= bpm <= s.bpm[1]] or list(STYLES)
    style = candidates[int(rng.integers(len(candidates)))]
    bpm = float(bpm if bpm is not None else rng.integers(style.bpm[0], style.bpm[1] + 1))
    if key is None:
        key_root, mode = int(rng.integers(12)), str(rng.choice(["major", "minor"]))
    else:
        key_root, mode = parse_key(key)
    key_name = f"{note_names(key_root, mode)[key_root]} {mode}"

    beat = 60.0 / bpm
    bar_seconds, sixteenth = 4 * beat, beat / 4
    n_samples = int(round(duration * sample_rate))
    n_bars = int(np.ceil(duration / bar_seconds - 1e-9))
    progression = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]
    sevenths = rng.random() < 0.3
    chords = []
    for bar in range(n_bars):
        root, pcs, name = diatonic_chord(key_root, mode, progression[bar % len(progression)], sevenths)
        start = bar * bar_seconds
        chords.append(ChordSpan(name=name, root=root, pitch_classes=pcs, bar=bar, start=round(start, 6),
                                end=round(min(start + bar_seconds, duration), 6)))

    hits = [h for h in _drum_hits(rng, style, n_bars, sixteenth) if h.time < duration]
    notes = _bass_notes(rng, style, chords, sixteenth) + _keys_notes(rng, style, chords, sixteenth)
    notes += _lead_notes(rng, key_root, mode, chords, len(progression), sixteenth)
    notes = [n for n in notes if n.start < duration]

    kit, kit_params = drum_kit(rng, sample_rate)
    timbres = {role: random_timbre(rng, role) for role in ("bass", "keys", "lead")}
    stems = {"drums": _render_drums(hits, kit, n_samples, sample_rate)}
    for role, timbre in timbres.items():
        stems[role] = _render_pitched([n for n in notes if n.stem == role], timbre, n_samples, sample_rate)
    for role, wet in (("keys", rng.uniform(0.1, 0.35)), ("lead", rng.uniform(0.1, 0.3))):
        stems[role] = _room(rng, stems[role], sample_rate, wet)
    stems = _set_levels(rng, stems)

    genres = [style.genre]
    moods = [str(m) for m in rng.choice(MOODS[mode], size=2, replace=False)]
    moods.append("energetic" if bpm >= 125 else "relaxed" if bpm < 95 else "groovy")
    beats = np.arange(0.0, duration - 1e-9, beat)
    metadata = SongMetadata(
        bpm=bpm, key=key_name, time_signature=(4, 4), chords=chords,
        beats=[round(float(b), 6) for b in beats], downbeats=[round(float(b), 6) for b in beats[::4]],
        genres=genres, moods=moods,
        description=describe(genres, moods),
        seed=int(seed), duration=n_samples / sample_rate, sample_rate=sample_rate, stems=list(STEMS),
        generator=GENERATOR,
    )
    timbre_info = {"drums": kit_params, **{r: t.to_dict() for r, t in timbres.items()}}
    return Song(metadata, stems, notes, hits, sample_rate, timbre_info)


def parse_key(key: str) -> tuple[int, str]:
    """"A minor" / "F# major" / "Bb minor" -> (pitch class, mode)."""
    parts = key.split()
    if len(parts) != 2 or parts[1] not in SCALES or not (parts[0] in NOTE_NAMES or parts[0] in FLAT_NAMES):
        raise ValueError(f"key must look like 'A minor', 'F# major' or 'Bb minor', got {key!r}")
    names = NOTE_NAMES if parts[0] in NOTE_NAMES else FLAT_NAMES
    return names.index(parts[0]), parts[1]


def _set_levels(rng: np.random.Generator, stems: dict[str, np.ndarray],
                mix_peak: float = 0.89) -> dict[str, np.ndarray]:
    """Peak-normalise each stem to a per-song level, then scale all down if the mix would clip."""
    levels = {"drums": rng.uniform(0.5, 0.7), "bass": rng.uniform(0.4, 0.55), "keys": rng.uniform(0.25, 0.4),
              "lead": rng.uniform(0.25, 0.4)}
    out = {name: x * (levels[name] / max(float(np.abs(x).max()), 1e-9)) for name, x in stems.items()}
    peak = float(np.abs(np.sum(list(out.values()), axis=0)).max())
    scale = min(1.0, mix_peak / peak)
    return {name: (x * scale).astype(np.float32) for name, x in out.items()}


def song_seed(seed: int, index: int) -> int:
    """The seed of song `index` of a dataset made with `seed` (independent streams per song)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_song(song: Song, song_dir: str | os.PathLike) -> Path:
    song_dir = Path(song_dir)
    for stem, audio in song.stems.items():
        write_audio(song_dir / stem / f"{stem}.wav", audio, song.sample_rate)
    (song_dir / METADATA_FILE).write_text(song.metadata.model_dump_json(indent=1))
    return song_dir


def write_dataset(root: str | os.PathLike, n_songs: int, seed: int = 0, duration: float = 30.0,
                  sample_rate: int = 32000, bpm_range: tuple[float, float] | None = None) -> list[Path]:
    """Write `n_songs` songs as root/song_00000 ... ; returns their folders.

    Song i uses `song_seed(seed, i)`, so a dataset can be extended or regenerated song by song.
    With `bpm_range` each tempo is drawn uniformly from it (e.g. held-out tempos for evaluation).
    """
    root = Path(root)
    folders = []
    for i in range(n_songs):
        s = song_seed(seed, i)
        bpm = None
        if bpm_range is not None:
            bpm = round(float(np.random.default_rng(s).uniform(*bpm_range)), 2)
        folders.append(write_song(generate_song(s, duration, sample_rate, bpm=bpm), root / f"song_{i:05d}"))
    return folders
