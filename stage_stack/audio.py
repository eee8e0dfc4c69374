"""Audio helpers shared by the dataset, the synthetic band and the CLI (numpy in, numpy out).

Conventions: audio is float32, mono signals are 1-D `[samples]`, multichannel is
`[channels, samples]` (channels first, as in torch). Files are read with soundfile and
resampled with soxr; nothing here needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CLICK_FREQ_HZ = 1000.0
CLICK_SECONDS = 0.1


def read_audio(path: str | os.PathLike, sample_rate: int | None = None, start: int = 0,
               stop: int | None = None) -> tuple[np.ndarray, int]:
    """Read `path` as mono float32: multichannel files are averaged (STAGE downmixes the same way).

    `start`/`stop` are frame indices at the file's own rate, so a window is read without
    decoding the whole file. With `sample_rate` the result is resampled to it; the returned rate
    is the rate of the returned samples. Errors are soundfile's (`soundfile.LibsndfileError`,
    a `RuntimeError`) or `OSError`.
    """
    import soundfile as sf

    data, file_rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    if start == 0 and stop is None:
        warn_if_truncated(path, data.shape[0], file_rate)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and sample_rate != file_rate:
        return resample(mono, file_rate, sample_rate), sample_rate
    return np.ascontiguousarray(mono, dtype=np.float32), file_rate


class TruncatedAudioWarning(UserWarning):
    """An audio file holds less audio than its header says (cut short by an interrupted copy)."""


def declared_frames(path: str | os.PathLike) -> int | None:
    """The length in frames a file's header promises: a WAV's `data` chunk size, or what the
    decoder reports from the header (an MP3's Xing/Info frame count); None when unknown."""
    import soundfile as sf

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if kind == b"fmt ":
                    fmt = f.read(size)
                    block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else None
                    f.seek(size % 2, 1)
                elif kind == b"data":
                    # 0 and 0xFFFFFFFF are what streaming writers put before they know the size
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                else:
                    f.seek(size + size % 2, 1)
    try:
        return int(sf.info(str(path)).frames)
    except (RuntimeError, OSError):
        return None


def warn_if_truncated(path: str | os.PathLike, frames: int, sample_rate: int) -> None:
    """Warn (TruncatedAudioWarning) when `frames` read from `path` fall short of its header's length."""
    declared = declared_frames(path)
    if declared is not None and frames < declared:
        import warnings

        warnings.warn(f"{path}: the audio ends after {frames / sample_rate:.2f} s, but its header says "
                      f"{declared / sample_rate:.2f} s: the file was cut short (an interrupted copy or download?). "
                      f"The {frames / sample_rate:.2f} s it holds are used; copy or export it again to use all of it",
                      TruncatedAudioWarning, stacklevel=3)


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write `[samples]` or `[channels, samples]` audio; creates parent folders.

    16-bit PCM (the default) clips outside [-1, 1): callers keep levels below that; use
    subtype="FLOAT" to keep out-of-range samples.
    """
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, dtype=np.float32)
    sf.write(str(path), audio.T if audio.ndim == 2 else audio, sample_rate, subtype=subtype)
    return path


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample along the last axis with soxr (high quality); returns float32."""
    audio = np.asarray(audio, dtype=np.float32)
    if sr_in == sr_out:
        return audio
    import soxr

    if audio.ndim == 1:
        return soxr.resample(audio, sr_in, sr_out).astype(np.float32, copy=False)
    # soxr wants [samples, channels]
    return np.ascontiguousarray(soxr.resample(audio.T, sr_in, sr_out).T, dtype=np.float32)


def click(sample_rate: int, freq: float = CLICK_FREQ_HZ, seconds: float = CLICK_SECONDS) -> np.ndarray:
    """One metronome click as librosa.clicks makes it: a sine whose amplitude decays 1 -> 2^-10."""
    n = int(round(sample_rate * seconds))
    decay = np.logspace(0, -10, num=n, base=2.0)
    return (decay * np.sin(2 * np.pi * freq / sample_rate * np.arange(n))).astype(np.float32)


def _clicks_at(times: np.ndarray, sample_rate: int, length: int, one_click: np.ndarray) -> np.ndarray:
    out = np.zeros(length, dtype=np.float32)
    # librosa truncates times to samples and lets a later click overwrite an earlier one.
    for start in (np.asarray(times, dtype=np.float64) * sample_rate).astype(np.int64):
        if start < 0 or start >= length:
            continue
        end = min(start + one_click.size, length)
        out[start:end] = one_click[: end - start]
    return out


def click_track(beats, downbeats, sample_rate: int, length: int) -> np.ndarray:
    """STAGE's metronome context: clicks on `beats` plus clicks on `downbeats`, clipped to [-1, 1].

    Times are in seconds from the start of the track; clicks outside [0, length) are dropped.
    Downbeats are also beats, so they sum to double amplitude and clipping turns them into a
    louder, saturated click of the same 1 kHz pitch: that is the accent (reference §5).
    """
    one_click = click(sample_rate)
    track = _clicks_at(beats, sample_rate, length, one_click) + _clicks_at(downbeats, sample_rate, length, one_click)
    return np.clip(track, -1.0, 1.0)
