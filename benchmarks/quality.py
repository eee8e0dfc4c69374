"""Quality of the demo experts: STAGE's evaluation protocol at small scale (issue 5, point 6).

On held-out synthetic songs (seeds 10_000 + i, one tempo per song spread over 80-160 BPM, none
of them a training song or tempo), each expert generates its stem and is scored:

  drums from a click    beat F1 (librosa's tracker, mir_eval's F-measure) against the click's beats
  drums (no click pairs) the same for a drums expert trained without click pairs (the ablation)
  drums in context      rhythmic F1 against the beats of the other stems it hears
  bass, keys            rhythmic F1, and the share of notes whose pitch class is in the chord

Every metric is also given for the song's real stem and for the real stem through the expert's
codec, so a miss can be told apart from the metric's own ceiling and from the codec's. The
protocol and the metric definitions are in stage_stack/evaluation.py; `stage-stack eval` runs
the same protocol.

    python benchmarks/quality.py                  # 20 songs of 10 s, the bundled experts + the ablation
    python benchmarks/quality.py --quick          # 4 songs of 8 s: a few minutes
    python benchmarks/quality.py --tiny --quick   # random tiny experts: checks the script only
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

from stage_stack.evaluation import (BEAT_TRIM_SECONDS, CONTEXT_SOURCES, EVAL_SEED_BASE, EvalSettings,  # noqa: E402
                                   EvaluationError, evaluate, parse_stems)
from stage_stack.instruments import WEIGHTS_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "quality.json"
# Where configs/demo-drums-noclick.yaml exports the ablation expert (not shipped: trained locally).
DEFAULT_ABLATION = REPO / "runs" / "demo" / "drums-noclick" / "drums-noclick.safetensors"
QUICK = {"tempos": 4, "duration": 8.0}


def _progress(task: str, done: int, total: int) -> None:
    print(f"  {task}: {done}/{total}", file=sys.stderr, flush=True)


def _experts(args: argparse.Namespace, scratch: Path) -> tuple[list[Path], Path | None]:
    if args.tiny:
        from stage_stack.testing import make_tiny_expert

        experts = [make_tiny_expert(scratch / f"{name}.safetensors", instrument=name, seed=i)
                   for i, name in enumerate(("drums", "bass", "keys")) if not args.only or name in args.only]
        if args.no_ablation or (args.only and "drums" not in args.only):
            return experts, None
        return experts, make_tiny_expert(scratch / "drums-noclick.safetensors", instrument="drums", seed=9)
    experts = []
    for name in ("drums", "bass", "keys"):
        if args.only and name not in args.only:
            continue
        path = getattr(args, name)
        if path is None:  # the bundled expert, when it exists
            path = WEIGHTS_DIR / f"{name}.safetensors"
            if not path.is_file():
                print(f"note: no {name} expert ({path} does not exist); its tasks are skipped", file=sys.stderr)
                continue
        experts.append(path)
    if args.no_ablation:
        return experts, None
    ablation = args.ablation_drums
    if ablation is None and DEFAULT_ABLATION.is_file() and (not args.only or "drums" in args.only):
        ablation = DEFAULT_ABLATION  # --only without drums: the ablation needs the drums expert beside it
    return experts, ablation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tempos", type=int, default=None, help="held-out songs, one per tempo (default 20, quick 4)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per song (default 10, quick 8)")
    parser.add_argument("--trim", type=float, default=BEAT_TRIM_SECONDS, help="beats before this are not scored")
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE, help="song i has seed SEED_BASE + i")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance coefficient (default: each expert's own sampling, as the "
                             "Arranger uses it, else the reference's 3)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: each expert's own, else the reference's 1)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample from the k likeliest codes (default: each expert's own, else the reference's "
                             "250; 0 = all)")
    parser.add_argument("--chord-temperature", type=float, default=None,
                        help="an expert with a chord stream draws its chords at this temperature (0 = the "
                             "likeliest; default: the expert's own, else its temperature)")
    parser.add_argument("--chords", choices=("heard", "own"), default=None,
                        help="an expert with a chord stream is given the chords heard in its context, or names its "
                             "own (default: what the Arranger does: heard over the song's stems)")
    parser.add_argument("--beats", choices=("heard", "own"), default=None,
                        help="the drums in context hear a click on the beats heard in the stems, or the stems "
                             "(default: what the Arranger does: heard)")
    for name in ("drums", "bass", "keys"):
        parser.add_argument(f"--{name}", type=Path, default=None,
                            help=f"{name} expert (default: the bundled {WEIGHTS_DIR.name}/{name}.safetensors)")
    parser.add_argument("--ablation-drums", type=Path, default=None,
                        help="drums expert trained without click pairs (default: the one "
                             "configs/demo-drums-noclick.yaml exports, when it exists; else skipped)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation even when its expert exists")
    parser.add_argument("--only", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=None,
                        help="evaluate only these instruments, e.g. drums or drums,bass (default: all three)")
    parser.add_argument("--no-drums-in-context", action="store_true", help="score drums from a click only")
    parser.add_argument("--context-source", choices=CONTEXT_SOURCES, default="song",
                        help="control for the in-context tasks: generate over the song's own stems (default), "
                             "the next held-out song's, or silence; the gap is what listening is worth")
    parser.add_argument("--context-stems", type=parse_stems,
                        default=None, help="the in-context tasks hear only these stems, e.g. keys "
                                           "(default: the stems of the instruments the expert was trained to hear, its "
                                           "metadata's hears, else every stem but the target's)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['tempos']} songs of {QUICK['duration']:g} s")
    parser.add_argument("--tiny", action="store_true", help="random tiny experts: checks the script, scores are noise")
    parser.add_argument("--dtype", default="fp32",
                        help="experts' weight format (default fp32: comparable across machines; 'auto' is what "
                             "the Arranger uses by default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: best on busy cores)")
    parser.add_argument("--audio-dir", type=Path, default=None, help="keep the generated stems here")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON path (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.only or ()) - {"drums", "bass", "keys"})
    if unknown:
        parser.error(f"--only: unknown instrument(s) {', '.join(unknown)}; expected drums, bass or keys")
    torch.set_num_threads(args.threads)
    try:
        settings = EvalSettings(
            n_tempos=args.tempos or (QUICK["tempos"] if args.quick else 20),
            duration=args.duration or (QUICK["duration"] if args.quick else 10.0),
            seed_base=args.seed_base, trim_seconds=args.trim, cfg_coef=args.cfg,
            temperature=args.temperature, top_k=args.top_k, chord_temperature=args.chord_temperature,
            chords=args.chords, beats=args.beats,
            context_source=args.context_source, context_stems=args.context_stems,
            drums_in_context=not args.no_drums_in_context, dtype=args.dtype,
        )
    except EvaluationError as error:
        parser.error(str(error))
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({args.threads} thread(s)), "
          f"load {machine['load_average_1_5_15min']}")
    print(f"{settings.n_tempos} held-out songs x {settings.duration:g} s, "
          f"beats scored from {settings.trim_seconds:g} s")

    with tempfile.TemporaryDirectory() as scratch:
        experts, ablation = _experts(args, Path(scratch))
        if not experts:
            print("no expert to evaluate: train the demo experts (configs/demo-*.yaml) or pass --drums/--bass/--keys",
                  file=sys.stderr)
            return 2
        if ablation is None and not args.no_ablation and not DEFAULT_ABLATION.is_file():
            print(f"note: the ablation is skipped ({DEFAULT_ABLATION} does not exist; train it with "
                  "configs/demo-drums-noclick.yaml or pass --ablation-drums)", file=sys.stderr)
        started = time.perf_counter()
        report = evaluate(experts, ablation_drums=ablation, settings=settings, progress=_progress,
                          audio_dir=args.audio_dir)
    print()
    print(report.table())
    print(f"\n{time.perf_counter() - started:.0f} s")

    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    payload = {"benchmark": "quality", "command": command.strip(), "tiny_experts": args.tiny,
               "machine": machine, **report.to_dict()}
    print(f"wrote {write_json(args.output, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
