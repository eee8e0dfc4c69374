"""DAW-ready export of an arrangement: `stage-stack export SONG` and the studio's download.

    export/                       (SONG/export/ unless another folder is given)
      stems/<layer>.wav           the picked candidate of each layer, its mix gain applied
      mix.wav                     the limited mix, as mix.wav in the song
      click.wav                   the click the experts heard (when the song has a tempo)
      tempo.mid                   a standard MIDI file: the tempo, 4/4, one note per click
      manifest.json               the song's manifest (how to reproduce it)

Every audio file has the same rate and the same number of samples, starting at 0, so they line
up when dropped on a DAW's timeline. WAV files are 32-bit float (out-of-range samples are kept)
and carry the tempo in an ACID chunk (stage_stack.daw), which Ableton Live, FL Studio and Reaper
read; FLAC cannot hold one, so FLAC files are 24-bit and carry `bpm=...` in their comment tag.
With `zip_path`, the same files go into one zip archive instead (written atomically).
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .audio import resample
from .daw import AcidInfo, click_midi, with_acid_chunk
from .errors import InputError
from .manifest import MANIFEST_NAME
from .mixing import fit_length, metronome

FORMATS = ("wav", "flac")
EXPORT_RATES = (22050, 32000, 44100, 48000, 88200, 96000)
DEFAULT_EXPORT_RATE = 48000
EXPORT_DIR = "export"


@dataclass(frozen=True)
class ExportOptions:
    format: str = "wav"
    rate: int = DEFAULT_EXPORT_RATE
    stereo: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"export format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.rate not in EXPORT_RATES:
            raise InputError(f"export rate must be one of {', '.join(map(str, EXPORT_RATES))} Hz, got {self.rate!r}")


def _encode(audio: np.ndarray, rate: int, options: ExportOptions, bpm: float | None, beats: int) -> bytes:
    """One audio file's bytes: [samples] mono, duplicated to two channels with `stereo`."""
    import soundfile as sf

    frames = np.stack([audio, audio], axis=1) if options.stereo else audio[:, None]
    buffer = io.BytesIO()
    if options.format == "wav":
        sf.write(buffer, frames, rate, format="WAV", subtype="FLOAT")
        data = buffer.getvalue()
        return with_acid_chunk(data, AcidInfo(tempo=bpm, beats=beats)) if bpm is not None else data
    with sf.SoundFile(buffer, "w", rate, frames.shape[1], format="FLAC", subtype="PCM_24") as f:
        if bpm is not None:
            f.comment = f"bpm={bpm:g}"
        f.write(np.clip(frames, -1.0, 1.0 - 2.0 ** -23))
    return buffer.getvalue()


def export_files(song_dir: str | os.PathLike, options: ExportOptions = ExportOptions()) -> dict[str, bytes]:
    """{relative path: bytes} of the export of the arrangement in `song_dir` (module docstring)."""
    from .arranger import Song

    song = Song.open(song_dir)  # checks every file against the manifest
    m = song.manifest
    samples = int(round(m.samples * options.rate / m.sample_rate))
    bpm = m.bpm
    beats = int(np.ceil(m.duration * bpm / 60.0 - 1e-9)) if bpm is not None else 0

    def audio_at_rate(audio: np.ndarray) -> np.ndarray:
        return fit_length(resample(audio, m.sample_rate, options.rate), samples)

    ext = options.format
    files: dict[str, bytes] = {}
    for layer in m.layers:
        stem = song.stems[layer.name] * np.float32(10 ** (layer.gain_db / 20))
        files[f"stems/{layer.name}.{ext}"] = _encode(audio_at_rate(stem), options.rate, options, bpm, beats)
    files[f"mix.{ext}"] = _encode(audio_at_rate(song.mix), options.rate, options, bpm, beats)
    if bpm is not None:
        click = metronome(bpm, samples, options.rate)
        files[f"click.{ext}"] = _encode(click.astype(np.float32), options.rate, options, bpm, beats)
        files["tempo.mid"] = click_midi(bpm, beats)
    files[MANIFEST_NAME] = (Path(song_dir) / MANIFEST_NAME).read_bytes()
    return files


def export_song(song_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                options: ExportOptions = ExportOptions(), zip_file: bool = False) -> Path:
    """Write the export into folder `out` (default SONG/export/), or a zip (default SONG/export.zip).

    A folder is only written into when it is new, empty or an earlier export (it holds a
    manifest.json and nothing the export would not write), so nothing the user made is replaced.
    """
    song_dir = Path(song_dir)
    files = export_files(song_dir, options)
    if zip_file:
        target = Path(out) if out is not None else song_dir / f"{EXPORT_DIR}.zip"
        if target.is_dir():
            raise InputError(f"{target} is a directory; give the zip file's path, e.g. {target / 'song.zip'}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(zip_bytes(files))
        return target
    target = Path(out) if out is not None else song_dir / EXPORT_DIR
    earlier = _check_export_dir(target, files)
    for rel, data in files.items():
        with atomic_path(target / rel) as tmp:
            tmp.write_bytes(data)
    for rel in sorted(earlier - set(files)):  # an earlier export's stem of a layer removed since
        (target / rel).unlink()
    return target


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            z.writestr(rel, data)
    return buffer.getvalue()


def _check_export_dir(target: Path, files: dict[str, bytes]) -> set[str]:
    """The files of an earlier export in `target`; refuses a folder that holds anything else."""
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory; choose another export folder")
    if not target.is_dir() or not any(target.iterdir()):
        return set()
    ours = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    foreign = sorted(rel for rel in ours if not _export_name(rel))
    if MANIFEST_NAME not in ours or foreign:
        shown = ", ".join(foreign[:5]) or "no manifest.json"
        raise InputError(f"{target} holds files that are not an earlier export ({shown}); choose an empty or "
                         "new export folder (-o DIR)")
    return ours


def _export_name(rel: str) -> bool:
    stem, _, ext = rel.rpartition(".")
    if rel in (MANIFEST_NAME, "tempo.mid"):
        return True
    return ext in FORMATS and (stem in ("mix", "click") or (stem.startswith("stems/") and "/" not in stem[6:]))
