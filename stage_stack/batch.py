"""Many songs: `arrange_many` (one process, pipelined over devices) and `arrange-batch` (many processes).

Pipelining. Song i's layer k needs song i's layer k-1, but nothing from the other songs, so
the work is a wavefront: at tick t, song i runs its layer t - i (`pipeline_schedule`).

    tick    0         1         2         3
    drums   song 0    song 1    song 2
    bass              song 0    song 1    song 2

Within a tick the tasks are grouped by the device of their expert; the groups run in parallel
threads (one per device, so an expert is only ever used by one thread), each group in order.
With the drums expert on cuda:0 and the bass expert on cuda:1, song 1's drums and song 0's bass
run at the same time. With every expert on one device there is one group, and the songs run one
layer after another, as they would alone. Each layer draws from its own seeded generator, so
the songs are identical to arranging them one by one.

Multi-process (`run_distributed`): every process reads and validates all jobs (so a bad job
stops all of them before any work), takes jobs rank, rank + world, ..., arranges them with its
own device, and the manifests are gathered to the main process, which writes one summary.
A job that fails at run time is reported in the summary, and the other jobs go on.
"""

from __future__ import annotations

import json
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .arranger import Arranger
from .errors import InputError
from .layer import Layer
from .song import Song
from .atomic import atomic_write_text
from .manifest import LayerSpec
from .mixing import ClickMode


class Job(BaseModel):
    """One song of a batch (one line of a jobs.jsonl file)."""

    model_config = ConfigDict(extra="forbid")
    layers: list[str | LayerSpec] = Field(min_length=1)
    context: str | None = None  # an audio file; relative paths are relative to the jobs file
    bpm: float | None = None
    duration: float | None = None
    seed: int = 0
    click: ClickMode | None = None
    out: str | None = None  # the arrangement directory; relative to the jobs file

    def layer_objects(self) -> list[Layer]:
        out = []
        for spec in self.layers:
            if isinstance(spec, str):
                out.append(Layer(spec))
            else:
                out.append(Layer(spec.instrument, name=spec.name, prompt=spec.prompt, seed=spec.seed,
                                 gain_db=spec.gain_db, candidates=spec.candidates, click=spec.click,
                                 params=None if spec.sampling is None else spec.sampling.params(), pick=spec.pick,
                                 hears=spec.hears, chords=spec.chords, beats=spec.beats))
        return out

    def arrange_kwargs(self) -> dict[str, Any]:
        return dict(layers=self.layer_objects(), context=self.context, bpm=self.bpm, duration=self.duration,
                    seed=self.seed, click=self.click, out=self.out)


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Parse a jobs.jsonl file: one JSON object per line (blank lines and # comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the jobs file ({e.strerror})") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = Job.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {number}: not JSON ({e.msg}); each line is one job object") from None
        except ValidationError as e:
            fields = "; ".join(f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors())
            raise InputError(f"{path}, line {number}: invalid job: {fields}. Expected "
                             '{"layers": ["drums", "bass"], "bpm": 120, "duration": 20, "out": "song1"}') from None
        base = path.parent
        update = {}
        if job.context is not None and not Path(job.context).is_absolute():
            update["context"] = str(base / job.context)
        update["out"] = str(base / (job.out or f"{path.stem}-{len(jobs):04d}")) if not (
            job.out and Path(job.out).is_absolute()) else job.out
        jobs.append(job.model_copy(update=update))
    if not jobs:
        raise InputError(f"{path}: no jobs (one JSON object per line)")
    check_distinct_outs(jobs, str(path))
    return jobs


def check_distinct_outs(jobs: Sequence[Job], where: str = "jobs") -> None:
    outs = [str(Path(job.out).resolve()) for job in jobs if job.out is not None]
    dupes = sorted({o for o in outs if outs.count(o) > 1})
    if dupes:
        raise InputError(f"{where}: several jobs write to the same directory: {', '.join(dupes)}; give each its "
                         "own 'out'")


def pipeline_schedule(chains: Sequence[Sequence[str]]) -> list[list[tuple[int, int]]]:
    """The wavefront: tick t holds (song i, layer t - i) for every song that has that layer."""
    ticks = max((i + len(chain) for i, chain in enumerate(chains)), default=0)
    return [[(i, t - i) for i, chain in enumerate(chains) if 0 <= t - i < len(chain)] for t in range(ticks)]


def arrange_many(
    arranger: Arranger,
    jobs: Sequence[Job | dict],
    *,
    pipeline: bool = True,
    return_exceptions: bool = False,
    on_task: Callable[[int, int, str], None] | None = None,
) -> list[Song | BaseException]:
    """Arrange several songs; returns them in job order.

    All jobs are validated (and their directories created) before any generation. With
    `pipeline`, songs move through the layers as a wavefront over the experts' devices (module
    docstring); without it they run one after another. With `return_exceptions`, a job that
    fails is returned as its exception and the others go on; otherwise the first failure raises.
    `on_task(song, layer, device)` is called as each task starts (tests, logging).
    """
    jobs = [job if isinstance(job, Job) else Job.model_validate(job) for job in jobs]
    check_distinct_outs(jobs)
    for job in jobs:  # every job is checked before any is started
        arranger.validate(**job.arrange_kwargs())
    prepared = [arranger.prepare(**job.arrange_kwargs()) for job in jobs]
    songs: list[Song | BaseException] = [song for song, _ in prepared]
    pending = [layers for _, layers in prepared]

    def run(i: int, k: int) -> None:
        if isinstance(songs[i], BaseException):
            return  # an earlier layer of this song failed
        layer = pending[i][k]
        if on_task is not None:
            on_task(i, k, arranger.device_of(layer.instrument))
        try:
            arranger.run_layer(songs[i], layer, position=(k, len(pending[i])))
        except Exception as e:  # noqa: BLE001  (recorded per job, re-raised below unless asked not to)
            songs[i] = e

    def run_all(tasks: list[tuple[int, int]]) -> None:
        for i, k in tasks:
            run(i, k)

    if pipeline:
        ticks = pipeline_schedule([[layer.instrument for layer in layers] for layers in pending])
    else:
        ticks = [[(i, k)] for i, layers in enumerate(pending) for k in range(len(layers))]
    devices = {arranger.device_of(layer.instrument) for layers in pending for layer in layers}
    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        for tick in ticks:
            by_device: dict[str, list[tuple[int, int]]] = {}
            for i, k in tick:
                by_device.setdefault(arranger.device_of(pending[i][k].instrument), []).append((i, k))
            if len(by_device) == 1:
                run_all(tick)
            else:  # one thread per device; each device's tasks in order
                for future in [pool.submit(run_all, tasks) for tasks in by_device.values()]:
                    future.result()
            if not return_exceptions:
                failed = next((s for s in songs if isinstance(s, BaseException)), None)
                if failed is not None:
                    raise failed
    return songs


def run_distributed(jobs_file: str | os.PathLike, make_arranger: Callable[[str], Arranger], *, cpu: bool = False,
                    summary: str | os.PathLike | None = None, pipeline: bool = True) -> dict | None:
    """The `arrange-batch` command's body: shard the jobs over the Accelerate processes, gather manifests.

    `make_arranger(device)` builds this process's Arranger for its device. Returns the summary
    on the main process (None elsewhere), after writing it to `summary` (default:
    <jobs file>.manifests.json).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator(cpu=cpu)
    try:
        jobs = read_jobs(jobs_file)
        device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
        arranger = make_arranger(device)
        for job in jobs:  # every process checks every job, so a bad one stops all before any work
            arranger.validate(**job.arrange_kwargs())
        accelerator.wait_for_everyone()  # no process may start writing while another is still checking
        mine = list(range(accelerator.process_index, len(jobs), accelerator.num_processes))
        results = arrange_many(arranger, [jobs[i] for i in mine], pipeline=pipeline, return_exceptions=True)
        rows = []
        for i, result in zip(mine, results):
            row: dict[str, Any] = {"index": i, "out": jobs[i].out, "process": accelerator.process_index,
                                   "device": device}
            if isinstance(result, BaseException):
                row["error"] = "".join(traceback.format_exception_only(type(result), result)).strip()
            else:
                row["manifest"] = json.loads(result.manifest.model_dump_json())
            rows.append(row)
        gathered = gather_object(rows)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        gathered = sorted(gathered, key=lambda row: row["index"])
        report = {"jobs_file": str(Path(jobs_file).resolve()), "processes": accelerator.num_processes,
                  "failed": sum("error" in row for row in gathered), "jobs": gathered}
        path = Path(summary) if summary is not None else Path(jobs_file).with_suffix(".manifests.json")
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        report["summary_path"] = str(path)
        return report
    finally:
        # Every rank leaves the process group before the interpreter exits, rather than leaving
        # gloo's threads to the interpreter's teardown: rank 1 once aborted there ("terminate
        # called without an active exception", 2 of 36 runs of the two-process test in earlier
        # sessions; 0 of 40 before this line and 0 of 25 after it in stop 32).
        accelerator.end_training()
