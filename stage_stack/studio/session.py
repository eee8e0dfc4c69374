"""The studio's actions on a folder of songs, on the same Python API the CLI uses.

Each song is an arrangement directory SONGS_DIR/<name>/ (stage_stack.arranger.Arrangement),
so `stage-stack add/pick/redo/remove/mix/show SONGS_DIR/<name>` and the studio act on the same
files: a change made by one shows in the other on reload. Every action reopens the song from
disk (`Song.open`), so nothing is cached that the CLI could have changed.

Paths: a song is named by a plain file name (requests.NAME_PATTERN) and resolved inside
SONGS_DIR (symlinks included); audio files are served only when the manifest lists them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..arranger import Arranger, Layer, Song
from ..song import history as song_history, undo as song_undo
from ..errors import InputError, StageStackError
from ..generation import SamplingParams
from ..inputs import read_context_file
from ..manifest import MANIFEST_NAME, Manifest
from .jobs import Job, JobQueue
from .requests import NAME_PATTERN, NewLayer, NewSong, Redo

UPLOAD_DIR = ".studio-uploads"  # inside SONGS_DIR; each upload is deleted once read
UPLOAD_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".aif", ".aiff")
DEFAULT_MAX_UPLOAD = 200 * 1024 * 1024  # bytes; a 20-min 48 kHz stereo 16-bit WAV is ~230 MB


class NotFoundError(StageStackError):
    """A song or file the request names does not exist."""


class Studio:
    """SONGS_DIR, the Arranger that plays its experts, and the job queue."""

    def __init__(self, songs_dir: str | os.PathLike, arranger: Arranger, jobs: JobQueue | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD) -> None:
        self.root = Path(songs_dir).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root}: exists and is not a directory; give the studio a folder for songs")
        self.root.mkdir(parents=True, exist_ok=True)
        self.arranger = arranger
        self.jobs = jobs or JobQueue()
        self.max_upload_bytes = max_upload_bytes

    # -- paths ----------------------------------------------------------------------------
    def song_dir(self, name: str, must_exist: bool = True) -> Path:
        if not re.match(NAME_PATTERN, name):
            raise InputError(f"song name {name!r} is not a plain file name; use letters, digits, '_', '-' or '.' "
                             "(up to 64 characters, starting with a letter or digit)")
        path = (self.root / name).resolve()
        if path.parent != self.root:  # a symlink pointing elsewhere
            raise InputError(f"song {name!r} resolves outside the songs folder {self.root}")
        if must_exist and not (path / MANIFEST_NAME).is_file():
            raise NotFoundError(f"no song {name!r} in {self.root}; the songs are: {', '.join(self.song_names()) or 'none'}")
        return path

    def song_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file()
                      and re.match(NAME_PATTERN, p.name))

    def audio_file(self, name: str, rel: str) -> Path:
        """A file of a song, only if its manifest lists it (so nothing else can be read)."""
        directory = self.song_dir(name)
        manifest = Manifest.load(directory / MANIFEST_NAME)
        if rel not in manifest.files:
            raise NotFoundError(f"song {name!r} has no file {rel!r}")
        path = (directory / rel).resolve()
        if directory not in path.parents:
            raise InputError(f"{rel!r} resolves outside song {name!r}")
        return path

    # -- reading --------------------------------------------------------------------------
    def instruments(self) -> list[dict]:
        """Every instrument: installed ones can be added, the others come with the install command."""
        rows: dict[str, dict] = {}
        registry = self.arranger.registry
        if registry is not None:
            from ..cli.registry import instrument_rows

            for row in instrument_rows(registry):
                command = next((line.strip() for line in (row["message"] or "").splitlines()
                                if line.strip().startswith("stage-stack install")), None)
                rows[row["name"]] = {"name": row["name"], "installed": row["installed"], "status": row["status"],
                                     "description": row["description"], "install": command,
                                     "message": None if row["installed"] else row["message"]}
        for name in self.arranger.experts:  # explicit experts win over the registry
            rows[name] = {"name": name, "installed": True, "status": "installed", "description": None,
                          "install": None, "message": None}
        return list(rows.values())

    def state(self, name: str) -> dict:
        """What the page shows of a song: read from its manifest only (cheap; the CLI may change it)."""
        directory = self.song_dir(name)
        m = Manifest.load(directory / MANIFEST_NAME)
        stale = set(m.stale_layers())
        job = next((j for j in self.jobs.jobs() if j.song == name and j.active), None)
        return {
            "name": name, "path": str(directory), "sample_rate": m.sample_rate, "duration": m.duration,
            "bpm": m.bpm, "click": m.click, "seed": m.seed, "updated": m.updated.isoformat(),
            "context": None if m.context is None else {"source": m.context.source, "file": self._url(name, m, "context.wav")},
            "mix": self._url(name, m, "mix.wav"),
            "layers": [{
                "name": layer.name, "instrument": layer.instrument, "take": layer.take, "picked": layer.picked,
                "candidates": [self._url(name, m, rel) for rel in layer.files], "gain_db": layer.gain_db,
                "seed": layer.seed, "prompt": layer.prompt, "click": layer.click, "stale": layer.name in stale,
                "hears": layer.hears,
                "chords": layer.chords,
                "beats": layer.beats,
                "stem": self._url(name, m, f"stems/{layer.name}.wav"),
                "sampling": {"temperature": layer.sampling.temperature, "top_k": layer.sampling.top_k,
                             "cfg": layer.sampling.cfg_coef},
                "seconds": layer.timings.total_s,
            } for layer in m.layers],
            # the states `undo` goes back through, newest (the current one) first (stage_stack.song.history)
            "history": [dataclasses.asdict(r) for r in song_history(directory)],
            "can_undo": m.previous_revision is not None,
            "job": None if job is None else self.job_json(job),
        }

    @staticmethod
    def _url(name: str, m: Manifest, rel: str) -> str | None:
        if rel not in m.files:
            return None
        return f"/api/songs/{name}/files/{rel}?v={m.files[rel][:16]}"  # the digest: a changed file is refetched

    def job_json(self, job: Job) -> dict:
        return {"id": job.id, "song": job.song, "action": job.action, "state": job.state,
                "position": self.jobs.position(job), "layer": job.layer, "index": job.index, "layers": job.layers,
                "step": job.step, "steps": job.steps, "error": job.error}

    # -- starting a song ------------------------------------------------------------------
    def _new_dir(self, name: str) -> Path:
        directory = self.song_dir(name, must_exist=False)
        if directory.exists():
            raise InputError(f"song {name!r} already exists in {self.root}; choose another name")
        return directory

    def song_rate(self) -> int:
        """The rate of new songs: the Arranger's, else the highest rate of the usable experts."""
        if self.arranger.sample_rate:
            return self.arranger.sample_rate
        from ..expert import read_metadata

        rates = []
        for name in self.arranger.instruments:
            try:
                source = self.arranger.experts.get(name)
                if source is None:
                    rates.append(self.arranger.registry.read_metadata(name).sample_rate)
                else:
                    rates.append(read_metadata(source).sample_rate if isinstance(source, Path)
                                 else source.sample_rate)
            except StageStackError:  # not installed: it does not decide the rate
                continue
        if not rates:
            raise InputError("no installed instrument: install an expert (`stage-stack install NAME FILE`) or start "
                             "the studio with --expert NAME=FILE")
        return max(rates)

    def new_song(self, request: NewSong) -> dict:
        directory = self._new_dir(request.name)
        self.jobs.check_idle(request.name)
        self.arranger.start(None, bpm=request.bpm, duration=request.duration, seed=request.seed, click=request.click,
                            out=directory, sample_rate=self.song_rate())
        return self.state(request.name)

    def upload_song(self, name: str, filename: str, read_chunk: Callable[[int], bytes], bpm: float | None,
                    seed: int = 0) -> dict:
        """Start a song on an uploaded mix: size-limited, then the CLI's context checks."""
        directory = self._new_dir(name)
        base = Path(filename or "").name
        suffix = Path(base).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise InputError(f"upload {base!r}: expected an audio file ({', '.join(UPLOAD_SUFFIXES)}), got "
                             f"{suffix or 'no extension'}")
        uploads = self.root / UPLOAD_DIR
        uploads.mkdir(exist_ok=True)
        tmp = uploads / f"{uuid.uuid4().hex}{suffix}"
        try:
            size = 0
            with open(tmp, "wb") as f:
                while chunk := read_chunk(1 << 20):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise InputError(f"upload {base!r} is larger than the limit of "
                                         f"{self.max_upload_bytes / 1e6:g} MB; trim or compress it (FLAC, MP3)")
                    f.write(chunk)
            context = replace(read_context_file(tmp), source=base)
            # the song's rate is the context's (as with `stage-stack arrange --context`)
            self.arranger.start(context, bpm=bpm, seed=seed, out=directory)
        finally:
            tmp.unlink(missing_ok=True)
            if uploads.is_dir() and not any(uploads.iterdir()):
                uploads.rmdir()
        return self.state(name)

    # -- generating (jobs) ----------------------------------------------------------------
    def add_layer(self, name: str, request: NewLayer) -> Job:
        directory = self.song_dir(name)
        s = request.sampling
        given = {k: v for k, v in (("cfg_coef", s.cfg), ("temperature", s.temperature), ("top_k", s.top_k))
                 if v is not None}
        layer = Layer(request.instrument, name=request.name, prompt=request.prompt or None, seed=request.seed,
                      gain_db=request.gain_db, candidates=request.candidates, click=request.click,
                      params=SamplingParams(**given) if given else None,  # None: the expert's own
                      hears=None if request.hears is None else tuple(request.hears), chords=request.chords,
                      beats=request.beats)
        m = Manifest.load(directory / MANIFEST_NAME)
        # the checks `Arranger.add` runs first (unknown instrument, taken name), now rather than in the job
        self.arranger._check([layer], m.layer_names, m.bpm, m.click)

        def run(progress):
            self.arranger.add(Song.open(directory), layer, callback=progress)

        return self.jobs.submit(name, f"add {layer.key}", run)

    def redo_layer(self, name: str, layer: str, request: Redo) -> Job:
        directory = self.song_dir(name)
        Manifest.load(directory / MANIFEST_NAME).index(layer)  # unknown layer: an error now

        def run(progress):
            self.arranger.redo(Song.open(directory), layer, seed=request.seed, prompt=request.prompt or None,
                               downstream=request.downstream, callback=progress)

        return self.jobs.submit(name, f"redo {layer}" + (" and later layers" if request.downstream else ""), run)

    # -- editing (immediate) --------------------------------------------------------------
    def _edit(self, name: str) -> Song:
        directory = self.song_dir(name)
        self.jobs.check_idle(name)
        return Song.open(directory)

    def pick(self, name: str, layer: str, candidate: int) -> dict:
        self._edit(name).pick(layer, candidate)
        return self.state(name)

    def remove(self, name: str, layer: str) -> dict:
        self._edit(name).remove(layer)
        return self.state(name)

    def remix(self, name: str, gains: dict[str, float]) -> dict:
        self._edit(name).remix(gains)
        return self.state(name)

    def undo(self, name: str) -> dict:
        """Back to the state before the last change (stage_stack.song.undo, as `stage-stack undo`)."""
        directory = self.song_dir(name)
        self.jobs.check_idle(name)
        song_undo(directory)
        return self.state(name)
