"""`Song`: an arrangement in memory (the result object), and the session operations that need no expert.

A song with a `path` writes every change to its arrangement directory (stage_stack.arrangement).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .arrangement import CONTEXT_FILE, MIX_FILE, Arrangement, matches, stem_file
from .errors import ArrangementError, InputError
from .manifest import MANIFEST_NAME, Manifest
from .mixing import render_mix


@dataclass
class Song:
    """An arrangement in memory: its manifest, the context, every layer's candidates and the mix.

    When `path` is set (the song was arranged with `out=`, opened, or saved), every change is
    written there atomically.
    """

    manifest: Manifest
    context: np.ndarray | None  # the input mix at the song's rate, [samples]
    candidates: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [candidates, samples]
    mix: np.ndarray | None = None
    path: Path | None = None

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def layers(self) -> list[str]:
        return self.manifest.layer_names

    @property
    def stems(self) -> dict[str, np.ndarray]:
        """The picked candidate of each layer, in layer order, [samples] at `sample_rate`."""
        return {layer.name: self.candidates[layer.name][layer.picked] for layer in self.manifest.layers}

    @property
    def stale(self) -> list[str]:
        """Layers generated against an earlier state of the layers before them (see `Arranger.redo`)."""
        return self.manifest.stale_layers()

    # -- mixing -----------------------------------------------------------------------------
    def render_mix(self, upto: int | None = None) -> np.ndarray:
        """The limited mix of the context and the picked stems of the first `upto` layers (all: None)."""
        m = self.manifest
        layers = m.layers if upto is None else m.layers[:upto]
        stems = [(self.candidates[layer.name][layer.picked], layer.gain_db) for layer in layers]
        return render_mix(self.context, stems, m.sample_rate, m.samples, m.limiter.settings())

    def _derived(self, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        self.mix = self.render_mix()
        files = {MIX_FILE: self.mix}
        for name in names:
            files[stem_file(name)] = self.stems[name]
        return files

    def _persist(self, sources: Mapping[str, np.ndarray] | None = None, stems: Sequence[str] = ()) -> None:
        derived = self._derived(stems)
        if self.path is not None:
            Arrangement(self.path).commit(self.manifest, {**(sources or {}), **derived})

    # -- session operations that need no expert --------------------------------------------
    def pick(self, name: str, candidate: int) -> "Song":
        """Use another candidate of a layer; re-renders the mix. Later layers become stale."""
        layer = self.manifest.layer(name)
        if not 0 <= candidate < layer.candidates:
            raise InputError(f"layer {name!r} has {layer.candidates} candidate(s), numbered 0 to "
                             f"{layer.candidates - 1}; got {candidate}")
        layer.picked = candidate
        self.manifest.log("pick", f"{name} {candidate}")
        self._persist(stems=[name])
        return self

    def remove(self, name: str) -> "Song":
        """Remove a layer and its files; re-renders the mix. Later layers become stale."""
        index = self.manifest.index(name)
        del self.manifest.layers[index]
        del self.candidates[name]
        self.manifest.log("remove", name)
        self._persist()
        return self

    def remix(self, gains: Mapping[str, float] | None = None) -> "Song":
        """Re-render the mix, optionally with new gains {layer: dB}."""
        for name, gain in (gains or {}).items():
            if not (np.isfinite(gain) and -60.0 <= gain <= 24.0):
                raise InputError(f"gain for {name!r} must be from -60 to +24 dB, got {gain!r}")
            self.manifest.layer(name).gain_db = float(gain)
        self.manifest.log("mix", ", ".join(f"{k} {v:+g} dB" for k, v in (gains or {}).items()))
        self._persist()
        return self

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the whole arrangement to `directory` (WAV stems, candidates, mix, manifest.json)."""
        store = Arrangement(directory)
        if self.path is not None and store.path.resolve() == Path(self.path).resolve():
            self._persist(stems=self.layers)
            return store.path
        store.check_new(self.manifest.arrangement_id)
        sources: dict[str, np.ndarray] = {}
        if self.context is not None:
            sources[CONTEXT_FILE] = self.context
        for layer in self.manifest.layers:
            for i, rel in enumerate(layer.files):
                sources[rel] = self.candidates[layer.name][i]
        self.path = store.path
        self._persist(sources, stems=self.layers)
        return store.path

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Song":
        """Reopen an arrangement directory: finishes or undoes an interrupted write, then loads it."""
        store = Arrangement(directory)
        if not store.exists():
            raise ArrangementError(f"{store.path}: not an arrangement (no {MANIFEST_NAME}); create one with "
                                   "`stage-stack arrange ... -o DIR`")
        manifest = store.read_manifest()
        store.finish_renames(manifest)
        store.remove_leftovers(manifest)
        context = store.read(CONTEXT_FILE, manifest) if manifest.context is not None else None
        candidates = {layer.name: np.stack([store.read(rel, manifest) for rel in layer.files])
                      for layer in manifest.layers}
        song = cls(manifest, context, candidates, path=store.path)
        derived = song._derived(song.layers)
        stale = {rel: audio for rel, audio in derived.items() if not matches(store.path / rel, manifest, rel)}
        if stale:  # derived files that do not match the manifest (lost temp files): render them again
            store.commit(manifest, stale)
        return song

    def summary(self) -> str:
        """A human-readable description (what `stage-stack show` prints)."""
        return describe(self.manifest, self.path)


def describe(manifest: Manifest, path: str | os.PathLike | None = None) -> str:
    """Describe an arrangement from its manifest: song settings, then one line per layer."""
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
    if not m.layers:
        lines.append("  no layers yet")
    return "\n".join(lines)

