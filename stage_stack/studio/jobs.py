"""The studio's job queue: one generation at a time per process, the others wait in order.

The cores are few and an expert's decoding uses all of them, so two generations at once would
each run at half speed and hold twice the memory. A job is a function of a progress callback;
the worker thread runs the jobs one after another. Cancelling a running job makes its next
progress report raise `JobCancelled`, which the Arranger treats like Ctrl-C: the layer is not
committed and the song stays as it was (stage_stack.arranger, "Writes are atomic").

A song with a queued or running job is busy: `check_idle` refuses every other writer on it.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import StageStackError

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
KEEP_FINISHED = 50  # finished jobs kept for the page to read their outcome


class JobCancelled(StageStackError):
    """Raised inside a job's progress callback once the job is cancelled."""


class SongBusyError(StageStackError):
    """A write on a song that has a queued or running job (or another writer)."""


@dataclass
class Job:
    id: int
    song: str
    action: str  # what the page shows: "add keys", "redo bass and later layers"
    run: Callable[[Callable], None] = field(repr=False)
    state: str = "queued"
    layer: str | None = None
    index: int = 0
    layers: int = 1
    step: int = 0
    steps: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


class JobQueue:
    """FIFO jobs run by one worker thread (started on first use, stopped by `stop`)."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._stopping = False

    # -- asking ---------------------------------------------------------------------------
    def submit(self, song: str, action: str, run: Callable[[Callable], None]) -> Job:
        with self._cond:
            self.check_idle(song)
            job = Job(next(self._ids), song, action, run)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._forget_old()
            if self._worker is None or not self._worker.is_alive():
                self._stopping = False
                self._worker = threading.Thread(target=self._work, name="stage-stack-studio-jobs", daemon=True)
                self._worker.start()
            self._cond.notify_all()
            return job

    def check_idle(self, song: str) -> None:
        """Raise SongBusyError when `song` has a queued or running job."""
        with self._cond:
            for job in self._jobs.values():
                if job.song == song and job.active:
                    raise SongBusyError(f"song {song!r} is busy: {job.action} is {job.state} (job {job.id}); wait "
                                        "for it to finish or cancel it, then try again")

    def get(self, job_id: int) -> Job:
        with self._cond:
            if job_id not in self._jobs:
                raise KeyError(job_id)
            return self._jobs[job_id]

    def position(self, job: Job) -> int:
        """0 for the running job, 1 for the next one to run, ...; -1 when finished."""
        with self._cond:
            if job.state == "running":
                return 0
            return self._queue.index(job) + 1 if job in self._queue else -1

    def jobs(self) -> list[Job]:
        with self._cond:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def cancel(self, job_id: int) -> Job:
        with self._cond:
            job = self.get(job_id)
            if job.state == "queued":
                self._queue.remove(job)
                self._finish(job, "cancelled")
            elif job.state == "running":
                job.cancel_requested = True
            return job

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """Block until the job is finished (tests and scripts; the page polls instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            job = self.get(job_id)
            while job.active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} is still {job.state}")
                self._cond.wait(left)
            return job

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything (the running layer is not committed) and stop the worker."""
        with self._cond:
            self._stopping = True
            for job in list(self._queue):
                self._finish(job, "cancelled")
            self._queue.clear()
            for job in self._jobs.values():
                if job.state == "running":
                    job.cancel_requested = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.pop(0)
                job.state = "running"
                self._cond.notify_all()
            try:
                job.run(lambda progress: self._report(job, progress))
            except JobCancelled:
                outcome, error = "cancelled", None
            except StageStackError as e:
                outcome, error = "failed", str(e)
            except Exception as e:  # a bug: show it, keep the worker alive for the next job
                outcome, error = "failed", f"{type(e).__name__}: {e}"
            else:
                outcome, error = "done", None
            with self._cond:
                job.error = error
                self._finish(job, outcome)

    def _report(self, job: Job, progress) -> None:
        if job.cancel_requested:
            raise JobCancelled(f"job {job.id} ({job.action}) was cancelled; the song is as it was before it")
        job.layer, job.index, job.layers, job.step, job.steps = (progress.layer, progress.index, progress.layers,
                                                                 progress.step, progress.steps)

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished = time.time()
        self._cond.notify_all()

    def _forget_old(self) -> None:
        finished = [j for j in sorted(self._jobs.values(), key=lambda j: j.id) if not j.active]
        for job in finished[:-KEEP_FINISHED]:
            del self._jobs[job.id]
