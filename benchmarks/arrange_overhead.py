"""Per-layer overhead of the Arranger: (encode + mix + resample + decode) / generation time.

Setup (issue 4): a MusicGen-small-size expert with random weights (StageLMConfig() defaults:
dim 1024, 24 layers, cross-attention on, no text; the random 32 kHz EnCodec of
CodecConfig.musicgen_32khz()), built in memory. The song: a 44.1 kHz input mix (so the
context is resampled to 32 kHz and the stem back to 44.1 kHz), `--seconds` long (default 10,
one window), one layer in "mix+click" mode. Every stage is timed inside the Arranger and
recorded in the manifest; this script reads those numbers.

    overhead = encode + mix (conditioning audio + limiter) + resample (both ways) + decode (+ stitch)
    ratio    = overhead / generate                                target: <= 10 %

Encode, decode, resampling and mixing are linear in the length, and generation is close to
linear at these lengths (its attention over the prefix grows slowly), so the ratio measured on
a shorter song (`--seconds 3`) is a fair estimate when 10 s of generation is too slow.

    python benchmarks/arrange_overhead.py                    # 10 s, full size (minutes on 2 cores)
    python benchmarks/arrange_overhead.py --seconds 3        # the same ratio, sooner
    python benchmarks/arrange_overhead.py --quick            # tiny model, a smoke run in seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, load_average, machine_info, write_json  # noqa: E402

from stage_stack import Arranger, Layer  # noqa: E402
from stage_stack.expert import Expert  # noqa: E402
from stage_stack.models.codec import CodecConfig  # noqa: E402
from stage_stack.models.stage_lm import StageLMConfig  # noqa: E402
from stage_stack.testing import TINY_CODEC, TINY_LM, expert_metadata, tiny_codec, tiny_lm  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "arrange_overhead.json"
TARGET = 0.10
STAGES = ("resample_s", "encode_s", "mix_s", "decode_s", "stitch_s", "generate_s")


def random_expert(quick: bool, seed: int = 0) -> Expert:
    lm_config = TINY_LM if quick else StageLMConfig()
    codec_config = TINY_CODEC if quick else CodecConfig.musicgen_32khz()
    lm, codec = tiny_lm(lm_config, seed), tiny_codec(codec_config, seed)  # random weights, any size
    metadata = expert_metadata("bass", lm_config, codec_config)
    return Expert(metadata, lm, codec, Path("<random weights>"))


def input_mix(seconds: float, rate: int = 44100, seed: int = 0) -> np.ndarray:
    """A stand-in for a song: a few partials, a pulse and some noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    tone = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (110.0, 220.0, 330.0, 523.25))
    pulse = 0.2 * np.exp(-((t % 0.5) * 30.0))
    return (tone + pulse + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="song length (default 10, quick 2)")
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON path (default {DEFAULT_OUTPUT})")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = load_average()  # a shared machine: the numbers depend on what else runs
    start = time.perf_counter()
    expert = random_expert(args.quick, args.seed)
    build_s = time.perf_counter() - start
    arranger = Arranger({"bass": expert})
    print(f"expert built in {build_s:.1f} s; arranging {seconds:g} s ...", file=sys.stderr)
    song = arranger.arrange([Layer("bass")], context=input_mix(seconds), context_sample_rate=44100, bpm=120,
                            duration=seconds, seed=args.seed, click="mix+click")
    timings = song.manifest.layers[0].timings
    stages = {name: getattr(timings, name) for name in STAGES}
    overhead = sum(v for k, v in stages.items() if k != "generate_s")
    ratio = overhead / stages["generate_s"]

    rows = [{"stage": name[:-2], "seconds": value, "share_of_generate": value / stages["generate_s"]}
            for name, value in stages.items()]
    rows.append({"stage": "overhead (all but generate)", "seconds": overhead, "share_of_generate": ratio})
    rows.append({"stage": "layer total", "seconds": timings.total_s, "share_of_generate": timings.total_s /
                 stages["generate_s"]})
    print(format_table(rows, [("stage", "stage"), ("seconds", "seconds"), ("share_of_generate", "/ generate")]))
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"\nper-layer overhead: {100 * ratio:.2f}% of generation time ({verdict} the <= {100 * TARGET:g}% target)")

    lm = expert.lm.config
    payload = {
        "benchmark": "arrange_overhead",
        "setup": {"seconds": seconds, "quick": args.quick, "context_rate": 44100, "song_rate": 44100,
                  "expert_rate": expert.sample_rate, "click": "mix+click", "windows": len(
                      song.manifest.layers[0].window_plan.windows),
                  "lm": {"dim": lm.dim, "n_layers": lm.n_layers, "n_heads": lm.n_heads, "card": lm.card, "n_q": lm.n_q,
                         "cross_attention": lm.cross_attention},
                  "codec": expert.codec.config.to_dict(), "weights": "random", "threads": torch.get_num_threads()},
        "stages_s": stages,
        "layer_total_s": timings.total_s,
        "overhead_s": overhead,
        "overhead_ratio": ratio,
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    path = write_json(args.output, payload)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
