"""Generation: KV-cached decoding with classifier-free guidance in one batch (reference §4).

Rows [0, R) of the batch are conditional (context + text), rows [R, 2R) unconditional (PAD
context, null text). The prefix runs once; each later step feeds one new column per row and
reads keys/values from the cache. `generate(..., use_cache=False)` is the upstream way
(re-running the whole prefix every step) and exists as the reference for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .layout import UNFILLED, GenerationBatch, TokenLayout
from .models.stage_lm import StageLM

ProgressCallback = Callable[[int, int], None]  # (steps done, steps total)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults are the reference's (cfg 3.0, temperature 1, top-k 250)."""

    cfg_coef: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0  # 0 = off
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True for argmax")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {self.top_p}")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of `logits` [N, card]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = probs * (probs >= kth)  # keep ties with the k-th, as upstream does
    if params.top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _guided(logits: torch.Tensor, rows: int, cfg: bool, coef: float) -> torch.Tensor:
    """Last-step logits [2R or R, K, card] -> guided logits [R, K, card]."""
    if not cfg:
        return logits
    cond, uncond = logits[:rows], logits[rows:]
    return uncond + coef * (cond - uncond)


@torch.no_grad()
def generate(
    lm: StageLM,
    context: list[torch.Tensor] | torch.Tensor,
    n_frames: int,
    *,
    text_memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    prompt: torch.Tensor | None = None,
    num_samples: int = 1,
    params: SamplingParams = SamplingParams(),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
    use_cache: bool = True,
    return_steps: bool = False,
):
    """Generate `n_frames` target frames for each context: returns codes [B * num_samples, K, n_frames].

    context: [B, K, C] codes or a list of [K, C_i] (left-padded). `text_memory` is the
    projected conditioning (memory [B, L, dim], mask [B, L]) for the conditional rows; the
    unconditional rows always get the null condition. Sample i of context b is row
    b * num_samples + i. With `return_steps`, also returns the guided last-step logits of
    every step ([steps, rows, K, card]) for inspection.
    """
    layout = TokenLayout.for_config(lm.config)
    context = layout.left_pad(context)
    device = lm.final_norm.weight.device
    context = context.to(device)
    if num_samples > 1:
        context = context.repeat_interleave(num_samples, dim=0)
        if prompt is not None:
            prompt = prompt.repeat_interleave(num_samples, dim=0)
        if text_memory is not None:
            text_memory = tuple(t.repeat_interleave(num_samples, dim=0) for t in text_memory)
    rows = context.shape[0]
    cfg = params.cfg_coef != 1.0
    batch = layout.generation_batch(context, n_frames, prompt=None if prompt is None else prompt.to(device), cfg=cfg)

    memory = memory_mask = None
    if text_memory is not None and lm.config.cross_attention:
        memory, memory_mask = (t.to(device) for t in text_memory)
        if cfg:
            memory = torch.cat([memory, torch.zeros_like(memory)])
            memory_mask = torch.cat([memory_mask, torch.zeros_like(memory_mask)])

    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    seq = batch.codes.clone()
    S = seq.shape[-1]
    positions = batch.positions
    total = S - batch.start_offset
    cache = lm.new_cache(seq.shape[0], S) if use_cache else None
    steps_logits = []

    def logits_at(offset: int) -> torch.Tensor:
        """Last-step logits predicting step `offset` from seq[..., :offset]."""
        if cache is None:
            out = lm(seq[..., :offset], batch.attention_mask[:, :offset], memory, memory_mask,
                     positions=positions[:, :offset], last_only=True)
        else:
            start = cache.length
            out = lm(seq[..., start:offset], batch.attention_mask[:, :offset], memory, memory_mask,
                     cache=cache, positions=positions[:, start:offset], last_only=True)
        return out[:, :, -1].float()

    for i, offset in enumerate(range(batch.start_offset, S)):
        guided = _guided(logits_at(offset), rows, cfg, params.cfg_coef)
        if return_steps:
            steps_logits.append(guided)
        tokens = sample_next(guided.reshape(-1, guided.shape[-1]), params, generator).view(rows, -1)
        tokens = torch.where(batch.final_mask[:rows, :, offset], tokens, layout.pad)
        if cfg:  # same tokens in both halves; each half keeps its own context/SEP slots
            tokens = torch.cat([tokens, tokens])
        column = seq[:, :, offset]
        seq[:, :, offset] = torch.where(column == UNFILLED, tokens, column)
        if callback is not None:
            callback(i + 1, total)

    out = layout.generated_frames(seq[:rows], batch)
    if return_steps:
        return out, torch.stack(steps_logits)
    return out


def generation_steps(n_frames: int, n_q: int) -> int:
    """Decoding steps for `n_frames` target frames (the delay pattern adds n_q - 1)."""
    return n_frames + n_q - 1


__all__ = ["SamplingParams", "generate", "sample_next", "generation_steps", "GenerationBatch"]
