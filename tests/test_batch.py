"""Batches: jobs files, the pipelined wavefront over devices, and `arrange-batch` on 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from arranger_helpers import band  # noqa: F401  (fixtures)
from stage_stack import Arranger, Layer
from stage_stack.batch import Job, arrange_many, pipeline_schedule, read_jobs
from stage_stack.errors import InputError


def write_jobs(path, jobs) -> str:
    path.write_text("\n".join(json.dumps(job) for job in jobs) + "\n")
    return str(path)


def test_read_jobs(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('# a comment\n{"layers": ["drums", "bass"], "bpm": 120, "out": "one"}\n\n'
                    '{"layers": [{"instrument": "keys", "name": "pad", "candidates": 2}], "context": "mix.wav"}\n')
    jobs = read_jobs(path)
    assert [job.out for job in jobs] == [str(tmp_path / "one"), str(tmp_path / "jobs-0001")]
    assert jobs[1].context == str(tmp_path / "mix.wav")  # relative to the jobs file
    layers = jobs[1].layer_objects()
    assert layers == [Layer("keys", name="pad", candidates=2)]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ('{"layers": []}', "line 2: invalid job: field 'layers'"),
    ('{"layers": ["drums"], "tempo": 120}', "field 'tempo': Extra inputs are not permitted"),
])
def test_bad_jobs_name_the_line(tmp_path, line, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"layers": ["drums"]}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        read_jobs(path)


def test_jobs_file_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read the jobs file"):
        read_jobs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    with pytest.raises(InputError, match="no jobs"):
        read_jobs(tmp_path / "empty.jsonl")
    path = write_jobs(tmp_path / "dupes.jsonl", [{"layers": ["drums"], "out": "x"}, {"layers": ["bass"], "out": "x"}])
    with pytest.raises(InputError, match="several jobs write to the same directory"):
        read_jobs(path)


def test_pipeline_schedule_is_a_wavefront():
    ticks = pipeline_schedule([["drums", "bass"]] * 3)
    assert ticks == [[(0, 0)], [(0, 1), (1, 0)], [(1, 1), (2, 0)], [(2, 1)]]
    uneven = pipeline_schedule([["drums"], ["drums", "bass", "keys"]])
    assert uneven == [[(0, 0)], [(1, 0)], [(1, 1)], [(1, 2)]]
    assert pipeline_schedule([]) == []


def jobs_for(tmp_path, n=3):
    return [Job(layers=["drums", "bass"], bpm=120, duration=1.0, seed=10 + i, out=str(tmp_path / f"song{i}"))
            for i in range(n)]


def test_pipelined_songs_equal_songs_arranged_one_by_one(band, tmp_path, monkeypatch):
    arranger = Arranger(band)
    # Pretend drums and bass live on two GPUs (they run on the CPU): tasks on different
    # "devices" in the same tick run in parallel threads.
    fake = {"drums": "cuda:0", "bass": "cuda:1"}
    monkeypatch.setattr(arranger, "device_of", lambda instrument: fake[instrument])
    spans, lock = {}, threading.Lock()
    real_run_layer = arranger.run_layer

    def timed(song, layer, callback=None, position=(0, 1)):
        start = time.perf_counter()
        real_run_layer(song, layer, callback, position)
        with lock:
            spans[(song.manifest.seed - 10, layer.instrument)] = (start, time.perf_counter(),
                                                                 threading.current_thread().name)

    monkeypatch.setattr(arranger, "run_layer", timed)
    songs = arrange_many(arranger, jobs_for(tmp_path))

    reference = Arranger(band)
    for i, song in enumerate(songs):
        alone = reference.arrange(["drums", "bass"], bpm=120, duration=1.0, seed=10 + i)
        for name in ("drums", "bass"):
            assert np.array_equal(song.stems[name], alone.stems[name])
        assert np.array_equal(song.mix, alone.mix)
        assert (tmp_path / f"song{i}" / "manifest.json").is_file()
    # song 1's drums ran while song 0's bass ran, on another thread
    a, b = spans[(0, "bass")], spans[(1, "drums")]
    assert a[2] != b[2]
    assert a[0] < b[1] and b[0] < a[1]  # the intervals overlap
    # and never before its own previous layer
    assert spans[(2, "bass")][0] >= spans[(2, "drums")][1]


def test_without_pipeline_songs_run_in_order(band, tmp_path):
    order = []
    songs = arrange_many(Arranger(band), jobs_for(tmp_path, 2), pipeline=False,
                         on_task=lambda i, k, device: order.append((i, k, device)))
    assert order == [(0, 0, "cpu"), (0, 1, "cpu"), (1, 0, "cpu"), (1, 1, "cpu")]
    assert len(songs) == 2


def test_a_failing_job_does_not_stop_the_others(band, tmp_path, monkeypatch):
    arranger = Arranger(band)
    real_run_layer = arranger.run_layer

    def flaky(song, layer, callback=None, position=(0, 1)):
        if song.manifest.seed == 11 and layer.instrument == "bass":
            raise RuntimeError("out of memory (simulated)")
        real_run_layer(song, layer, callback, position)

    monkeypatch.setattr(arranger, "run_layer", flaky)
    results = arrange_many(arranger, jobs_for(tmp_path), return_exceptions=True)
    assert isinstance(results[1], RuntimeError)
    assert results[0].layers == ["drums", "bass"] and results[2].layers == ["drums", "bass"]
    with pytest.raises(RuntimeError, match="simulated"):
        arrange_many(arranger, jobs_for(tmp_path / "again"))


def test_a_bad_job_stops_the_batch_before_any_work(band, tmp_path):
    jobs = jobs_for(tmp_path, 2) + [Job(layers=["drums"], bpm=500, out=str(tmp_path / "bad"))]
    with pytest.raises(InputError, match="outside 30-300"):
        arrange_many(Arranger(band), jobs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="same directory"):
        arrange_many(Arranger(band), [jobs[0], jobs[0]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_arrange_batch_on_two_cpu_processes(band, tmp_path):
    jobs = [{"layers": ["drums", "bass"], "bpm": 120, "duration": 1.0, "seed": 20 + i, "out": f"song{i}"}
            for i in range(3)]
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", jobs)
    env = dict(os.environ, OMP_NUM_THREADS="1", STAGE_STACK_HOME=str(tmp_path / "home"), CUDA_VISIBLE_DEVICES="")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    command = accelerate + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                            "-m", "stage_stack", "arrange-batch", jobs_file, "--cpu",
                            "--expert", f"drums={band['drums']}", "--expert", f"bass={band['bass']}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 job(s) on 2 process(es)" in result.stdout

    summary = json.loads((tmp_path / "jobs.manifests.json").read_text())
    assert summary["processes"] == 2 and summary["failed"] == 0
    assert [row["index"] for row in summary["jobs"]] == [0, 1, 2]
    assert [row["process"] for row in summary["jobs"]] == [0, 1, 0]  # jobs rank, rank + world, ...
    for i, row in enumerate(summary["jobs"]):
        assert row["manifest"]["seed"] == 20 + i and (tmp_path / f"song{i}" / "stems" / "bass.wav").is_file()
    # the same stems as arranged here, in one process (the CLI's mix gains come from the registry)
    from stage_stack import Song

    batch = Song.open(tmp_path / "song1")
    gains = {layer.name: layer.gain_db for layer in batch.manifest.layers}
    alone = Arranger(band).arrange([Layer(name, gain_db=gains[name]) for name in ("drums", "bass")], bpm=120,
                                   duration=1.0, seed=21)
    for name in ("drums", "bass"):
        assert np.array_equal(batch.stems[name], alone.stems[name])
    assert np.array_equal(batch.mix, alone.mix)
