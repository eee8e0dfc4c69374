"""The arrangement directory on disk: file names, the commit protocol, recovery and cleanup.

An arrangement on disk (`Arrangement`) is a directory:

    manifest.json                      what was done and how to redo it (stage_stack.manifest)
    mix.wav                            the limited mix (never includes the click)
    context.wav                        the input mix, mono at the song's rate (when one was given)
    stems/<layer>.wav                  each layer's picked candidate
    candidates/<layer>/take<T>-<i>.wav every candidate of the current take of each layer

Audio is 32-bit float WAV, so a reopened arrangement continues from exactly what was written.
`manifest.files` records the sha256 of each file's samples (`audio_digest`), not of its bytes:
libsndfile stamps float WAVs with the time of writing, and two identical songs must compare equal.
Writes are atomic at the layer level: every file is written under a temporary name, then the
manifest is replaced (the commit point), then the files are renamed into place, then the files
the old manifest had and the new one does not are deleted. A crash or Ctrl-C before the commit
point leaves the arrangement as it was; one after it is finished when the arrangement is opened
again (temporary files whose samples the manifest expects are renamed, derived files that are
still missing are rendered again, other temporary files are deleted). Running the same
`arrange` again resumes with the layers that are missing. Files the arrangement did not write
are never touched.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Mapping

import numpy as np

from .audio import write_audio
from .errors import ArrangementError, InputError
from .manifest import MANIFEST_NAME, LayerRecord, Manifest


def candidate_file(name: str, take: int, index: int) -> str:
    return f"candidates/{name}/take{take}-{index}.wav"


def stem_file(name: str) -> str:
    return f"stems/{name}.wav"


MIX_FILE = "mix.wav"
CONTEXT_FILE = "context.wav"
_OWNED = re.compile(r"^(mix\.wav|context\.wav|stems/[^/]+\.wav|candidates/[^/]+/take\d+-\d+\.wav)$")
_TEMP = re.compile(r"^\..+\.tmp(\.wav)?$")
_TAKE = re.compile(r"^candidates/[^/]+/take\d+-\d+\.wav$")


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> str:
    """Write float32 WAV, flush it to disk, and return its `audio_digest`."""
    write_audio(path, audio, sample_rate, subtype="FLOAT")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return audio_digest(path)


def audio_digest(path: str | os.PathLike) -> str:
    """sha256 of an audio file's samples (float32, as read), channel count and sample rate."""
    return read_with_digest(path)[2]


def read_with_digest(path: str | os.PathLike) -> tuple[np.ndarray, int, str]:
    """([frames, channels] float32, rate, digest) from one read of the file."""
    import hashlib

    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    h = hashlib.sha256(f"{rate}:{data.shape[1]}:".encode())
    h.update(np.ascontiguousarray(data).tobytes())
    return data, rate, h.hexdigest()


def matches(path: Path, manifest: Manifest, rel: str) -> bool:
    try:
        return path.is_file() and audio_digest(path) == manifest.files.get(rel)
    except RuntimeError:  # unreadable (truncated) audio
        return False


class Arrangement:
    """An arrangement directory: manifest.json plus audio files, written atomically (module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> Manifest:
        return Manifest.load(self.manifest_path)

    def holds_another(self, other: Manifest, how: str, commands: str) -> InputError:
        """The error for an output directory that holds an arrangement this one must not overwrite."""
        return InputError(f"{self.path} already holds another arrangement ({', '.join(other.layer_names) or 'no layers'}"
                          f", created {other.created:%Y-%m-%d %H:%M}){how}. Choose another output directory, or "
                          f"{commands} {self.path}`")

    def check_new(self, arrangement_id: str) -> None:
        """Refuse a directory that holds another arrangement, or files an arrangement would overwrite."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory; choose an output directory")
        if self.exists():
            other = self.read_manifest()
            if other.arrangement_id != arrangement_id:
                raise self.holds_another(other, "", "work on that one with `stage-stack add/redo/show")
            return
        clashes = [rel for rel in self._owned_files() if rel != MANIFEST_NAME]
        if clashes:
            raise InputError(f"{self.path} holds files an arrangement would overwrite ({', '.join(clashes[:5])}) "
                             "but no manifest.json; choose an empty or new output directory")

    def _owned_files(self) -> list[str]:
        if not self.path.is_dir():
            return []
        found = []
        for path in self.path.rglob("*"):
            rel = path.relative_to(self.path).as_posix()
            if path.is_file() and _OWNED.match(rel):
                found.append(rel)
        return sorted(found)

    def commit(self, manifest: Manifest, files: Mapping[str, np.ndarray]) -> None:
        """Write `files` under temp names, replace the manifest (the commit point), rename them.

        Then the files the previous manifest referenced and this one does not are deleted.
        """
        previous = set(self.read_manifest().files) if self.exists() else set()
        self.path.mkdir(parents=True, exist_ok=True)
        temps: dict[str, Path] = {}
        committed = False
        try:
            for rel, audio in files.items():
                path = self.path / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                temps[rel] = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.wav"
                manifest.files[rel] = _write_wav(temps[rel], audio, manifest.sample_rate)
            expected = expected_files(manifest)
            manifest.files = {rel: manifest.files[rel] for rel in sorted(expected) if rel in manifest.files}
            manifest.save(self.manifest_path)  # the commit point
            committed = True
            for rel, tmp in temps.items():
                os.replace(tmp, self.path / rel)
        finally:
            if not committed:  # after the commit point the temp files are the new state: keep them
                for tmp in temps.values():
                    tmp.unlink(missing_ok=True)
        for rel in sorted(previous - set(manifest.files)):
            (self.path / rel).unlink(missing_ok=True)
        self.remove_leftovers(manifest)

    def finish_renames(self, manifest: Manifest) -> list[str]:
        """After a crash between the commit point and the renames: move each temp file whose
        samples are what the manifest expects into place."""
        finished = []
        for rel, digest in manifest.files.items():
            path = self.path / rel
            if matches(path, manifest, rel):
                continue
            for tmp in sorted(path.parent.glob(f".{path.name}.*.tmp.wav")):
                if audio_digest(tmp) == digest:
                    os.replace(tmp, path)
                    finished.append(rel)
                    break
        return finished

    def remove_leftovers(self, manifest: Manifest) -> list[str]:
        """Delete temp files, and candidate takes the manifest does not reference (nothing else)."""
        removed = []
        for folder in [self.path, self.path / "stems", *sorted((self.path / "candidates").glob("*"))]:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                rel = path.relative_to(self.path).as_posix()
                orphan_take = _TAKE.match(rel) and rel not in manifest.files
                if path.is_file() and (_TEMP.match(path.name) or orphan_take):
                    path.unlink()
                    removed.append(rel)
        for folder in sorted((self.path / "candidates").glob("*"), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def has_take(self, record: LayerRecord) -> bool:
        """Whether the manifest on disk already has this take of the layer."""
        try:
            on_disk = self.read_manifest()
        except ArrangementError:
            return False
        return any(layer.name == record.name and layer.take == record.take for layer in on_disk.layers)

    def read(self, rel: str, manifest: Manifest) -> np.ndarray:
        """An audio file of the arrangement, checked against the manifest's sha256."""
        path = self.path / rel
        try:
            data, rate, digest = read_with_digest(path)
        except (OSError, RuntimeError):  # missing or unreadable
            digest = None
        if digest is None or digest != manifest.files.get(rel):
            raise ArrangementError(f"{path}: missing, or changed since it was written (sha256 differs from "
                                   f"{MANIFEST_NAME}). Restore it, or regenerate its layer with `stage-stack redo`")
        if rate != manifest.sample_rate or data.shape[1] != 1:
            raise ArrangementError(f"{path}: {data.shape[1]} channel(s) at {rate} Hz, but the arrangement is mono "
                                   f"at {manifest.sample_rate} Hz")
        return data[:, 0].copy()


def expected_files(manifest: Manifest) -> set[str]:
    files = {MIX_FILE}
    if manifest.context is not None:
        files.add(CONTEXT_FILE)
    for layer in manifest.layers:
        files.add(stem_file(layer.name))
        files.update(layer.files)
    return files

