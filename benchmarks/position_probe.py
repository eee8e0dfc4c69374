"""Does a position scheme make "look at the same moment of the context" easy to learn?

A probe of `StageLMConfig.positions` on a task that needs nothing else: every target frame is a
fixed per-codebook relabelling of the context frame at the same time (target[q, t] =
perm_q[context[q, t]]), random tokens otherwise, so the loss leaves ln(card) only once the LM
attends from target frame t to context frame t. Small StageLMs (fresh init, the demo experts'
recipe: AdamW, lr 1e-3, bf16-free) learn it with "stage" and "aligned" positions, a few seeds
each, on one thread; the table gives the steps until the held-out loss falls below a threshold.

    python benchmarks/position_probe.py                 # dim 64, 2 layers, card 64, 32+32 frames
    python benchmarks/position_probe.py --steps 2000 --seeds 3 --card 16 --lr 3e-3

Result on 2026-12-02 (AMD EPYC, the second command): stage 850 / 900 / 750 steps, aligned
1300 / 1050 / 1050: aligned positions do not make this easier (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_json  # noqa: E402

from stage_stack.layout import TokenLayout  # noqa: E402
from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "position_probe.json"


def make_batch(perms: torch.Tensor, batch: int, frames: int, card: int, g: torch.Generator):
    n_q = perms.shape[0]
    context = torch.randint(0, card, (batch, n_q, frames), generator=g)
    target = torch.stack([perms[q][context[:, q]] for q in range(n_q)], dim=1)
    return context, target


def learn(positions: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    cfg = StageLMConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=4 * args.dim,
                        card=args.card, n_q=args.n_q, cross_attention=False, positions=positions)
    lm = init_weights(StageLM(cfg), seed=seed).train()
    layout = TokenLayout.for_config(cfg)
    g = torch.Generator().manual_seed(1000 + seed)
    perms = torch.stack([torch.randperm(args.card, generator=g) for _ in range(args.n_q)])
    held_out = make_batch(perms, 64, args.frames, args.card, torch.Generator().manual_seed(99))
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    curve, reached = [], None
    threshold = args.threshold * math.log(args.card)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        tb = layout.training_batch(*make_batch(perms, args.batch, args.frames, args.card, g))
        loss = layout.loss(lm(tb.codes, tb.attention_mask, positions=tb.positions), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            with torch.no_grad():
                tb = layout.training_batch(*held_out)
                val = float(layout.loss(lm.eval()(tb.codes, tb.attention_mask, positions=tb.positions), tb))
                lm.train()
            curve.append([step, round(val, 4)])
            if reached is None and val < threshold:
                reached = step
    return {"positions": positions, "seed": seed, "steps_to_threshold": reached, "final_loss": curve[-1][1],
            "curve": curve, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--card", type=int, default=64)
    p.add_argument("--n-q", type=int, default=2)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threshold", type=float, default=0.25, help="reached when held-out loss < this x ln(card)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info()
    print(f"{machine['cpu']}, torch {machine['torch']}, 1 thread, load {machine['load_average_1_5_15min']}")
    runs = [learn(mode, seed, args) for seed in range(args.seeds) for mode in ("stage", "aligned")]
    rows = [{k: r[k] for k in ("positions", "seed", "steps_to_threshold", "final_loss", "seconds")} for r in runs]
    print(f"\nheld-out loss threshold {args.threshold} x ln({args.card}) = {args.threshold * math.log(args.card):.3f};"
          f" {args.steps} steps max; steps_to_threshold None = not reached")
    print(format_table(rows, [("positions", "positions"), ("seed", "seed"), ("steps_to_threshold", "steps to threshold"),
                              ("final_loss", "final loss"), ("seconds", "s")]))
    by_mode = {m: [r["steps_to_threshold"] for r in runs if r["positions"] == m] for m in ("stage", "aligned")}
    print("\n" + "; ".join(f"{m}: {v}" for m, v in by_mode.items()))
    payload = {"benchmark": "position_probe", "args": vars(args) | {"output": str(args.output)}, "machine": machine,
               "runs": runs}
    print(f"wrote {write_json(args.output, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
