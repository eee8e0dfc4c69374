"""How long a two-layer song takes through the studio, against the same song through the library.

The studio's HTTP API (stage_stack.studio, in-process via FastAPI's TestClient, so no network)
on the bundled demo experts: start a song from a click, add drums, add bass, waiting for each
job as the page does (polling GET /api/jobs/{id}). The reference, in the same run: the same two
layers with `Arranger.arrange` directly (same experts, seeds, tempo and length), in a fresh
Arranger, so both pay for loading the experts once (after a 1 s warm-up run that neither counts).

    ratio = studio wall time / library wall time      (the studio's own cost: requests, jobs, polling)

    python benchmarks/studio_song.py                  # 10 s song at 120 BPM
    python benchmarks/studio_song.py --seconds 4 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, load_average, machine_info, write_json  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "studio_song.json"


def experts() -> dict[str, Path]:
    from stage_stack.instruments import WEIGHTS_DIR

    return {name: WEIGHTS_DIR / f"{name}.safetensors" for name in ("drums", "bass")}


def through_studio(songs: Path, seconds: float) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from stage_stack import Arranger
    from stage_stack.studio.app import create_app
    from stage_stack.studio.session import Studio

    times = {}
    begin = time.perf_counter()
    with TestClient(create_app(Studio(songs, Arranger(experts(), click="none")))) as client:
        r = client.post("/api/songs", json={"name": "bench", "bpm": 120, "duration": seconds, "seed": 0})
        r.raise_for_status()
        for name in ("drums", "bass"):
            start = time.perf_counter()
            job = client.post("/api/songs/bench/layers", json={"instrument": name}).json()
            while job["state"] in ("queued", "running"):
                time.sleep(0.3)  # the page polls every 300 ms
                job = client.get(f"/api/jobs/{job['id']}").json()
            if job["state"] != "done":
                raise SystemExit(f"{name}: {job['state']}: {job['error']}")
            times[name] = time.perf_counter() - start
        client.get("/api/songs/bench").raise_for_status()
    times["total"] = time.perf_counter() - begin
    return times


def through_library(out: Path, seconds: float) -> dict[str, float]:
    from stage_stack import Arranger

    begin = time.perf_counter()
    song = Arranger(experts(), click="none").arrange(["drums", "bass"], bpm=120, duration=seconds, seed=0, out=out)
    total = time.perf_counter() - begin
    # per layer: the Arranger's own timing of the layer (manifest timings.total_s); total: wall time
    return {**{layer.name: layer.timings.total_s for layer in song.manifest.layers}, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        through_library(Path(tmp) / "warm-up", 1.0)  # the first run pays for reading the files and warming up
        library = through_library(Path(tmp) / "lib", args.seconds)
        studio = through_studio(Path(tmp) / "songs", args.seconds)
    rows = [{"what": what, "library": library[what], "studio": studio[what], "ratio": studio[what] / library[what]}
            for what in ("drums", "bass", "total")]
    print(f"two-layer song, {args.seconds:g} s at 120 BPM, bundled demo experts, {args.threads} torch thread(s)")
    print(format_table(rows, [("what", ""), ("library", "library (s)"), ("studio", "studio (s)"), ("ratio", "ratio")]))
    write_json(args.output, {"seconds": args.seconds, "threads": args.threads, "library_s": library,
                             "studio_s": studio, "ratio_total": studio["total"] / library["total"],
                             "load_before": load_before, "load_after": load_average(), "machine": machine_info()})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
