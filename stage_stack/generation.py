"""Generation: KV-cached decoding with classifier-free guidance in one batch (reference §4).

Rows [0, R) of the batch are conditional (context + text), rows [R, 2R) unconditional (PAD
context, null text). The prefix runs once; each later step feeds one new column per row and
reads keys/values from the cache. `generate(..., use_cache=False)` is the upstream way
(re-running the whole prefix every step) and exists as the reference for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import AfterValidator

from .decoding import StepMode, StepRunner, resolve_mode
from .layout import UNFILLED, GenerationBatch, TokenLayout
from .machine import SMALL_MODEL_PARAMS, decode_threads
from .models.fused_step import fusable
from .models.quant import is_quantized, release_freed_memory, weight_count
from .models.stage_lm import RowGroup, StageLM

# Prefill steps per forward pass. Set from the prefill's time and peak memory at MusicGen-small
# size (benchmarks/README.md, "A chunked prefill").
PREFILL_CHUNK = 128
# A big quantized model's: at MusicGen-small size its steady state (imports, 321 MB of int8
# weights, the int8 cache) sits ~27 MB under its RSS limit, and one 128-step chunk's freed
# temporaries took the peak 65-80 MB past it (benchmarks/README.md, "The int8 prefill's peak").
QUANTIZED_PREFILL_CHUNK = 32

ProgressCallback = Callable[[int, int], None]  # (steps done, steps total)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults are the reference's (cfg 3.0, temperature 1, top-k 250)."""

    cfg_coef: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0  # 0 = off
    greedy: bool = False
    # An LM with a chord stream draws its chords at this temperature (0: the likeliest chord)
    # and its audio at `temperature`; None draws both at `temperature`. How adventurous the
    # harmony is, apart from the notes: on the bundled keys, chords drawn cooler than the notes
    # play fewer chord tones (0.53 at 0 and 0.25 against 0.57; benchmarks/README.md).
    chord_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True for argmax")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {self.top_p}")
        if self.chord_temperature is not None and self.chord_temperature < 0:
            raise ValueError(f"chord_temperature must be >= 0 (0 = the likeliest chord; None = temperature), "
                             f"got {self.chord_temperature}")


def sampling_from(settings: dict) -> SamplingParams:
    """SamplingParams from a mapping read from a file (an expert's or a training config's
    `sampling`): unknown keys and bad values raise ValueError naming them."""
    known = [f.name for f in fields(SamplingParams)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"unknown sampling field(s) {unknown}; expected some of {known}")
    return SamplingParams(**settings)


def _checked(settings: dict) -> dict:
    sampling_from(settings)
    return settings


# A pydantic field type for such a mapping, checked when read (ExpertMetadata, ExportConfig).
SamplingSettings = Annotated[dict[str, Any], AfterValidator(_checked)]


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


class Sampler:
    """`sample_next` for one generate call, with its buffers allocated once (same draws).

    A small expert's step is bound by per-op overhead, and the sampler is a tenth of its ops:
    every product here writes into a buffer made once per call instead of a new tensor.
    """

    def __init__(self, params: SamplingParams, rows: int, card: int, device, generator: torch.Generator | None):
        self.params, self.generator = params, generator
        self.k = params.top_k if params.top_k and params.top_k < card else 0
        self.drawn = torch.empty(rows, 1, dtype=torch.long, device=device)
        self.argmax = torch.empty(rows, dtype=torch.long, device=device)
        self.scaled = torch.empty(rows, card, device=device)
        self.top_values = torch.empty(rows, max(self.k, 1), device=device)
        self.top_index = torch.empty(rows, max(self.k, 1), dtype=torch.long, device=device)
        self.keep = torch.empty(rows, card, dtype=torch.bool, device=device)
        self.total = torch.empty(rows, 1, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.greedy:
            return torch.argmax(logits, dim=-1, out=self.argmax)
        if p.top_p:  # rare; the plain path
            return sample_next(logits, p, self.generator)
        x = logits if p.temperature == 1.0 else torch.div(logits, p.temperature, out=self.scaled)
        probs = torch.softmax(x, dim=-1)
        if self.k:
            torch.topk(probs, self.k, dim=-1, out=(self.top_values, self.top_index))
            torch.ge(probs, self.top_values[:, -1:], out=self.keep)  # keep ties with the k-th
            probs.mul_(self.keep)
        probs.div_(torch.sum(probs, dim=-1, keepdim=True, out=self.total))
        return torch.multinomial(probs, 1, generator=self.generator, out=self.drawn).view(-1)


class Guidance:
    """CFG on last-step logits [2R, K, card] -> [R, K, card] (float32, into one buffer)."""

    def __init__(self, rows: int, n_q: int, card: int, cfg: bool, coef: float, device) -> None:
        self.rows, self.cfg, self.coef = rows, cfg, coef
        self.out = torch.empty(rows, n_q, card, device=device) if cfg else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.cfg:
            return logits
        cond, uncond = logits[: self.rows], logits[self.rows :]
        # uncond + coef * (cond - uncond), the reference's formula and rounding
        return torch.sub(cond, uncond, out=self.out).mul_(self.coef).add_(uncond)


@torch.inference_mode()
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
    compile: StepMode | Literal["auto"] | bool = False,
    static_cache: bool | None = None,
    kv_dtype: torch.dtype | None = None,
    skip_pad_context: bool | None = None,
    prefill_chunk: int | None | Literal["auto"] = "auto",
    given: torch.Tensor | None = None,
):
    """Generate `n_frames` target frames for each context: returns codes [B * num_samples, K, n_frames].

    context: [B, K, C] codes or a list of [K, C_i] (left-padded), K the LM's streams
    (`layout.with_chord_row` adds an LM's chord row to codec codes; `prompt` carries it too).
    `text_memory` is the projected conditioning (memory [B, L, dim], mask [B, L]) for the
    conditional rows; the unconditional rows always get the null condition. Sample i of context b is row
    b * num_samples + i. With `return_steps`, also returns the guided last-step logits of
    every step ([steps, rows, K, card]) for inspection.

    How steps run (stage_stack.decoding): `compile` False (eager), True (torch.compile, eager
    with a warning when no compiler works), "cuda-graph", or "auto" (CUDA graphs on a GPU,
    eager on the CPU). `static_cache` keeps every step's shapes fixed (default: on when
    compiling, else as `StageLM.new_cache` chooses: on for a half-precision cache on the CPU);
    `kv_dtype` overrides the cache dtype (default: `default_kv_dtype`: an int8 cache for a big
    model on the CPU, else as `StageLM.new_cache` chooses).
    `skip_pad_context`: the unconditional rows' cache leaves out their PAD context, which no
    query attends to (exact; a quarter of the cache with equal context and target lengths);
    False keeps it, as upstream does; None (the default) skips it for models of
    SMALL_MODEL_PARAMS and more, where the cache's bytes count, and keeps it below, where a
    second row group's attention calls cost more than the bytes they save (the demo experts'
    generation ~9 % faster with one group; benchmarks/README.md). `prefill_chunk`: the prompt
    is run through the cache this many steps at a time (None: in one pass; the same logits up
    to float rounding), so that its activations do not grow with the context; "auto" (the
    default) is `default_prefill_chunk`. On the CPU a big model's freed heap is given back to
    the OS between chunks (glibc would keep each chunk's temporaries resident). The thread
    count is chosen per call (stage_stack.machine.decode_threads, STAGE_STACK_THREADS).
    `given` [B, K, n_frames] fixes tokens the LM does not sample (UNFILLED = -1 elsewhere;
    `TokenLayout.generation_batch`), e.g. an expert's chord stream.
    """
    device = lm.final_norm.weight.device
    n_params = weight_count(lm)
    with decode_threads(n_params, device):
        mode = resolve_mode(compile, lm)
        if n_params < SMALL_MODEL_PARAMS and device.type == "cpu":
            lm.fuse_small_ops()
        if skip_pad_context is None:
            skip_pad_context = n_params >= SMALL_MODEL_PARAMS
        if kv_dtype is None:
            kv_dtype = default_kv_dtype(lm, n_params, mode)
        if prefill_chunk == "auto":
            prefill_chunk = default_prefill_chunk(lm, n_params)
        trim = device.type == "cpu" and n_params >= SMALL_MODEL_PARAMS
        return _generate(lm, context, n_frames, text_memory=text_memory, prompt=prompt, num_samples=num_samples,
                         params=params, seed=seed, generator=generator, callback=callback, use_cache=use_cache,
                         return_steps=return_steps, mode=mode,
                         static=True if mode != "eager" else static_cache, kv_dtype=kv_dtype,
                         skip_pad_context=skip_pad_context, prefill_chunk=prefill_chunk, trim=trim, given=given)


def default_prefill_chunk(lm: StageLM, n_params: int | None = None) -> int:
    """QUANTIZED_PREFILL_CHUNK for a model of SMALL_MODEL_PARAMS or more with int8/int4
    linears, else PREFILL_CHUNK (a small model's steps are bound by per-op overhead, so more
    chunks would cost time for no bytes that matter).

    At MusicGen-small size, 10 s + 10 s, on idle cores of an AMD EPYC (benchmarks/README.md,
    stop 30), the int8 row's peak RSS fell from 750 / 763 MB (1 / 2 threads, chunks of 128) to
    677 / 682 with chunks of 32 and the heap trimmed between chunks (limit 685), for a prefill
    1.17x / 1.32x as long (+0.4-0.5 s of a ~20 s stem). Float models keep 128: their limits
    leave room, and stop 25 measured a fifth more prefill time for 19 MB at 32.
    """
    if (n_params if n_params is not None else weight_count(lm)) < SMALL_MODEL_PARAMS:
        return PREFILL_CHUNK
    return QUANTIZED_PREFILL_CHUNK if is_quantized(lm) else PREFILL_CHUNK


def default_kv_dtype(lm: StageLM, n_params: int | None = None, mode: str = "eager") -> torch.dtype | None:
    """torch.int8 for a model of SMALL_MODEL_PARAMS or more on the CPU, else None
    (`StageLM.new_cache` chooses). A float model gets it only in eager mode (a compiled step
    with an int8 cache is not measured); a quantized one in every mode.

    At MusicGen-small size, 10 s + 10 s, one thread on an AMD EPYC (benchmarks/README.md, stop
    29), the cache is what takes each format over 1.2 x weights + 300 MB: with an int8 cache the
    peak RSS fell 1779 -> 1571 MB for fp32 (limit 1760) and 1161 -> 959 for bf16 (limit 1030),
    decoding 1.12x / 0.98x as fast, with top-1 agreement 1.0 and a guided KL of ~1e-6 against a
    float32 cache (fp32 weights); for int8 weights 836 -> 786 MB at stop 28.

    Small models keep a float32 cache, whatever their weights: their steps are bound by per-op
    overhead, quantizing each step's keys adds ops for no bytes that matter, and a half-precision
    cache (static, read whole at every step) made the demo arrangement ~6 % slower than a float32
    one on an AMD EPYC (benchmarks/README.md, stop 33). The probe's `half_kv_cache` choice, timed
    at MusicGen-small shapes, had flipped between runs and taken the demo experts with it. Unless
    their decode steps run fused (models.fused_step.fusable: bf16 or int8 weights on a CPU with the
    native kernels), whose attention reads an int8 cache: the demo arrangement then ran 1.2-1.7x
    as fast (benchmarks/README.md, stop 34).
    """
    weights = lm.final_norm.weight
    if weights.device.type != "cpu":
        return None
    if (n_params if n_params is not None else weight_count(lm)) < SMALL_MODEL_PARAMS:
        if mode == "eager" and fusable(lm):  # its blocks then run as two native calls each
            return torch.int8
        return torch.float32 if weights.dtype in (torch.bfloat16, torch.float16) else None
    return torch.int8 if mode == "eager" or is_quantized(lm) else None


def _generate(lm, context, n_frames, *, text_memory, prompt, num_samples, params, seed, generator, callback,
              use_cache, return_steps, mode, static, kv_dtype, skip_pad_context, prefill_chunk, trim, given):
    layout = TokenLayout.for_config(lm.config)
    context = layout.left_pad(context)
    device = lm.final_norm.weight.device
    context = context.to(device)
    if num_samples > 1:
        context = context.repeat_interleave(num_samples, dim=0)
        if prompt is not None:
            prompt = prompt.repeat_interleave(num_samples, dim=0)
        if given is not None:
            given = given.repeat_interleave(num_samples, dim=0)
        if text_memory is not None:
            text_memory = tuple(t.repeat_interleave(num_samples, dim=0) for t in text_memory)
    rows = context.shape[0]
    cfg = params.cfg_coef != 1.0
    batch = layout.generation_batch(context, n_frames, prompt=None if prompt is None else prompt.to(device), cfg=cfg,
                                    given=None if given is None else given.to(device))

    memory = memory_mask = None
    if text_memory is not None and lm.config.cross_attention:
        memory, memory_mask = (t.to(device) for t in text_memory)
        if cfg:
            memory = torch.cat([memory, torch.zeros_like(memory)])
            memory_mask = torch.cat([memory_mask, torch.zeros_like(memory_mask)])

    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    seq = batch.codes.clone()
    B, K, S = seq.shape
    if prefill_chunk is None:
        prefill_chunk = S
    elif prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive number of steps or None, got {prefill_chunk}")
    mask = batch.attention_mask
    positions = batch.positions
    total = S - batch.start_offset
    groups = cfg_row_groups(mask, rows) if cfg and skip_pad_context else None
    cache = lm.new_cache(B, S, static=static, dtype=kv_dtype, groups=groups) if use_cache else None
    static = cache is not None and cache.static
    runner = StepRunner(lm, cache, mask, mode) if static else None
    guidance = Guidance(rows, K, lm.config.card, cfg, params.cfg_coef, device)
    sampler = Sampler(params, rows * K, lm.config.card, device, generator)
    # Slots still to be sampled; both CFG halves get the same tokens (each keeps its own context).
    unfilled = (seq == UNFILLED).view(2 if cfg else 1, rows, K, S)
    halves = seq.view(2 if cfg else 1, rows, K, S)
    steps_logits = []

    def logits_at(offset: int) -> torch.Tensor:
        """Last-step logits predicting step `offset` from seq[..., :offset]."""
        if cache is None:
            out = lm(seq[..., :offset], mask[:, :offset], memory, memory_mask,
                     positions=positions[:, :offset], last_only=True)
            return out[:, :, -1].float()
        start = cache.length
        if runner is not None and offset - start == 1:
            return runner(seq[..., start:offset], positions[:, start:offset])
        # The prefill, in chunks: its activations then scale with the chunk, not the context.
        for lo in range(start, offset, prefill_chunk):
            hi = min(offset, lo + prefill_chunk)
            if trim and lo > start:
                release_freed_memory()  # the last chunk's temporaries: ~30 MB at MusicGen-small size
            if static:  # eager, advanced here
                out = lm(seq[..., lo:hi], mask, memory, memory_mask, cache=cache,
                         positions=positions[:, lo:hi], last_only=True)
                cache.advance(hi - lo)
            else:
                out = lm(seq[..., lo:hi], mask[:, :hi], memory, memory_mask, cache=cache,
                         positions=positions[:, lo:hi], last_only=True)
        return out[:, :, -1].float()

    chord_classes = lm.config.chord_classes  # a chord stream draws only from its classes
    for i, offset in enumerate(range(batch.start_offset, S)):
        guided = guidance(logits_at(offset))
        if chord_classes:
            draw_chords(guided[:, 0], chord_classes, params)
        if return_steps:
            steps_logits.append(guided.clone())
        tokens = sampler(guided.reshape(-1, guided.shape[-1])).view(1, rows, K)
        column = halves[..., offset]
        torch.where(unfilled[..., offset], tokens, column, out=column)  # in place, into seq
        if callback is not None:
            callback(i + 1, total)

    out = layout.generated_frames(seq[:rows], batch)
    if return_steps:
        return out, torch.stack(steps_logits)
    return out


def draw_chords(logits: torch.Tensor, chord_classes: int, params: SamplingParams) -> None:
    """Shape a chord stream's guided logits [R, card] in place: only chord classes can be
    drawn, and with `params.chord_temperature` the sampler's division by `temperature` leaves
    them divided by `chord_temperature` instead."""
    logits[:, chord_classes:] = float("-inf")
    t = params.chord_temperature
    if t is None or params.greedy:
        return
    if t == 0:
        logits.masked_fill_(logits < logits.amax(dim=-1, keepdim=True), float("-inf"))
    else:
        logits.mul_(params.temperature / t)


def cfg_row_groups(mask: torch.Tensor, rows: int) -> tuple[RowGroup, RowGroup]:
    """The conditional and unconditional halves of a CFG batch as KV-cache row groups, each
    keeping the steps from its rows' earliest valid one (the unconditional rows: their SEP)."""
    first = mask.to(torch.int8).argmax(dim=-1)  # each row's first valid step
    return (RowGroup(0, rows, int(first[:rows].min())), RowGroup(rows, 2 * rows, int(first[rows:].min())))


def generation_steps(n_frames: int, n_q: int) -> int:
    """Decoding steps for `n_frames` target frames (the delay pattern adds n_q - 1)."""
    return n_frames + n_q - 1


__all__ = ["SamplingParams", "generate", "sample_next", "sampling_from", "generation_steps", "GenerationBatch"]
