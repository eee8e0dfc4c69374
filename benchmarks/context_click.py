"""Drums in context with a click added: does a metronome make the drums follow a mix's beat?

A lever for issue 12's "drums in context" row, measured and not shipped. On the held-out songs of
`quality.py` (the same songs and seeds, and its rhythmic F1: the beats librosa tracks in the
generated drums against the song's own beats), the drums expert generates over bass+keys+lead
through the public Arranger with:

  none             the mix alone (what quality.py scores; the Arranger's default)
  mix+click        the mix plus a click at the song's BPM from t = 0 (`click="mix+click"`)
  click            that click alone (`click="click"`)
  tracked-click    a click on a steady grid fitted to the beats librosa tracks in the mix (the
                   median inter-beat interval and the circular mean of the beat phases), alone:
                   what an Arranger could do with a mix and no tempo given
  tracked-mix+click  that click summed with the mix at the Arranger's click gain (clipped, not limited)

    python benchmarks/context_click.py                       # 20 songs x 10 s, every variant
    python benchmarks/context_click.py --variants none,click --tempos 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_json  # noqa: E402

from stage_stack.arranger import Arranger, Layer  # noqa: E402
from stage_stack.audio import click_track  # noqa: E402
from stage_stack.evaluation import (EVAL_SEED_BASE, _load, control_context, estimate_beats,  # noqa: E402
                                    held_out_songs, stem_beat_f1)
from stage_stack.instruments import WEIGHTS_DIR  # noqa: E402
from stage_stack.mixing import CLICK_GAIN_DB, db_to_gain  # noqa: E402

VARIANTS = ("none", "mix+click", "click", "tracked-click", "tracked-mix+click")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "context_click.json"


def tracked_grid(beats: np.ndarray, seconds: float) -> np.ndarray:
    """A steady beat grid over [0, seconds) fitted to tracked beat times."""
    period = float(np.median(np.diff(beats)))
    phase = float(np.angle(np.mean(np.exp(2j * np.pi * beats / period))) / (2 * np.pi) * period) % period
    return np.arange(phase, seconds, period)


def generate(arranger: Arranger, variant: str, mix: np.ndarray, beats: np.ndarray, bpm: float, rate: int,
             duration: float, seed: int) -> np.ndarray:
    layer = Layer("drums", seed=seed)
    if variant in ("none", "mix+click", "click"):
        song = arranger.arrange([layer], mix, click=variant, bpm=None if variant == "none" else bpm,
                                context_sample_rate=rate, duration=duration, seed=seed)
    else:
        grid = tracked_grid(beats, mix.size / rate)
        click = click_track(grid, grid[::4], rate, mix.size)
        heard = click if variant == "tracked-click" else mix + db_to_gain(CLICK_GAIN_DB) * click
        song = arranger.arrange([layer], np.clip(heard, -1, 1).astype(np.float32), click="none",
                                context_sample_rate=rate, duration=duration, seed=seed)
    return song.stems["drums"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drums", type=Path, default=WEIGHTS_DIR / "drums.safetensors")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--tempos", type=int, default=20, help="held-out songs, one per tempo")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown or empty {unknown or variants}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_average_1_5_15min']}")

    expert = _load(args.drums)[0]
    songs = held_out_songs(args.tempos, args.duration, expert.sample_rate, EVAL_SEED_BASE)
    arranger = Arranger(experts={"drums": expert}, device_map="cpu")
    scores: dict[str, list[float]] = {v: [] for v in variants}
    start = time.perf_counter()
    for i, song in enumerate(songs):
        mix, _ = control_context(songs, i, "drums", "song")
        tracked = estimate_beats(mix, song.sample_rate)
        for variant in variants:
            audio = generate(arranger, variant, mix, tracked, song.metadata.bpm, song.sample_rate,
                             args.duration, song.metadata.seed)
            scores[variant].append(stem_beat_f1(audio, expert.sample_rate, song.metadata.beats))
        print(f"song {i + 1}/{len(songs)} ({song.metadata.bpm:g} BPM): "
              + ", ".join(f"{v} {scores[v][-1]:.2f}" for v in variants), flush=True)

    base = scores.get("none")
    rows = []
    for variant in variants:
        f1 = np.asarray(scores[variant])
        row = {"variant": variant, "rhythmic_f1": round(float(f1.mean()), 3),
               "songs_at_0": int((f1 == 0).sum())}
        if base is not None and variant != "none":
            diff = f1 - np.asarray(base)
            row.update(vs_none=round(float(diff.mean()), 3), better=int((diff > 0).sum()), worse=int((diff < 0).sum()))
        rows.append(row)
    print(format_table(rows, [("variant", "variant"), ("rhythmic_f1", "rhythmic F1"), ("vs_none", "vs none"),
                              ("better", "songs better"), ("worse", "songs worse"), ("songs_at_0", "songs at F1 0")]))
    payload = {"benchmark": "context_click", "argv": sys.argv[1:] if argv is None else argv, "machine": machine,
               "expert": str(args.drums), "songs": len(songs), "duration": args.duration,
               "seconds": round(time.perf_counter() - start, 1), "rows": rows, "per_song": scores}
    print(f"wrote {write_json(args.output, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
