"""Does an expert use its context's content? Teacher-forced loss with the right context, the
same context moved late, another song's context, and none.

An expert that follows the context's timing loses when the context is late; one that follows its
tempo or harmony loses with another song's context; one that only knows "a context is there"
loses only with none. Pairs come from a token cache written by training (`data.cache`), so the
codes are the ones the expert learned from:

    python benchmarks/context_use.py instruments/weights/drums.safetensors \
        runs/demo/tokens/valid-<key> --kind click
    python benchmarks/context_use.py instruments/weights/bass.safetensors runs/demo/tokens/valid-<key>

An expert with its own context codec (`context_codec_config` in its file) reads its contexts from
a second cache of the same songs built with that codec: pass it as `--context-cache`. An expert
with a chord stream (`chord_classes` in its LM config) is taught each frame's chord as its own
past: pass the songs folder the cache was built from as `--songs` (their metadata.json chords);
the losses are then the audio streams' alone, as for every other expert, and the chord stream's
is reported on its own line.

Losses are per target frame, split into the first second of the window (where the stem has no
past of its own to go on) and the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

from stage_stack.evaluation import parse_stems  # noqa: E402
from stage_stack.expert import load_expert  # noqa: E402
from stage_stack.layout import TokenLayout, with_chord_row  # noqa: E402
from stage_stack.training.token_cache import TokenPairDataset, collate_token_pairs  # noqa: E402
from stage_stack.training.train import CLICK_SHIFT_SECONDS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def other_song(pairs: list, k: int) -> int:
    for step in range(1, len(pairs)):
        m = (k + step) % len(pairs)
        if pairs[m].info.song_id != pairs[k].info.song_id:
            return m
    raise SystemExit("every pair comes from one song: give a cache with two songs or more")


def frame_losses(lm, layout: TokenLayout, pairs: list, variant: str, shift: int, batch: int = 16) -> torch.Tensor:
    """Mean cross-entropy per target frame [T] over the pairs, with the context changed by `variant`."""
    rows = []
    for i in range(0, len(pairs), batch):
        group = pairs[i:i + batch]
        b = collate_token_pairs(group)
        context = b["context"]
        if variant == "late":
            context = [torch.roll(c, shift, dims=-1) for c in context]
        elif variant == "other song":  # the context of the next pair that comes from another song
            context = [torch.from_numpy(pairs[other_song(pairs, i + j)].context_codes) for j in range(len(group))]
        elif variant == "none":
            context = [torch.full_like(c, layout.pad) for c in context]
        target = b["target"]
        if lm.config.chord_classes:  # the chord stream as its own past; contexts carry none
            target = with_chord_row(target, lm.config, b["target_chord_class"])
            context = [with_chord_row(c, lm.config) for c in context]
        tb = layout.training_batch(context, target)
        with torch.no_grad():
            logits = lm(tb.codes, tb.attention_mask, None, None, positions=tb.positions)
        aligned, scored = layout.target_logits(logits, tb)
        ce = F.cross_entropy(aligned.float().permute(0, 3, 1, 2), tb.targets, reduction="none")  # [B, K, T]
        rows.append(torch.where(scored, ce, torch.nan))
    ce = torch.cat(rows)
    streams = slice(1, None) if lm.config.chord_classes else slice(None)
    return torch.nanmean(ce[:, streams], dim=(0, 1)), torch.nanmean(ce[:, 0], dim=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("expert", type=Path)
    parser.add_argument("cache", type=Path, help="a token cache folder (with index.json) of held-out songs")
    parser.add_argument("--context-cache", type=Path, default=None,
                        help="the same songs' cache built with the expert's context codec (experts that have one)")
    parser.add_argument("--songs", type=Path, default=None,
                        help="the songs folder the cache was built from (experts with a chord stream: their chords)")
    parser.add_argument("--kind", choices=["click", "stems"], default="stems", help="context kind of the pairs")
    parser.add_argument("--context-stems", type=parse_stems,
                        default=None, help="stem contexts hold only these stems, e.g. keys (default: the "
                                           "instruments the expert was trained to hear, its metadata's hears, "
                                           "else any other stems)")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--late", type=float, default=CLICK_SHIFT_SECONDS,
                        help="seconds the 'late' context is moved (default: as validation's val_loss_click_shifted)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="window length (default: the expert's training window)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default results/context_use_<instrument>_<kind>.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    expert = load_expert(args.expert, device="cpu", dtype="float32")
    if expert.lm.config.cross_attention:
        print("note: text conditioning is left empty (null condition)", file=sys.stderr)
    seconds = args.seconds or float(expert.metadata.training.get("max_target_seconds") or 10.0)
    if (expert.context_codec is not None) != (args.context_cache is not None):
        raise SystemExit(f"{args.expert}: " + ("this expert hears its context through its own codec: pass the held-out "
                                               "songs' cache built with it as --context-cache"
                                               if expert.context_codec is not None else
                                               "this expert has no context codec: leave out --context-cache"))
    chords = bool(expert.lm.config.chord_classes)
    if chords and args.songs is None:
        raise SystemExit(f"{args.expert}: this expert has a chord stream; pass the songs folder the cache was built "
                         "from as --songs (each song's metadata.json gives the chords it is taught)")
    stems = args.context_stems or (tuple(expert.metadata.hears) if expert.metadata.hears else None)
    data = TokenPairDataset(args.cache, expert.instrument, segment_seconds=seconds, context_seconds=(seconds, seconds),
                            full_context_prob=1.0, click_prob=1.0 if args.kind == "click" else 0.0,
                            identity_prob=1.0, samples_per_epoch=args.pairs, seed=args.seed,
                            context_cache_dir=args.context_cache, context_stems=stems,
                            source=args.songs if chords else None, chord_labels=chords)
    pairs = [data[i] for i in range(len(data))]
    layout = TokenLayout.for_config(expert.lm.config)
    shift = max(1, round(args.late * data.frame_rate))
    first = int(round(data.frame_rate))
    lm = expert.lm.eval()

    rows = []
    heard = "" if args.kind == "click" or stems is None else f" (contexts: {'+'.join(stems)} only)"
    print(f"{expert.instrument} expert {args.expert}, {len(pairs)} {args.kind} pairs of {seconds:g} s from "
          f"{args.cache}{heard}")
    print(f"{'context':<12} {'first 1 s':>10} {'rest':>10} {'all':>10}")
    for variant in ("right", "late", "other song", "none"):
        losses, chord_losses = frame_losses(lm, layout, pairs, variant, shift)
        # nanmean: a target's last frames are scored in no audio stream when a chord stream delays them
        row = {"context": variant, "first_second": float(losses[:first].nanmean()),
               "rest": float(losses[first:].nanmean()) if losses.numel() > first else None,
               "all": float(losses.nanmean())}
        if chords:
            row["chord_stream"] = {"first_second": float(chord_losses[:first].nanmean()),
                                   "all": float(chord_losses.nanmean())}
        rows.append(row)
        rest = f"{row['rest']:10.4f}" if row["rest"] is not None else f"{'-':>10}"
        print(f"{variant:<12} {row['first_second']:10.4f} {rest} {row['all']:10.4f}")
    if chords:
        print("chord stream: " + ", ".join(f"{r['context']} {r['chord_stream']['first_second']:.4f} / "
                                          f"{r['chord_stream']['all']:.4f}" for r in rows) + " (first 1 s / all)")
    right = rows[0]["all"]
    print(f"\nworth (nats/token, loss minus the right context's): late {rows[1]['all'] - right:+.4f}, "
          f"other song {rows[2]['all'] - right:+.4f}, none {rows[3]['all'] - right:+.4f}")
    payload = {"benchmark": "context_use", "expert": str(args.expert), "cache": str(args.cache),
               "context_cache": None if args.context_cache is None else str(args.context_cache), "kind": args.kind,
               "context_stems": None if stems is None else list(stems), "seconds": seconds,
               "late_seconds": args.late, "pairs": len(pairs), "machine": machine_info(), "rows": rows}
    output = args.output or RESULTS / f"context_use_{expert.instrument}_{args.kind}.json"
    print(f"wrote {write_json(output, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
