"""Checks on everything a user hands the Arranger, run before any model work starts.

Each problem gets one `InputError` that names it and says the fix. What is accepted:

- Context audio: a file soundfile reads (WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...) or a float
  array. Arrays are `[samples]`, `[channels, samples]` or `[samples, channels]` (the shorter
  axis is taken as channels) and need their sample rate.
  - Any sample rate from MIN_SAMPLE_RATE to MAX_SAMPLE_RATE; it is resampled later, per expert.
  - Stereo and multichannel audio is downmixed to mono by averaging the channels (what STAGE
    did in training and inference, reference §4); the channel count goes in the manifest.
  - Length from MIN_AUDIO_SECONDS (1 s; less is no musical context) to MAX_AUDIO_SECONDS
    (20 min: a bound on memory, since the song, its stems and all candidates are kept in memory).
  - NaN or infinite samples are refused (they would poison the codec); silence is accepted with
    a warning (the experts then follow the click, if any).
- BPM: 30 to 300 (the range of a metronome; outside it a click is noise or a drone).
- Duration: > 0 and at most MAX_AUDIO_SECONDS.
- Layers: known instruments only; an instrument used twice needs an explicit name for the
  second layer, since layer names key stems, files and commands.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError, UnknownInstrumentError

MIN_AUDIO_SECONDS = 1.0
MAX_AUDIO_SECONDS = 20 * 60.0
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
BPM_RANGE = (30.0, 300.0)
DEFAULT_BPM = 120.0  # the click tempo when neither a BPM nor a context is given
SILENCE_PEAK = 10 ** (-80 / 20)  # a peak below -80 dBFS counts as silence
MAX_CANDIDATES = 16


class SilentAudioWarning(UserWarning):
    """The context audio is silent; generation proceeds."""


@dataclass(frozen=True)
class ContextAudio:
    """Validated context audio: mono float32 at its own sample rate."""

    audio: np.ndarray
    sample_rate: int
    source: str  # the file path, or "<array>"
    sha256: str  # of the file's bytes, or of the array's float32 samples and rate
    channels: int  # before the downmix

    @property
    def seconds(self) -> float:
        return self.audio.shape[-1] / self.sample_rate


def _sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def check_sample_rate(sample_rate, where: str) -> int:
    """The one check of a sample rate (a file's, an array's, a song's): an integer in the range
    MIN_SAMPLE_RATE-MAX_SAMPLE_RATE, which the resampler and the codecs handle."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise InputError(f"{where}: sample rate must be an integer number of Hz, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InputError(f"{where}: sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; "
                         "resample the audio to a standard rate (e.g. 44100 or 48000 Hz)")
    return int(sample_rate)


def _check_length(seconds: float, where: str) -> None:
    if seconds < MIN_AUDIO_SECONDS:
        raise InputError(f"{where}: the audio is {seconds:.2f} s long; a context needs at least "
                         f"{MIN_AUDIO_SECONDS:g} s. Use a longer excerpt, or no context (start from a click)")
    if seconds > MAX_AUDIO_SECONDS:
        raise InputError(f"{where}: the audio is {seconds / 60:.1f} min long; the limit is "
                         f"{MAX_AUDIO_SECONDS / 60:g} min. Trim it, or arrange it in sections")


def _check_samples(mono: np.ndarray, where: str, sample_rate: int) -> None:
    finite = np.isfinite(mono)
    if not finite.all():
        bad = int((~finite).sum())
        first = int(np.argmin(finite))
        raise InputError(f"{where}: {bad} sample(s) are NaN or infinite (first at {first / sample_rate:.3f} s). "
                         "Re-export the audio from its source; stage-stack does not guess replacements")
    if mono.size == 0 or float(np.abs(mono).max()) < SILENCE_PEAK:
        warnings.warn(f"{where}: the context is silent (peak below -80 dBFS); the experts get no musical "
                      "context and follow the click, if one is used", SilentAudioWarning, stacklevel=3)


def read_context_file(path: str | os.PathLike) -> ContextAudio:
    """Read and check a context file (see the module docstring)."""
    import soundfile as sf

    from .audio import read_audio

    path = Path(path).expanduser()
    where = str(path)
    if not path.exists():
        raise InputError(f"{where}: no such file. Check the path (relative paths are from {Path.cwd()})")
    if path.is_dir():
        raise InputError(f"{where}: is a directory; pass an audio file such as mix.wav")
    if not os.access(path, os.R_OK):
        raise InputError(f"{where}: cannot be read (permission denied); fix its permissions (chmod +r)")
    if path.stat().st_size == 0:
        raise InputError(f"{where}: the file is empty (0 bytes); re-export the audio")
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise InputError(f"{where}: not an audio file that can be read ({e}). Use WAV, FLAC, OGG or MP3") from None
    if info.frames <= 0:
        raise InputError(f"{where}: the audio file holds no samples; re-export the audio")
    rate = check_sample_rate(info.samplerate, where)
    _check_length(info.frames / rate, where)
    try:
        mono, rate = read_audio(path)
    except (RuntimeError, OSError) as e:
        raise InputError(f"{where}: the audio data cannot be decoded ({e}); the file may be truncated. "
                         "Re-export it") from None
    _check_length(mono.shape[-1] / rate, where)
    _check_samples(mono, where, rate)
    return ContextAudio(mono, rate, str(path), _sha256_file(path), int(info.channels))


def _sha256_file(path: Path) -> str:
    from .expert import sha256_file

    return sha256_file(path)


def context_from_array(audio, sample_rate) -> ContextAudio:
    """Check an in-memory context (see the module docstring for the accepted shapes)."""
    where = "context array"
    if sample_rate is None:
        raise InputError(f"{where}: pass its sample rate too (context_sample_rate=44100, say)")
    rate = check_sample_rate(sample_rate, where)
    array = np.asarray(audio)
    if array.dtype.kind not in "f":
        raise InputError(f"{where}: dtype {array.dtype} is not floating point; pass float samples in [-1, 1] "
                         "(for 16-bit PCM, audio / 32768)")
    if array.ndim == 1:
        channels, mono = 1, array
    elif array.ndim == 2:
        channels_first = array.shape[0] <= array.shape[1]
        channels = array.shape[0] if channels_first else array.shape[1]
        mono = array.mean(axis=0 if channels_first else 1) if channels > 1 else array.reshape(-1)
    else:
        raise InputError(f"{where}: shape {array.shape} is not audio; use [samples] or [channels, samples]")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise InputError(f"{where}: the array is empty")
    _check_samples(mono, where, rate)  # before the length check: NaN is the more useful error
    _check_length(mono.shape[-1] / rate, where)
    digest = _sha256_bytes(np.ascontiguousarray(array, dtype=np.float32).tobytes(), str(rate).encode())
    return ContextAudio(mono, rate, "<array>", digest, channels)


def load_context(context, sample_rate: int | None = None) -> ContextAudio | None:
    """A path, an array (with `sample_rate`), or None -> checked ContextAudio or None."""
    if context is None:
        return None
    if isinstance(context, ContextAudio):
        return context
    if isinstance(context, (str, os.PathLike)):
        return read_context_file(context)
    if hasattr(context, "detach"):  # a torch tensor
        context = context.detach().cpu().numpy()
    if isinstance(context, np.ndarray):
        return context_from_array(context, sample_rate)
    raise InputError(f"context must be a path, a numpy array or None, got {type(context).__name__}")


def check_bpm(bpm: float | None) -> float | None:
    """None (no tempo given) or a tempo within BPM_RANGE."""
    if bpm is None:
        return None
    try:
        value = float(bpm)
    except (TypeError, ValueError):
        raise InputError(f"BPM must be a number, got {bpm!r}") from None
    low, high = BPM_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"BPM {bpm} is outside {low:g}-{high:g}; give the tempo in beats per minute "
                         "(a very slow or fast song can use half or double its tempo)")
    return value


def check_duration(duration: float | None, context: ContextAudio | None, default: float) -> float:
    """The song length: `duration`, else the context's length, else `default`."""
    if duration is None:
        return context.seconds if context is not None else default
    try:
        value = float(duration)
    except (TypeError, ValueError):
        raise InputError(f"duration must be a number of seconds, got {duration!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"duration must be more than 0 seconds, got {duration!r}")
    if value > MAX_AUDIO_SECONDS:
        raise InputError(f"duration {value:g} s is over the {MAX_AUDIO_SECONDS / 60:g} min limit; "
                         "arrange the song in sections")
    return value


def check_layers(layers: Sequence, known: Iterable[str], taken: Iterable[str] = ()) -> None:
    """Every layer names a known instrument, and layer names are unique (also against `taken`,
    the names of the layers an arrangement already has).

    `layers` are objects with `.instrument` and `.name` (None = the instrument's name).
    """
    known = sorted(set(known))
    if not layers:
        raise InputError("no layers to arrange; name at least one instrument, e.g. ['drums', 'bass']")
    for layer in layers:
        if layer.instrument not in known:
            raise UnknownInstrumentError(f"unknown instrument {layer.instrument!r}; known instruments: "
                                         f"{', '.join(known) or 'none'}. Install an expert for it "
                                         f"(`stage-stack install {layer.instrument} PATH`) or check the spelling")
    taken = set(taken)
    seen: dict[str, str] = {name: name for name in taken}
    for layer in layers:
        name = layer.name or layer.instrument
        if name in taken:
            raise InputError(f"the song already has a layer named {name!r}; give the new one its own name: "
                             f"Layer({layer.instrument!r}, name='{layer.instrument}2') (CLI: `stage-stack add SONG "
                             f"{layer.instrument}2={layer.instrument}`), or regenerate the existing one with "
                             f"`stage-stack redo SONG {name}`")
        if name in seen:
            if layer.name is None:
                raise InputError(f"instrument {layer.instrument!r} is used twice; give the second layer its own "
                                 f"name: Layer({layer.instrument!r}, name='{layer.instrument}2') "
                                 f"(CLI: --add {layer.instrument},{layer.instrument}2={layer.instrument})")
            raise InputError(f"two layers are named {name!r}; layer names must be unique")
        seen[name] = layer.instrument
