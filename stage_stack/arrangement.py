"""The arrangement directory on disk: file names, the commit protocol, locking, history and cleanup.

An arrangement on disk (`Arrangement`) is a directory:

    manifest.json                      what was done and how to redo it (stage_stack.manifest)
    mix.wav                            the limited mix (never includes the click)
    context.wav                        the input mix, mono at the song's rate (when one was given)
    stems/<layer>.wav                  each layer's picked candidate
    candidates/<layer>/take<T>-<i>.wav every candidate of every take of each layer (until `prune`)
    history/revision-<R>.json          the manifest as it was before each change (for `undo`)
    .stage-stack.lock                  the writers' lock (holds the pid of the last writer)

Audio is 32-bit float WAV, so a reopened arrangement continues from exactly what was written.
`manifest.files` records the sha256 of each file's samples (`audio_digest`), not of its bytes:
libsndfile stamps float WAVs with the time of writing, and two identical songs must compare equal.

One writer at a time: every change holds the directory's lock (`Arrangement.lock`, see
stage_stack.locks) and is refused if the manifest on disk is not the revision it started from.

Writes are atomic at the layer level: every file is written under a temporary name (with the
writer's pid, stage_stack.atomic), then the manifest is replaced (the commit point), then the
files are renamed into place, then derived files (stems, mix) the new manifest no longer has are
deleted. A crash or kill before the commit point leaves the arrangement as it was; one after it
is finished when the arrangement is opened again (temporary files whose samples the manifest
expects are renamed, derived files that are missing are rendered again, temporary files of
writers that are gone are deleted). Candidates are never deleted by a change: `prune` removes
the takes the current manifest does not use, and the history.

Nothing the user made is touched: every path from a manifest is confined to the directory
(stage_stack.confined); a file is overwritten or deleted only if its samples are still what the
manifest recorded (a hand-edited stem or mix is refused unless `force`); temp files are ours by
name and pid.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from . import faults
from .atomic import atomic_write_text, stale_temp, temp_path
from .audio import write_audio
from .confined import inside
from .errors import ArrangementError, InputError
from .locks import exclusive
from .manifest import MANIFEST_NAME, LayerRecord, Manifest


def candidate_file(name: str, take: int, index: int) -> str:
    return f"candidates/{name}/take{take}-{index}.wav"


def stem_file(name: str) -> str:
    return f"stems/{name}.wav"


def snapshot_file(revision: int) -> str:
    return f"{HISTORY_DIR}/revision-{revision:06d}.json"


MIX_FILE = "mix.wav"
CONTEXT_FILE = "context.wav"
HISTORY_DIR = "history"
LOCK_FILE = ".stage-stack.lock"
_LAYER = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # layer.LAYER_NAME: what a stem or candidate folder can be named
_OWNED = re.compile(rf"^(mix\.wav|context\.wav|stems/{_LAYER}\.wav|candidates/{_LAYER}/take\d+-\d+\.wav|"
                    r"history/revision-\d+\.json)$")
_DERIVED = re.compile(rf"^(mix\.wav|stems/{_LAYER}\.wav)$")  # rendered from the candidates; may be re-rendered
_TAKE = re.compile(r"^take(\d+)-(\d+)\.wav$")
_SNAPSHOT = re.compile(r"^revision-(\d+)\.json$")


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


def matches(path: Path, digest: str | None) -> bool:
    """Whether `path` is an audio file whose samples have `digest`."""
    if digest is None:
        return False
    try:
        return path.is_file() and audio_digest(path) == digest
    except RuntimeError:  # unreadable (truncated) audio, or not audio at all
        return False


@dataclass(frozen=True)
class Revision:
    """One state of an arrangement in its history (`Song.history`)."""

    revision: int
    time: str  # when the change that made it was logged (UTC, ISO 8601)
    action: str  # the change that made this state: "arrange", "add", "pick", "redo", "remove", "mix", "undo"
    detail: str
    layers: list[str]  # "name take.pick gain" per layer
    current: bool

    def line(self) -> str:
        mark = " (current)" if self.current else ""
        return (f"revision {self.revision}{mark}  {self.time}  {self.action} {self.detail}".rstrip()
                + f"\n    layers: {', '.join(self.layers) or 'none'}")


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

    def file(self, rel: str) -> Path:
        """The path of a file the manifest names, confined to the directory (PathEscapeError)."""
        return inside(self.path, rel)

    # -- one writer at a time ---------------------------------------------------------------
    @contextmanager
    def lock(self, wait: bool | float = False) -> Iterator[None]:
        """Hold the directory's writer lock. wait=False fails at once with "song X is being changed
        by process N"; True waits; a number waits that many seconds. A directory this call had to
        create is removed again if nothing but the lock file ended up in it."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory; choose an output directory")
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive(self.path / LOCK_FILE, f"song {self.path}", wait,
                           "pass --wait (wait=True in Python) to queue behind it"):
                yield
        finally:
            if created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()

    def check_revision(self, manifest: Manifest) -> Manifest | None:
        """The manifest on disk (None if there is none); refused if it is not `manifest`'s revision."""
        if not self.exists():
            return None
        disk = self.read_manifest()
        if disk.arrangement_id != manifest.arrangement_id or disk.revision != manifest.revision:
            raise ArrangementError(
                f"{self.path} was changed by another process since this session read it (revision "
                f"{manifest.revision}, now {disk.revision}); nothing was written. Open it again and redo the change")
        return disk

    # -- a new directory --------------------------------------------------------------------
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

    # -- the commit -------------------------------------------------------------------------
    def commit(self, manifest: Manifest, files: Mapping[str, np.ndarray], *, force: bool = False,
               snapshot: bool | None = None) -> None:
        """Write `files` under temp names, replace the manifest (the commit point), rename them.

        Then the derived files (stems, mix) the previous manifest had and this one does not are
        deleted. Refused if the manifest on disk is not `manifest.revision` (another writer), or
        if a file that would be overwritten or deleted was changed since it was written (unless
        `force`). `snapshot` (default: when `manifest` logged a new change) keeps the previous
        manifest in history/ for `undo`. `manifest.revision` is advanced.
        """
        with self.lock(wait=True):  # re-entrant: callers normally hold it already
            disk = self.check_revision(manifest)
            previous = disk.files if disk is not None else {}
            expected = expected_files(manifest)
            doomed = sorted(rel for rel in previous if rel not in expected and _DERIVED.match(rel))
            self.check_untouched([*files, *doomed], previous, force)
            if snapshot is None:
                snapshot = disk is not None and len(manifest.history) > len(disk.history)
            old_revision, old_previous = manifest.revision, manifest.previous_revision
            self.path.mkdir(parents=True, exist_ok=True)
            temps: dict[str, Path] = {}
            committed = False
            new_snapshot = snapshot and not self.file(snapshot_file(disk.revision)).exists()
            try:
                if snapshot:
                    atomic_write_text(self.file(snapshot_file(disk.revision)), disk.model_dump_json(indent=2) + "\n")
                    manifest.previous_revision = disk.revision
                for rel, audio in files.items():
                    path = self.file(rel)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    temps[rel] = temp_path(path, ".tmp.wav")
                    manifest.files[rel] = _write_wav(temps[rel], audio, manifest.sample_rate)
                    faults.point("commit:writing")
                manifest.files = {rel: manifest.files[rel] for rel in sorted(expected) if rel in manifest.files}
                manifest.revision = (disk.revision if disk is not None else manifest.revision) + 1
                faults.point("commit:before-manifest")
                manifest.save(self.manifest_path)  # the commit point
                committed = True
                faults.point("commit:after-manifest")
                for rel, tmp in temps.items():
                    os.replace(tmp, self.file(rel))
                faults.point("commit:after-renames")
            finally:
                if not committed:  # after the commit point the temp files are the new state: keep them
                    manifest.revision, manifest.previous_revision = old_revision, old_previous
                    for tmp in temps.values():
                        tmp.unlink(missing_ok=True)
                    if new_snapshot:
                        self.file(snapshot_file(disk.revision)).unlink(missing_ok=True)
            for rel in doomed:
                self.file(rel).unlink(missing_ok=True)
            self.remove_leftovers(manifest)

    def check_untouched(self, rels: Iterable[str], recorded: Mapping[str, str], force: bool = False) -> None:
        """Refuse (ArrangementError) to overwrite or delete a file whose samples are not the ones
        `recorded` says stage-stack wrote: the user edited it, or it is not ours."""
        if force:
            return
        edited = [rel for rel in dict.fromkeys(rels) if self.file(rel).exists() and
                  not matches(self.file(rel), recorded.get(rel))]
        if edited:
            raise ArrangementError(
                f"{self.path}: {', '.join(edited)} changed since stage-stack wrote it (its samples' sha256 differs "
                f"from {MANIFEST_NAME}), or stage-stack did not write it; nothing was written. Move or copy it "
                "elsewhere to keep your edit, or pass --force (force=True in Python) to overwrite it")

    def next_take(self, name: str, current: int) -> int:
        """The take number for a new take of `name`: after the current one and every take on disk
        (takes of undone changes stay on disk until `prune`, and are never overwritten)."""
        return max([current, *self.takes_on_disk(name)]) + 1

    def takes_on_disk(self, name: str) -> dict[int, list[str]]:
        """{take: [candidate files]} found in candidates/<name>/."""
        folder = self.file(f"candidates/{name}")
        takes: dict[int, list[str]] = {}
        if folder.is_dir():
            for path in sorted(folder.iterdir(), key=lambda p: p.name):
                match = _TAKE.match(path.name)
                if match and path.is_file():
                    takes.setdefault(int(match.group(1)), []).append(f"candidates/{name}/{path.name}")
        return dict(sorted(takes.items()))

    # -- recovery ---------------------------------------------------------------------------
    def finish_renames(self, manifest: Manifest) -> list[str]:
        """After a crash between the commit point and the renames: move each temp file whose
        samples are what the manifest expects into place."""
        finished = []
        for rel, digest in manifest.files.items():
            path = self.file(rel)
            if matches(path, digest):
                continue
            for tmp in sorted(path.parent.glob(f".{path.name}.stage-stack-*.tmp.wav")):
                if matches(tmp, digest):
                    os.replace(tmp, path)
                    finished.append(rel)
                    break
        return finished

    def remove_leftovers(self, manifest: Manifest | None = None) -> list[str]:
        """Delete stage-stack temp files of writers that are gone (nothing else)."""
        removed = []
        folders = [self.path, self.path / "stems", self.path / HISTORY_DIR,
                   *sorted((self.path / "candidates").glob("*"))]
        for folder in folders:
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_file() and stale_temp(path.name):
                    path.unlink(missing_ok=True)
                    removed.append(path.relative_to(self.path).as_posix())
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
        path = self.file(rel)
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

    # -- history ----------------------------------------------------------------------------
    def snapshot(self, revision: int) -> Manifest:
        """The manifest as it was at `revision` (from history/)."""
        path = self.file(snapshot_file(revision))
        if not path.is_file():
            raise ArrangementError(f"{path}: the history of revision {revision} is gone (removed by `stage-stack "
                                   "prune`, or by hand); it cannot be restored")
        return Manifest.load(path)

    def history(self, manifest: Manifest) -> list[Revision]:
        """The states `undo` can go back to, newest (the current one) first."""
        out, seen, m, current = [], set(), manifest, True
        while True:
            entry = m.history[-1] if m.history else None
            out.append(Revision(m.revision, entry.time.isoformat() if entry else m.updated.isoformat(),
                                entry.action if entry else "", entry.detail if entry else "",
                                [f"{layer.name} {layer.state}" for layer in m.layers], current))
            seen.add(m.revision)
            if m.previous_revision is None or m.previous_revision in seen:
                return out
            try:
                m = self.snapshot(m.previous_revision)
            except ArrangementError:
                return out
            current = False

    def snapshots_on_disk(self) -> dict[int, str]:
        folder = self.path / HISTORY_DIR
        found = {}
        if folder.is_dir():
            for path in folder.iterdir():
                match = _SNAPSHOT.match(path.name)
                if match and path.is_file():
                    found[int(match.group(1))] = f"{HISTORY_DIR}/{path.name}"
        return dict(sorted(found.items()))


def expected_files(manifest: Manifest) -> set[str]:
    files = {MIX_FILE}
    if manifest.context is not None:
        files.add(CONTEXT_FILE)
    for layer in manifest.layers:
        files.add(stem_file(layer.name))
        files.update(layer.files)
    return files
