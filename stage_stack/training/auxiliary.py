"""Training-only heads on the LM's hidden state: auxiliary objectives, not in STAGE's recipe.

At the step that predicts target frame j's first codebook (step C + 1 + j of the prefix layout),
a linear head names something about frame j that only the context can tell the LM before it
plays the frame. Its loss, weighted, is added to the LM's cross-entropy, so the gradient pushes
the hidden state to fetch that from what the expert hears:

    head     names                                           loss       weight               scored rows
    harmony  the 12 pitch classes of the song's chord        BCE        loss.harmony_weight  kept stems
    beat     where the frame falls in its beat               CE over    loss.beat_weight     kept stems and
             (BEAT_PHASE_BINS bins, bin 0 centred on a beat) the bins                        clicks

The labels come from each song's metadata.json (`token_cache.chord_frames`, `beat_phase_frames`),
moved by the cached variant's speed and pitch. A click carries the beat, not the harmony; a
context dropped for CFG carries neither, so those rows are not scored. The heads are
checkpointed with the run (resume is exact) and never exported: an expert file is the LM alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TrainingConfigError
from .token_cache import BEAT_PHASE_BINS


@dataclass(frozen=True)
class HeadSpec:
    outputs: int
    seed_offset: int  # the head's init seed is config.seed + this (harmony kept its first seed)
    kinds: tuple[str, ...]  # the context kinds whose rows carry the label
    labels: str  # the batch keys of the labels and of where they are known
    known: str
    weight_field: str  # the LossConfig field


HEADS: dict[str, HeadSpec] = {
    "harmony": HeadSpec(12, 12, ("stems",), "target_chords", "target_chords_known", "harmony_weight"),
    "beat": HeadSpec(BEAT_PHASE_BINS, 13, ("stems", "click"), "target_beat_phase", "target_beat_known",
                     "beat_weight"),
}


def head_weights(loss_config) -> dict[str, float]:
    """{head name: weight} for the heads a run turns on (weight > 0), in HEADS order."""
    return {name: float(getattr(loss_config, spec.weight_field)) for name, spec in HEADS.items()
            if getattr(loss_config, spec.weight_field)}


def auxiliary_heads(loss_config, dim: int, seed: int) -> torch.nn.ModuleDict | None:
    """The run's heads (None when every weight is 0), each seeded by the run's seed."""
    names = head_weights(loss_config)
    if not names:
        return None
    heads = torch.nn.ModuleDict()
    for name in names:
        spec = HEADS[name]
        head = torch.nn.Linear(dim, spec.outputs)
        g = torch.Generator().manual_seed(seed + spec.seed_offset)
        with torch.no_grad():
            head.weight.normal_(0.0, dim ** -0.5, generator=g)
            head.bias.zero_()
        heads[name] = head
    return heads


def head_loss(name: str, head: torch.nn.Linear, hidden: torch.Tensor, context_len: int, batch: dict,
              keep: list[bool]) -> torch.Tensor:
    """The head's loss over the frames of the rows in `keep` whose label is known, read from the
    hidden state at step C + 1 + j for target frame j; 0 (with the graph kept) when none is."""
    spec = HEADS[name]
    labels, known = batch.get(spec.labels), batch.get(spec.known)
    if labels is None or known is None:
        raise TrainingConfigError(f"loss.{spec.weight_field} needs the pairs' {name} labels, which this dataset "
                                  "does not provide; train from the token cache (data.cache) with each song's "
                                  f"metadata.json beside it (data.root), or set {spec.weight_field}: 0")
    device = hidden.device
    n = min(labels.shape[1], hidden.shape[1] - (context_len + 1))
    h = hidden[:, context_len + 1 : context_len + 1 + n].float()
    scored = known[:, :n].to(device) & torch.tensor(keep, device=device)[:, None]
    if not bool(scored.any()):
        return h.sum() * 0.0  # keeps the graph (and DDP's gradient sync) the same every step
    logits = head(h[scored])
    target = labels[:, :n].to(device)[scored]
    if name == "harmony":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


def scored_rows(name: str, kinds: list[str], dropped: list[bool] | None) -> list[bool]:
    """The rows whose context carries the head's label: the right kind, not dropped for CFG."""
    keep = [k in HEADS[name].kinds for k in kinds]
    if dropped is not None:
        keep = [k and not d for k, d in zip(keep, dropped)]
    return keep
