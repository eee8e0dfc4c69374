"""`Song`: an arrangement in memory (the result object), and the session operations that need no expert.

A song with a `path` writes every change to its arrangement directory (stage_stack.arrangement).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from .arrangement import CONTEXT_FILE, MIX_FILE, Arrangement, Revision, matches, snapshot_file, stem_file
from .atomic import atomic_write_text
from .errors import ArrangementError, InputError
from .manifest import MANIFEST_NAME, Manifest, parse_state
from .mixing import render_mix


@dataclass
class Song:
    """An arrangement in memory: its manifest, the context, every layer's candidates and the mix.

    When `path` is set (the song was arranged with `out=`, opened, or saved), every change is
    written there atomically, under the directory's writer lock (`wait`: False fails at once when
    another process is changing the song, True waits, a number waits that many seconds).

    A layer whose candidate files are missing or were changed by hand is `damaged`: the song
    still opens, `redo` regenerates it, and anything that needs its audio says so.
    """

    manifest: Manifest
    context: np.ndarray | None  # the input mix at the song's rate, [samples]
    candidates: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [candidates, samples]
    mix: np.ndarray | None = None
    path: Path | None = None
    damaged: dict[str, list[str]] = field(default_factory=dict)  # layer -> its unreadable candidate files
    wait: bool | float = False

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def layers(self) -> list[str]:
        return self.manifest.layer_names

    @property
    def stems(self) -> dict[str, np.ndarray]:
        """The picked candidate of each layer, in layer order, [samples] at `sample_rate`."""
        return {layer.name: self._candidates_of(layer.name)[layer.picked] for layer in self.manifest.layers}

    @property
    def stale(self) -> list[str]:
        """Layers generated against an earlier state of the layers before them (see `Arranger.redo`)."""
        return self.manifest.stale_layers()

    def _candidates_of(self, name: str) -> np.ndarray:
        if name in self.damaged:
            raise ArrangementError(f"layer {name!r} cannot be heard: {', '.join(self.damaged[name])} missing or "
                                   f"changed since it was written. Regenerate it with `stage-stack redo {self.path} "
                                   f"{name}` (Arranger.redo), or restore the file(s)")
        return self.candidates[name]

    # -- mixing -----------------------------------------------------------------------------
    def render_mix(self, upto: int | None = None, heard: Mapping[str, str] | None = None,
                   hears: Sequence[str] | None = None) -> np.ndarray:
        """The limited mix of the context and the picked stems of the first `upto` layers (all: None).

        heard  {layer: LayerRecord.state} to use another candidate and gain than the current ones
               (what a layer's `conditioned_on` says it heard); layers of another take use their own
        hears  only these of those layers (a layer's `hears`); None: all
        """
        m = self.manifest
        layers = m.layers if upto is None else m.layers[:upto]
        stems = []
        for layer in layers:
            if hears is not None and layer.name not in hears:
                continue
            picked, gain = layer.picked, layer.gain_db
            if heard and layer.name in heard:
                take, was_picked, was_gain = parse_state(heard[layer.name])
                if take == layer.take and was_picked < layer.candidates:
                    picked, gain = was_picked, was_gain if was_gain is not None else gain
            stems.append((self._candidates_of(layer.name)[picked], gain))
        return render_mix(self.context, stems, m.sample_rate, m.samples, m.limiter.settings())

    def _derived(self, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        self.mix = self.render_mix()
        files = {MIX_FILE: self.mix}
        for name in names:
            files[stem_file(name)] = self.stems[name]
        return files

    def _persist(self, sources: Mapping[str, np.ndarray] | None = None, stems: Sequence[str] = (),
                 force: bool = False) -> None:
        derived = self._derived(stems)
        if self.path is not None:
            Arrangement(self.path).commit(self.manifest, {**(sources or {}), **derived}, force=force)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the song's writer lock (if it is saved) and refuse a song changed by another process
        since it was read; on an error, the song in memory goes back to what it was."""
        before = (self.manifest.model_copy(deep=True), dict(self.candidates), self.mix, dict(self.damaged))
        try:
            if self.path is None:
                yield
                return
            store = Arrangement(self.path)
            with store.lock(self.wait):
                store.check_revision(self.manifest)
                yield
        except BaseException:
            if not self._committed_since(before[0]):
                self.manifest, self.candidates, self.mix, self.damaged = before
            raise

    def _committed_since(self, manifest: Manifest) -> bool:
        """Whether a change was committed to disk after `manifest` (then memory must keep it)."""
        if self.path is None:
            return False
        try:
            disk = Arrangement(self.path).read_manifest()
        except ArrangementError:
            return False
        return disk.arrangement_id == manifest.arrangement_id and disk.revision > manifest.revision

    # -- session operations that need no expert --------------------------------------------
    def pick(self, name: str, candidate: int, *, force: bool = False) -> "Song":
        """Use another candidate of a layer; re-renders the mix. Later layers become stale.

        force  overwrite stems/NAME.wav and mix.wav even if they were edited by hand
        """
        with self.writing():
            layer = self.manifest.layer(name)
            if isinstance(candidate, bool) or not isinstance(candidate, int) or not 0 <= candidate < layer.candidates:
                raise InputError(f"layer {name!r} has {layer.candidates} candidate(s), numbered 0 to "
                                 f"{layer.candidates - 1}; got {candidate}")
            layer.picked = candidate
            self.manifest.log("pick", f"{name} {candidate}")
            self._persist(stems=[name], force=force)
        return self

    def remove(self, name: str, *, force: bool = False) -> "Song":
        """Remove a layer; re-renders the mix. Later layers become stale. Its candidates stay on disk
        (`undo` brings the layer back) until `prune`."""
        with self.writing():
            index = self.manifest.index(name)
            del self.manifest.layers[index]
            self.candidates.pop(name, None)
            self.damaged.pop(name, None)
            self.manifest.log("remove", name)
            self._persist(force=force)
        return self

    def remix(self, gains: Mapping[str, float] | None = None, *, force: bool = False) -> "Song":
        """Re-render the mix, optionally with new gains {layer: dB}. The layers after a layer whose
        gain changed heard it at the old gain: they become stale (`redo` them to hear the new one)."""
        with self.writing():
            for name, gain in (gains or {}).items():
                if isinstance(gain, bool) or not isinstance(gain, (int, float)) or \
                        not (np.isfinite(gain) and -60.0 <= gain <= 24.0):
                    raise InputError(f"gain for {name!r} must be from -60 to +24 dB, got {gain!r}")
                self.manifest.layer(name).gain_db = float(gain)
            self.manifest.log("mix", ", ".join(f"{k} {v:+g} dB" for k, v in (gains or {}).items()))
            self._persist(force=force)
        return self

    # -- history ----------------------------------------------------------------------------
    def history(self) -> list[Revision]:
        """The states of a saved song, newest (the current one) first; `undo` goes back one."""
        if self.path is None:
            raise ArrangementError("the song is not saved, so it has no history; save it first (Song.save)")
        return Arrangement(self.path).history(self.manifest)

    def undo(self, *, force: bool = False) -> "Song":
        """Restore the state before the last change (picks, gains, layers and takes as they were).

        The files of the undone change stay on disk (they are never overwritten) until `prune`.
        Undo again to go further back; `history()` lists the states.
        """
        if self.path is None:
            raise ArrangementError("the song is not saved, so there is nothing to undo")
        store = Arrangement(self.path)
        with self.writing():
            current = self.manifest
            if current.previous_revision is None:
                raise ArrangementError(f"{self.path}: nothing to undo (no earlier state is kept; `stage-stack "
                                       f"history {self.path}` lists them)")
            restored = store.snapshot(current.previous_revision)
            last = current.history[-1] if current.history else None
            restored.revision = current.revision
            restored.history = list(current.history)
            restored.log("undo", f"back to revision {current.previous_revision}"
                         + (f" (before: {last.action} {last.detail})".rstrip() if last else ""))
            candidates, damaged = _read_candidates(store, restored)
            self.manifest, self.candidates, self.damaged = restored, candidates, damaged
            derived = self._derived(self.layers) if not damaged else {}
            # The undone state is kept too (out of the undo chain): `prune` then knows its takes
            # are files stage-stack wrote.
            atomic_write_text(store.file(snapshot_file(current.revision)), current.model_dump_json(indent=2) + "\n")
            store.commit(restored, derived, force=force, snapshot=False)
        return self

    def prune(self, *, force: bool = False) -> list[str]:
        """Delete what only `undo` could use: the takes the current state does not use, and the
        history. Returns the files removed. Files changed by hand are kept unless `force`."""
        if self.path is None:
            return []
        store = Arrangement(self.path)
        with self.writing():
            snapshots = store.snapshots_on_disk()
            known: dict[str, set[str]] = {}
            for revision in snapshots:
                try:
                    for rel, digest in store.snapshot(revision).files.items():
                        known.setdefault(rel, set()).add(digest)
                except ArrangementError:
                    continue
            used = set(self.manifest.files)
            takes = [rel for layer_dir in sorted((self.path / "candidates").glob("*")) if layer_dir.is_dir()
                     for rels in store.takes_on_disk(layer_dir.name).values() for rel in rels if rel not in used]
            kept = [rel for rel in takes if not force and not any(matches(store.file(rel), d)
                                                                  for d in known.get(rel, ()))]
            if self.manifest.previous_revision is not None:
                self.manifest.previous_revision = None
                self.manifest.log("prune", f"{len(takes) - len(kept)} old take file(s) and the history")
                store.commit(self.manifest, {}, snapshot=False)
            removed = []
            for rel in takes:
                if rel not in kept:
                    store.file(rel).unlink(missing_ok=True)
                    removed.append(rel)
            for rel in snapshots.values():
                store.file(rel).unlink(missing_ok=True)
                removed.append(rel)
            for folder in sorted((self.path / "candidates").glob("*"), reverse=True):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        if kept:
            warnings.warn(f"kept {', '.join(kept)}: changed since stage-stack wrote it, or not written by it "
                          "(pass --force to delete it too)", stacklevel=2)
        return removed

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the whole arrangement to `directory` (WAV stems, candidates, mix, manifest.json)."""
        store = Arrangement(directory)
        if self.path is not None and store.path.resolve() == Path(self.path).resolve():
            with self.writing():
                self._persist(stems=self.layers, force=force)
            return store.path
        with store.lock(self.wait):
            store.check_new(self.manifest.arrangement_id)
            sources: dict[str, np.ndarray] = {}
            if self.context is not None:
                sources[CONTEXT_FILE] = self.context
            for layer in self.manifest.layers:
                for i, rel in enumerate(layer.files):
                    sources[rel] = self._candidates_of(layer.name)[i]
            if not store.exists():
                self.manifest.revision, self.manifest.previous_revision = 0, None
            self.path = store.path
            with self.writing():
                self._persist(sources, stems=self.layers, force=force)
        return store.path

    @classmethod
    def open(cls, directory: str | os.PathLike, *, wait: bool | float = False) -> "Song":
        """Reopen an arrangement directory: finishes an interrupted write, then loads it.

        wait  when another process is changing the song: False fails at once, True waits, a
              number waits that many seconds
        """
        store = Arrangement(directory)
        if not store.exists():
            raise ArrangementError(f"{store.path}: not an arrangement (no {MANIFEST_NAME}); create one with "
                                   "`stage-stack arrange ... -o DIR`")
        with store.lock(wait):
            manifest = store.read_manifest()
            store.finish_renames(manifest)
            store.remove_leftovers(manifest)
            context = store.read(CONTEXT_FILE, manifest) if manifest.context is not None else None
            candidates, damaged = _read_candidates(store, manifest)
            song = cls(manifest, context, candidates, path=store.path, damaged=damaged, wait=wait)
            if damaged:
                return song
            derived = song._derived(song.layers)
            missing = {rel: audio for rel, audio in derived.items() if not store.file(rel).exists()}
            edited = [rel for rel in derived if rel not in missing and not matches(store.file(rel), manifest.files.get(rel))]
            if missing:  # derived files lost after a crash (their temp files too): render them again
                store.commit(manifest, missing, snapshot=False)
            if edited:
                warnings.warn(f"{', '.join(edited)} in {store.path} changed since stage-stack wrote it; it is kept, "
                              "and commands that would overwrite it refuse unless --force", stacklevel=2)
        return song

    def summary(self) -> str:
        """A human-readable description (what `stage-stack show` prints)."""
        return describe(self.manifest, self.path)


def _read_candidates(store: Arrangement, manifest: Manifest) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Every layer's candidates; layers with a missing or changed candidate file go to `damaged`."""
    candidates, damaged = {}, {}
    for layer in manifest.layers:
        audio, bad = [], []
        for rel in layer.files:
            try:
                audio.append(store.read(rel, manifest))
            except ArrangementError:
                bad.append(rel)
        if bad:
            damaged[layer.name] = bad
        else:
            candidates[layer.name] = np.stack(audio)
    return candidates, damaged


# -- the same, by directory (what the CLI and the studio call) -------------------------------------

def undo(directory: str | os.PathLike, *, wait: bool | float = False, force: bool = False) -> Song:
    """Restore the state of the song in `directory` before its last change (Song.undo)."""
    with Arrangement(directory).lock(wait):
        return Song.open(directory, wait=wait).undo(force=force)


def history(directory: str | os.PathLike) -> list[Revision]:
    """The states of the song in `directory`, newest first (reads only manifests)."""
    store = Arrangement(directory)
    if not store.exists():
        raise ArrangementError(f"{store.path}: not an arrangement (no {MANIFEST_NAME})")
    return store.history(store.read_manifest())


def prune(directory: str | os.PathLike, *, wait: bool | float = False, force: bool = False) -> list[str]:
    """Delete the old takes and the history of the song in `directory` (Song.prune); returns the files removed."""
    with Arrangement(directory).lock(wait):
        return Song.open(directory, wait=wait).prune(force=force)


def describe(manifest: Manifest, path: str | os.PathLike | None = None, files: bool = False) -> str:
    """Describe an arrangement from its manifest: song settings, then one line per layer.

    files  also list each layer's candidate files: the current take's (the picked one marked
           `*`) and the older takes kept on disk for `undo` (with `path`)
    """
    m = manifest
    bpm = "none" if m.bpm is None else f"{m.bpm:g}" + (" (default)" if m.bpm_source == "default" else "")
    lines = [f"arrangement {m.arrangement_id}  ({path or 'not saved'})",
             f"  {m.duration:g} s at {m.sample_rate} Hz, BPM {bpm}, click {m.click}, seed {m.seed}",
             f"  context: {m.context.source if m.context else 'none'}"]
    stale = set(m.stale_layers())
    for i, layer in enumerate(m.layers):
        picked = f"candidate {layer.picked} of {layer.candidates}"
        flag = "  [stale: an earlier layer changed since; `redo` it]" if layer.name in stale else ""
        lines.append(f"  {i + 1}. {layer.name} ({layer.instrument}): take {layer.take}, {picked}, seed {layer.seed}, "
                     f"{layer.gain_db:+g} dB, click {layer.click}, {len(layer.window_plan.windows)} window(s), "
                     f"{layer.timings.total_s:.1f} s{flag}")
        if layer.prompt:
            lines.append(f"     prompt: {layer.prompt!r}")
        heard = ([f"the beats of its mix as a click ({layer.heard_bpm:g} BPM)"] if layer.beats == "heard" else []) + \
            (["the chords of its mix"] if layer.chords == "heard" else [])
        if heard:
            lines.append(f"     heard outside its expert: {' and '.join(heard)}")
        if files:
            current = [rel + ("*" if i == layer.picked else "") for i, rel in enumerate(layer.files)]
            lines.append(f"     candidates: {', '.join(current)}")
            if path is not None:
                older = [rel for take, rels in Arrangement(path).takes_on_disk(layer.name).items()
                         if take != layer.take for rel in rels]
                if older:
                    lines.append(f"     other takes (kept until `stage-stack prune`): {', '.join(older)}")
    if not m.layers:
        lines.append("  no layers yet")
    return "\n".join(lines)

