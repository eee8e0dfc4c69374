"""Generation speed of the STAGE LM: ours (fp32, bf16) vs full recompute vs transformers' MusicGen.

Setup (issue 2, point 9): MusicGen-small size (StageLMConfig() defaults: dim 1024, 24 layers,
16 heads, card 2048, n_q 4) with random weights, with and without cross-attention; a 10 s context
(500 frames at 50 Hz) and 10 s generated (500 frames = 503 decoding steps with the delay
pattern); classifier-free guidance (batch of 2); one sample.

Rows (each in its own Python process by default, so its peak RSS is its own):
  ours-fp32       stage_stack.generation.generate(use_cache=True), float32
  ours-bf16       the same model built in bfloat16 (weights; KV cache as stage_stack.machine chooses)
  ours-int8       weight-only int8 block linears (per output channel), bf16 activations
  ours-int4       weight-only int4 block linears (groups of 128), bf16 activations
  ours-*-torchkernels  the same with torch's kernels where this machine chose stage_stack.native's
                  (the before of those kernels, in the same run)
  ours-*-unfused  the same with each block's own ops in a decode step, not the fused native halves
  ours-int8-{weightonly,dynamic,native}  int8 with its product forced to one kernel
  full-recompute  generate(use_cache=False): the upstream way, re-running the prefix every step.
                  Too slow to run whole, so a few steps are timed at the start, middle and end
                  and the total is interpolated (see `time_full_recompute`).
  hf-generate     transformers' MusicGen `generate(guidance_scale=3, do_sample, top_k=250)`:
                  MusicgenForCausalLM without cross-attention, MusicgenForConditionalGeneration
                  (tiny T5 + tiny EnCodec around the same-size decoder) with it.
  hf-loop         MusicgenForCausalLM called by hand with past_key_values, one step at a time,
                  CFG by batch doubling, the same sampler as ours.

Every row runs the same number of steps; the first step is the prefill (the C + 2 prefix steps)
and is reported separately from the decode steps. Steps/s "total" includes the prefill.

    python benchmarks/generation_speed.py --threads 1     # full size: ~25 min on one busy core
    python benchmarks/generation_speed.py --quick         # tiny model, ~10 s (CI smoke run)
    python benchmarks/generation_speed.py --steps 40 --configs nocross --methods ours-fp32,ours-bf16
    python benchmarks/generation_speed.py --configs nocross --thread-counts 1,auto \
        --methods ours-fp32,ours-bf16,ours-bf16-unfused,ours-int8,ours-int8-unfused,ours-int8-dynamic,hf-loop,hf-generate \
        --accuracy-steps 48 --arrange-formats fp32,int8      # issue 13's run (all steps: ~22 min)

Besides the rows, `--accuracy-steps N` (default 48, 0 = off) measures each weight format
against fp32 teacher-forced over N steps (max logit error, top-1 agreement, KL of the guided
distribution) at this size and on the bundled demo experts, and `--arrange-formats` times
`Arranger.from_registry(dtype=F).arrange(["drums", "bass", "keys"], duration=10)` on the demo
experts in a fresh process per format (real-time factor, end to end).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MB,
    copy_bandwidth,
    format_table,
    load_average,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    tensor_bytes,
    worker_main,
    write_json,
)

from stage_stack import machine as stage_machine  # noqa: E402
from stage_stack.generation import SamplingParams, generate, sample_next  # noqa: E402
from stage_stack.models.quant import QUANTIZED, named_weight_bytes, release_freed_memory, weight_count  # noqa: E402
from stage_stack.models import stage_lm  # noqa: E402
from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights  # noqa: E402

OURS = {"ours-fp32": "fp32", "ours-bf16": "bf16", "ours-int8": "int8", "ours-int4": "int4"}
# The same formats with the KV cache forced to bf16 whatever this machine's choice: the memory
# side of that choice, measured in the same run (stage_stack.machine, half_kv_cache).
# ours with the KV cache dtype forced: (weight format, cache dtype)
OURS_FORCED_KV = {"ours-bf16-halfkv": ("bf16", torch.bfloat16), "ours-int8-halfkv": ("int8", torch.bfloat16),
                  "ours-bf16-int8kv": ("bf16", torch.int8), "ours-int8-int8kv": ("int8", torch.int8),
                  "ours-fp32-halfkv": ("fp32", torch.bfloat16), "ours-fp32-int8kv": ("fp32", torch.int8)}
# int8 with the decode kernel forced (stage_stack.machine, int8_decode): the other side of that
# choice, measured in the same run
OURS_INT8_KERNEL = {"ours-int8-weightonly": "weight_only", "ours-int8-dynamic": "dynamic",
                    "ours-int8-native": "native"}
# The same formats with each block's own ops in a decode step instead of the fused native halves
# (models.fused_step; StageLM.fused_decode = False): the other side of that change, in the same run
OURS_UNFUSED = {"ours-bf16-unfused": "bf16", "ours-int8-unfused": "int8"}
# The same formats with torch's kernels where this machine chose stage_stack.native's (the bf16
# product of a decode step, one query's attention over an int8 cache): the other side of those
# choices, measured in the same run
OURS_TORCH_KERNELS = {"ours-fp32-torchkernels": "fp32", "ours-bf16-torchkernels": "bf16",
                      "ours-int8-torchkernels": "int8"}
METHODS = (*OURS, *OURS_FORCED_KV, *OURS_INT8_KERNEL, *OURS_TORCH_KERNELS, *OURS_UNFUSED, "full-recompute",
           "hf-generate", "hf-loop")
CONFIGS = ("nocross", "cross")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "generation_speed.json"
CFG_COEF = 3.0
TOP_K = 250

# Issue 2 targets (stated for a CPU with AMX-BF16).
TARGET_OURS_VS_RECOMPUTE = 10.0
TARGET_OURS_VS_HF_GENERATE = 1.3
TARGET_BF16_VS_FP32 = 1.8
TARGET_RSS_FACTOR, TARGET_RSS_EXTRA = 1.2, 300 * MB
# Issue 13 targets.
TARGET_INT8_VS_BF16 = 1.6
TARGET_BF16_SHARE = 0.6
TARGET_STEM_S = 20.0  # a 10 s stem with its prefill, best format with >= 95 % top-1 agreement
TARGET_DEMO_RTF = 10.0


@dataclass(frozen=True)
class Workload:
    quick: bool
    cross: bool
    context_frames: int  # C
    gen_frames: int  # T
    steps: int  # decoding steps run, prefill included (full: T + n_q - 1)
    text_tokens: int  # length of the text memory (cross-attention only)
    recompute_samples: int  # timed steps per region for full-recompute
    threads: int | None
    seed: int

    @property
    def lm_config(self) -> StageLMConfig:
        if self.quick:
            return StageLMConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=256, card=64, n_q=4,
                                 cross_attention=self.cross, text_dim=32)
        return StageLMConfig(cross_attention=self.cross)

    @property
    def prefix_steps(self) -> int:
        """Steps the first forward processes: context, the SEP column and the leading empty step."""
        return self.context_frames + 2


class _StopGeneration(Exception):
    """Raised from a progress callback to end a run after the requested number of steps."""


class StepClock:
    """Timestamps one event per decoding step; step 1's time is the prefill."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.stop_after = stop_after

    def tick(self, done: int | None = None, total: int | None = None) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if self.stop_after is not None and len(self.stamps) >= self.stop_after and (total is None or done < total):
            raise _StopGeneration

    def timing(self) -> dict[str, Any]:
        prefill = self.stamps[0] - self.start
        decode = self.stamps[-1] - self.stamps[0]
        steps = len(self.stamps)
        # CPU time of the process (all its threads): on a busy machine, wall time also counts the
        # time other processes held the cores; with one thread, steps per CPU-second is close to
        # what an idle machine would give.
        decode_cpu = self.cpu_stamps[-1] - self.cpu_stamps[0]
        return {
            "steps": steps,
            "prefill_s": prefill,
            "decode_s": decode,
            "total_s": prefill + decode,
            "decode_steps_per_s": (steps - 1) / decode if steps > 1 and decode > 0 else None,
            "steps_per_s": steps / (prefill + decode),
            "prefill_cpu_s": self.cpu_stamps[0] - self.cpu_start,
            "decode_cpu_s": decode_cpu,
            "decode_steps_per_cpu_s": (steps - 1) / decode_cpu if steps > 1 and decode_cpu > 0 else None,
        }


# -- inputs -----------------------------------------------------------------------------------


def context_codes(work: Workload) -> torch.Tensor:
    gen = torch.Generator().manual_seed(work.seed)
    return torch.randint(0, work.lm_config.card, (1, work.lm_config.n_q, work.context_frames), generator=gen)


def text_memory(work: Workload, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Projected text memory [1, L, dim] + mask for the conditional row (cross-attention only)."""
    if not work.cross:
        return None
    gen = torch.Generator().manual_seed(work.seed + 1)
    return torch.randn(1, work.text_tokens, dim, generator=gen), torch.ones(1, work.text_tokens, dtype=torch.bool)


# -- ours -------------------------------------------------------------------------------------


def build_ours(work: Workload, dtype: torch.dtype | str, int8_kernel: str | None = None) -> StageLM:
    # Built directly in `dtype` (not fp32 then cast) so the process never holds two copies and
    # its peak RSS is what loading an expert in that dtype costs.
    if dtype in QUANTIZED:
        return build_quantized(work.lm_config, dtype, work.seed, int8_kernel)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        lm = StageLM(work.lm_config)
    finally:
        torch.set_default_dtype(previous)
    lm = init_weights(lm, seed=work.seed).eval()
    release_freed_memory()  # as load_expert ends
    return lm


def build_quantized(cfg: StageLMConfig, fmt: str, seed: int, int8_kernel: str | None = None) -> StageLM:
    """A random int8/int4 LM built the way load_expert builds one: on the meta device, then one
    float matrix at a time, quantized as it is made (no float copy of the model ever exists).
    Weights follow init_weights' recipe with a generator per tensor, so they are a function of
    (seed, name) and every format of a row set gets the same weights (see `random_float`)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from stage_stack.models.quant import replace_linears

    with init_empty_weights(include_buffers=False):
        lm = StageLM(cfg)
    names = set(replace_linears(lm, fmt))
    if int8_kernel is not None:  # None: this machine's choice, as load_expert makes it
        for name in names:
            lm.get_submodule(name).kernel = int8_kernel
    for name, p in list(lm.named_parameters()):
        set_module_tensor_to_device(lm, name, "cpu", value=random_float(cfg, name, p.shape, seed),
                                    dtype=torch.bfloat16)
    for name in sorted(names):
        lm.get_submodule(name).set_weight(random_float(cfg, name + ".weight", None, seed))
        release_freed_memory()  # per matrix, as load_expert does
    return lm.eval()


def random_float(cfg: StageLMConfig, name: str, shape, seed: int) -> torch.Tensor:
    """init_weights' values for parameter `name`, from a generator seeded by (seed, name)."""
    import zlib

    if shape is None:
        with torch.device("meta"):
            shape = StageLM(cfg).get_parameter(name).shape
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    value = torch.randn(shape, generator=gen) * 0.02
    if name.endswith(("self_attn.out.weight", "ffn.fc2.weight")):
        value /= math.sqrt(2 * cfg.n_layers)
    if name.startswith("embeddings."):
        value[cfg.pad_token] = 0
    return value


def build_float(cfg: StageLMConfig, dtype: torch.dtype, seed: int) -> StageLM:
    """The float model with `random_float` weights (the reference of the accuracy table)."""
    lm = StageLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(random_float(cfg, name, p.shape, seed))
    return lm.eval()


def run_ours(lm: StageLM, work: Workload, context: torch.Tensor, *, use_cache: bool = True,
             prompt: torch.Tensor | None = None, stop_after: int | None = None,
             kv_dtype: torch.dtype | None = None) -> StepClock:
    memory = text_memory(work, lm.config.dim)
    clock = StepClock(stop_after=stop_after if stop_after is not None else work.steps)

    def tick(done, total):
        clock.threads = torch.get_num_threads()  # what generate() chose (stage_stack.machine)
        clock.tick(done, total)

    made = []
    new_cache = lm.new_cache
    lm.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]  # to report its layout
    try:
        generate(lm, context, work.gen_frames, text_memory=memory, prompt=prompt, seed=work.seed,
                 callback=tick, use_cache=use_cache, kv_dtype=kv_dtype)
    except _StopGeneration:
        pass
    finally:
        del lm.new_cache
    clock.cache = made[0] if made else None
    return clock


def kv_read_bytes(cache, mean_length: float) -> float:
    """Bytes of keys/values one decode step reads from `cache` when `mean_length` steps are
    written: a static cache reads every slot; a dynamic one each row group's written steps."""
    first = cache.keys[0][0]  # [rows, heads, steps, head_dim] of layer 0, group 0
    per_step_row = first.shape[1] * first.shape[3] * first.element_size() * 2 * len(cache.keys)
    if cache.static:
        return float(cache.nbytes)
    return float(sum((g.stop - g.start) * max(0.0, mean_length - g.first) for g in cache.groups) * per_step_row)


def warm_up_ours(lm: StageLM, work: Workload, use_cache: bool = True, kv_dtype: torch.dtype | None = None) -> None:
    """A few short steps so one-time kernel set-up is not charged to the timed run."""
    short = Workload(**{**asdict(work), "context_frames": 8, "gen_frames": 2, "steps": 4})
    run_ours(lm, short, context_codes(short), use_cache=use_cache, kv_dtype=kv_dtype)


def ours_step_bytes(lm: StageLM) -> int:
    """Weight bytes one decoding step reads: every matrix on the per-step path, plus one
    embedding row per codebook. Cross-attention k/v and text_proj run once per call, not per step."""
    skipped = ("embeddings.", "text_proj.")
    # quantized weights are buffers or fbgemm's packed matrices: named_weight_bytes counts both
    total = sum(size for name, size in named_weight_bytes(lm)
                if not name.startswith(skipped) and ".cross_attn.kv." not in name)
    p = lm.final_norm.weight
    return total + lm.config.n_q * lm.config.dim * p.element_size()


def time_full_recompute(lm: StageLM, work: Workload, context: torch.Tensor) -> dict[str, Any]:
    """Estimate the upstream way's total time from timed steps at the start, middle and end.

    A full-recompute step costs a function of its prefix length L only (GEMMs ~ L, attention
    ~ L^2). `generate(use_cache=False, prompt=P frames)` starts at prefix length C + 2 + P, so
    each region runs through the real code path with the real prefix length; `samples` steps
    are timed per region. The per-step time t(L) is the quadratic through the three region
    means; the estimate is the sum of t(L) over every step of the workload (a linear fit is
    reported as a cross-check).
    """
    import numpy as np

    k = max(1, min(work.recompute_samples, work.steps))
    starts = sorted({0, max(0, (work.steps - k) // 2), max(0, work.steps - k)})
    gen = torch.Generator().manual_seed(work.seed + 2)
    prompt_frames = torch.randint(0, lm.config.card, (1, lm.config.n_q, work.gen_frames), generator=gen)
    samples = []
    for first in starts:
        P = min(first, work.gen_frames)
        clock = run_ours(lm, work, context, use_cache=False, prompt=prompt_frames[..., :P] if P else None,
                         stop_after=k)
        previous = clock.start
        for i, stamp in enumerate(clock.stamps):
            samples.append({"prefix_len": work.prefix_steps + P + i, "seconds": stamp - previous})
            previous = stamp

    regions: dict[int, list[dict]] = {}
    for s in samples:
        regions.setdefault(min(starts, key=lambda f: abs(work.prefix_steps + f - s["prefix_len"])), []).append(s)
    xs = [statistics.mean(s["prefix_len"] for s in r) for r in regions.values()]
    ys = [statistics.mean(s["seconds"] for s in r) for r in regions.values()]
    all_lengths = np.arange(work.prefix_steps, work.prefix_steps + work.steps, dtype=np.float64)

    def fitted(degree: int) -> np.ndarray:
        degree = min(degree, len(xs) - 1)
        return np.polyval(np.polyfit(xs, ys, degree), all_lengths)

    quad, lin = fitted(2), fitted(1)
    prefill, decode = float(quad[0]), float(quad[1:].sum())
    steps = work.steps
    return {
        "steps": steps,
        "prefill_s": prefill,
        "decode_s": decode,
        "total_s": prefill + decode,
        "decode_steps_per_s": (steps - 1) / decode if steps > 1 else None,
        "steps_per_s": steps / (prefill + decode),
        "estimated": True,
        "estimate": {
            "method": f"{k} timed step(s) at each of {len(starts)} regions (first step {starts}); per-step "
                      "time = quadratic in prefix length through the region means, summed over all steps",
            "timed_steps": samples,
            "total_s_linear_fit": float(lin.sum()),
            "timed_seconds": sum(s["seconds"] for s in samples),
        },
    }


# -- transformers ------------------------------------------------------------------------------


def hf_decoder_config(work: Workload):
    from transformers import MusicgenDecoderConfig

    cfg = work.lm_config
    return MusicgenDecoderConfig(
        vocab_size=cfg.card, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, num_codebooks=cfg.n_q,
        max_position_embeddings=max(2048, work.prefix_steps + work.gen_frames + cfg.n_q + 8),
        pad_token_id=cfg.card, bos_token_id=cfg.card, decoder_start_token_id=cfg.card,
    )


def build_hf(work: Workload, conditional: bool):
    """MusicgenForCausalLM, or MusicgenForConditionalGeneration around the same decoder with a
    tiny T5 text encoder and a tiny EnCodec (their cost is negligible next to the decoder)."""
    import transformers
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenForCausalLM,
                              MusicgenForConditionalGeneration, T5Config)

    transformers.logging.set_verbosity_error()
    torch.manual_seed(work.seed)
    decoder = hf_decoder_config(work)
    if not conditional:
        return MusicgenForCausalLM(decoder).eval()
    text = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    # EnCodec derives its codebook count from the bandwidth: kbps * 1000 / (frame rate * bits per
    # code). 800 Hz / (2 * 2) = 200 frames/s; ask for exactly n_q codebooks of `card` entries.
    frame_rate, bits = 200, math.ceil(math.log2(work.lm_config.card))
    kbps = work.lm_config.n_q * frame_rate * bits / 1000 * (1 + 1e-6)  # margin against rounding down
    codec = EncodecConfig(codebook_size=work.lm_config.card, hidden_size=8, num_filters=4, upsampling_ratios=[2, 2],
                          target_bandwidths=[kbps], sampling_rate=800, num_residual_layers=1, codebook_dim=8,
                          num_lstm_layers=1)
    if codec.num_quantizers != work.lm_config.n_q:
        raise RuntimeError(f"tiny EnCodec has {codec.num_quantizers} codebooks, expected {work.lm_config.n_q}")
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())
    model = MusicgenForConditionalGeneration(config).eval()
    for key in ("pad_token_id", "decoder_start_token_id", "bos_token_id"):
        setattr(model.generation_config, key, work.lm_config.card)
    return model


def hf_step_bytes(model, cross: bool) -> int:
    """Weight bytes per decoding step for transformers' decoder (same accounting as ours)."""
    decoder = getattr(model, "decoder", model)  # ConditionalGeneration wraps a CausalLM
    skipped = ["embed_tokens."]
    if cross:  # cross-attention keys/values are computed once per call and cached
        skipped += ["encoder_attn.k_proj.", "encoder_attn.v_proj."]
    else:  # the layer exists in transformers' decoder but is skipped without encoder states
        skipped += ["encoder_attn.", "encoder_attn_layer_norm."]
    total = sum(p.numel() * p.element_size() for name, p in decoder.named_parameters()
                if not any(s in name for s in skipped))
    if hasattr(model, "enc_to_dec_proj"):  # re-applied to the text memory at every step
        total += tensor_bytes(model.enc_to_dec_proj.parameters())
    cfg = decoder.config
    return total + cfg.num_codebooks * cfg.hidden_size * 4


class _CountForwards:
    """Forward pre-hook on the decoder stack: the query length of every call."""

    def __init__(self, module) -> None:
        self.lengths: list[int] = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(int(ids.shape[-1]) if ids is not None else -1)


def run_hf_generate(model, work: Workload, stop_after: int | None = None) -> tuple[StepClock, list[int]]:
    from transformers import LogitsProcessor, LogitsProcessorList

    cfg = work.lm_config
    gen = torch.Generator().manual_seed(work.seed)
    steps = stop_after or work.steps

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            clock.tick()
            return scores

    common = dict(do_sample=True, top_k=TOP_K, guidance_scale=CFG_COEF, max_new_tokens=steps,
                  num_return_sequences=1, logits_processor=LogitsProcessorList([Stamp()]))
    torch.manual_seed(work.seed)
    if hasattr(model, "text_encoder"):
        counter = _CountForwards(model.decoder.model.decoder)
        text_ids = torch.randint(0, model.config.text_encoder.vocab_size, (1, work.text_tokens), generator=gen)
        # generate() prepends the decoder start token, so the prefill is prefix_steps long.
        prompt = torch.randint(0, cfg.card, (cfg.n_q, work.prefix_steps - 1), generator=gen)
        clock = StepClock()
        model.generate(text_ids, attention_mask=torch.ones_like(text_ids), decoder_input_ids=prompt, **common)
    else:
        counter = _CountForwards(model.model.decoder)
        prompt = torch.randint(0, cfg.card, (cfg.n_q, work.prefix_steps), generator=gen)
        clock = StepClock()
        model.generate(prompt, **common)
    counter.handle.remove()
    return clock, counter.lengths


def run_hf_loop(model, work: Workload, stop_after: int | None = None) -> StepClock:
    """Hand-written KV-cache loop over MusicgenForCausalLM.forward, CFG by batch doubling.

    Rows are [conditional, unconditional] like ours: the unconditional row has a PAD context
    masked out in `attention_mask` and a zero text memory.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    cfg = work.lm_config
    K, C, P0 = cfg.n_q, work.context_frames, work.prefix_steps
    gen = torch.Generator().manual_seed(work.seed)
    cond = torch.randint(0, cfg.card, (K, P0), generator=gen)
    uncond = cond.clone()
    uncond[:, :C] = cfg.card  # PAD
    input_ids = torch.cat([cond, uncond])  # [2K, P0]: rows are (batch, codebook) flattened
    attention_mask = torch.ones(2, P0, dtype=torch.long)
    attention_mask[1, :C] = 0
    memory = text_memory(work, cfg.dim)
    extra = {}
    if memory is not None:
        extra["encoder_hidden_states"] = torch.cat([memory[0], torch.zeros_like(memory[0])])
        extra["encoder_attention_mask"] = torch.ones(2, work.text_tokens, dtype=torch.long)
    decoder_config = model.config
    cache = EncoderDecoderCache(DynamicCache(config=decoder_config), DynamicCache(config=decoder_config))
    params = SamplingParams(cfg_coef=CFG_COEF, top_k=TOP_K)
    sampler = torch.Generator().manual_seed(work.seed)
    clock = StepClock()
    with torch.no_grad():
        for _ in range(stop_after or work.steps):
            out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                        use_cache=True, **extra)
            last = out.logits[:, -1].float().view(2, K, -1)
            guided = last[1] + CFG_COEF * (last[0] - last[1])
            tokens = sample_next(guided, params, sampler)  # [K]
            input_ids = tokens.repeat(2)[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(2, 1)], dim=1)
            clock.tick()
    return clock


# -- one row ----------------------------------------------------------------------------------


def bandwidth_by_threads(size_mb: int, thread_counts: list[int]) -> dict[int, dict[str, Any]]:
    """copy_bandwidth at each thread count (torch's setting restored after)."""
    threads = torch.get_num_threads()
    try:
        out = {}
        for t in thread_counts:
            torch.set_num_threads(t)
            out[t] = copy_bandwidth(size_mb)
        return out
    finally:
        torch.set_num_threads(threads)


def use_torch_kernels() -> None:
    """Decode with torch's kernels where this machine chose stage_stack.native's, for the rest of
    this row (`measure` puts the machine's choices back)."""
    import dataclasses

    from stage_stack.models import quant

    stage_lm._KERNELS = dataclasses.replace(stage_machine.kernel_choices(), bf16_decode_linear="linear",
                                            decode_attention_int8="matmul")
    quant._native_rows = lambda: False  # the row scaling around fbgemm's product: torch's ops


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from stage_stack.models import quant

    kernels, native_rows = stage_lm._KERNELS, quant._native_rows
    try:
        return measure_row(spec)
    finally:  # rows share a process with --no-isolate (and --quick)
        stage_lm._KERNELS, quant._native_rows = kernels, native_rows


def measure_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model for one (config, method), warm up, time the workload, report memory."""
    method = spec.pop("method")
    if method == "accuracy":
        return measure_accuracy(spec)
    if method.startswith("arrange-"):
        return measure_arrange(spec, method.removeprefix("arrange-"))
    spec.pop("arrange_seconds", None)
    work = Workload(**spec)
    if work.threads:
        torch.set_num_threads(work.threads)
        os.environ["STAGE_STACK_THREADS"] = str(work.threads)  # generate() would choose otherwise
    torch.manual_seed(work.seed)
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    cfg = work.lm_config
    row: dict[str, Any] = {"config": "cross" if work.cross else "nocross", "method": method}
    B = 2  # CFG rows
    kv_rows_len = work.prefix_steps + (work.steps - 1) / 2 + 0.5  # mean cache length over decode steps
    extra_kv = work.text_tokens if work.cross else 0

    with torch.no_grad():
        if method in OURS or method in OURS_FORCED_KV or method in OURS_INT8_KERNEL or method in OURS_TORCH_KERNELS \
                or method in OURS_UNFUSED or method == "full-recompute":
            if method in OURS_INT8_KERNEL:
                fmt, forced_kv = "int8", None
            elif method in OURS_UNFUSED:
                fmt, forced_kv = OURS_UNFUSED[method], None
            elif method in OURS_TORCH_KERNELS:
                fmt, forced_kv = OURS_TORCH_KERNELS[method], None
                use_torch_kernels()
            else:
                fmt, forced_kv = (OURS[method], None) if method in OURS else OURS_FORCED_KV.get(method, ("fp32", None))
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(fmt, fmt)
            model = build_ours(work, dtype, OURS_INT8_KERNEL.get(method))
            model.fused_decode = method not in OURS_UNFUSED
            row["build_s"] = time.perf_counter() - t0
            weight_bytes = sum(size for _, size in named_weight_bytes(model))
            dtype = fmt
            step_bytes = ours_step_bytes(model)
            kv_dtype = forced_kv or model.new_cache(1, 1).keys[0][0].dtype  # may differ from the weights'
            warm_up_ours(model, work, use_cache=method != "full-recompute", kv_dtype=forced_kv)
            peak_build = peak_rss_bytes()
            reset_peak_rss()
            load_before = load_average()
            context = context_codes(work)
            if method == "full-recompute":
                timing = time_full_recompute(model, work, context)
                clock = None
            else:
                clock = run_ours(model, work, context, kv_dtype=forced_kv)
                timing = clock.timing()
        elif method in ("hf-generate", "hf-loop"):
            dtype = torch.float32
            if not work.threads:  # like for like: the count generate() would choose for this size
                torch.set_num_threads(stage_machine.choose_threads(400_000_000 if not work.quick else 1))
            model = build_hf(work, conditional=method == "hf-generate" and work.cross)
            row["build_s"] = time.perf_counter() - t0
            weight_bytes = tensor_bytes(model.parameters())
            step_bytes = hf_step_bytes(model, work.cross)
            kv_dtype = dtype
            short = Workload(**{**asdict(work), "context_frames": 8, "gen_frames": 2, "steps": 4})
            run_hf_generate(model, short) if method == "hf-generate" else run_hf_loop(model, short)
            peak_build = peak_rss_bytes()
            reset_peak_rss()
            load_before = load_average()
            if method == "hf-generate":
                clock, lengths = run_hf_generate(model, work)
                timing = clock.timing()
                timing["forward_query_lengths_first"] = lengths[:4]
                timing["prefill_forwards"] = sum(1 for n in lengths if n > 1)
                if timing["prefill_forwards"] == 0:
                    kv_rows_len = (work.steps + 1) / 2 + 0.5  # cache grows from 1: prompt ignored
            else:
                clock = run_hf_loop(model, work)
                timing = clock.timing()
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

    peak_run = peak_rss_bytes()
    element = torch.tensor([], dtype=kv_dtype).element_size()
    kv_bytes = 2 * cfg.n_layers * B * (kv_rows_len + extra_kv) * cfg.dim * element
    cache = getattr(clock, "cache", None)
    if cache is not None:  # ours: the cache's own layout (static or not, PAD context skipped or not)
        kv_dtype = cache.keys[0][0].dtype
        kv_bytes = kv_read_bytes(cache, kv_rows_len) + 2 * cfg.n_layers * B * extra_kv * cfg.dim * element
        row["kv_cache"] = {"static": cache.static, "bytes": cache.nbytes, "max_steps": cache.max_steps,
                           "groups": [[g.start, g.stop, g.first] for g in cache.groups]}
    row.update(timing)
    n_params = weight_count(model)
    row["runtime"] = stage_machine.runtime_report(n_params)  # CPU, flags, kernel and thread choices
    if timing.get("decode_steps_per_s"):
        # A whole 10 s stem (every step of the workload), extrapolated from the timed steps.
        full = work.gen_frames + cfg.n_q - 1
        row["stem_total_s_est"] = timing["prefill_s"] + (full - 1) / timing["decode_steps_per_s"]
    row.update({
        "dtype": str(dtype).removeprefix("torch."),
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "threads": getattr(clock, "threads", None) or torch.get_num_threads(),
        "thread_setting": str(work.threads) if work.threads else "auto",
        "weight_bytes": weight_bytes,
        "weight_bytes_per_step": step_bytes,
        "kv_bytes_per_step": int(kv_bytes),
        "rss_start_bytes": rss_start,
        "peak_rss_build_bytes": peak_build,
        "peak_rss_run_bytes": peak_run,
        "peak_rss_bytes": max(x for x in (peak_build, peak_run) if x is not None) if peak_run else None,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    })
    return row


# -- accuracy of the weight formats -----------------------------------------------------------


def guided_logits(lm: StageLM, codes: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Teacher-forced guided logits [steps, K, card] (float32) of the last `steps` positions."""
    from stage_stack.models.stage_lm import positions_from_mask

    with torch.inference_mode():
        out = lm(codes, mask, positions=positions_from_mask(mask)).float()[:, :, -steps:]  # [2, K, steps, card]
    cond, uncond = out[0], out[1]
    return (uncond + CFG_COEF * (cond - uncond)).transpose(0, 1)


def cached_guided_logits(lm: StageLM, codes: torch.Tensor, mask: torch.Tensor, steps: int,
                         kv_dtype: torch.dtype) -> torch.Tensor:
    """guided_logits through a KV cache of `kv_dtype`: the prefix in one prefill, then the last
    `steps` positions one at a time, as decoding reads them (the cache's rounding included)."""
    from stage_stack.models.stage_lm import positions_from_mask

    S = codes.shape[-1]
    positions = positions_from_mask(mask)
    cache = lm.new_cache(codes.shape[0], S, static=False, dtype=kv_dtype)
    outs = []
    with torch.inference_mode():
        lm(codes[..., : S - steps], mask[:, : S - steps], cache=cache, positions=positions[:, : S - steps])
        for t in range(S - steps, S):
            outs.append(lm(codes[..., t : t + 1], mask[:, : t + 1], cache=cache,
                           positions=positions[:, t : t + 1]).float())
    out = torch.cat(outs, dim=2)  # [2, K, steps, card]
    cond, uncond = out[0], out[1]
    return (uncond + CFG_COEF * (cond - uncond)).transpose(0, 1)


def compare_logits(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    p_ref = torch.softmax(ref, dim=-1)
    kl = (p_ref * (torch.log_softmax(ref, -1) - torch.log_softmax(got, -1))).sum(-1)
    return {"max_logit_error": float((got - ref).abs().max()), "mean_logit_error": float((got - ref).abs().mean()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl_guided_mean": float(kl.mean()), "kl_guided_max": float(kl.max()), "logit_range": float(ref.abs().max())}


def accuracy_sequence(cfg: StageLMConfig, context: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG rows [cond, uncond] of a generation layout with random target tokens filled in."""
    from stage_stack.layout import UNFILLED, TokenLayout

    layout = TokenLayout.for_card(cfg.card, cfg.n_q)
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, cfg.card, (1, cfg.n_q, context), generator=gen)
    batch = layout.generation_batch(ctx, steps)
    codes = batch.codes[..., : batch.start_offset + steps]
    fill = torch.randint(0, cfg.card, codes.shape[1:], generator=gen).expand_as(codes)
    return torch.where(codes == UNFILLED, fill, codes), batch.attention_mask[:, : codes.shape[-1]]


def measure_accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """Each format against fp32, teacher forced: at the benchmark's size (random weights, the
    same values in every format) and on the bundled demo experts (trained weights, their own
    fp32 greedy continuation of a random context as the sequence)."""
    steps, seed = spec["accuracy_steps"], spec["seed"]
    work = Workload(**{k: v for k, v in spec.items() if k in Workload.__dataclass_fields__})
    cfg = work.lm_config
    if work.threads:
        torch.set_num_threads(work.threads)
    result: dict[str, Any] = {"steps": steps, "formats": {}, "demo": {}}
    codes, mask = accuracy_sequence(cfg, min(work.context_frames, 100), steps, seed)
    fp32 = build_float(cfg, torch.float32, seed)
    ref = guided_logits(fp32, codes, mask, steps)
    # fp32 weights decoded step by step with a float32 (the control: ~0), bf16 and int8 cache
    for name, kv in (("fp32+fp32kv", torch.float32), ("fp32+bf16kv", torch.bfloat16), ("fp32+int8kv", torch.int8)):
        result["formats"][name] = compare_logits(cached_guided_logits(fp32, codes, mask, steps, kv), ref)
    del fp32
    for fmt in ("bf16", "int8", "int8-weightonly", "int8-dynamic", "int4"):
        kernel = {"int8-weightonly": "weight_only", "int8-dynamic": "dynamic"}.get(fmt)
        if fmt == "bf16":
            lm = build_float(cfg, torch.bfloat16, seed)
        else:
            lm = build_quantized(cfg, fmt.split("-")[0], seed, kernel)
        if kernel is None:
            result["formats"][fmt] = compare_logits(guided_logits(lm, codes, mask, steps), ref)
        else:  # the decode product runs only one step at a time (a teacher-forced pass is a prefill GEMM)
            result["formats"][fmt + "+bf16kv"] = compare_logits(
                cached_guided_logits(lm, codes, mask, steps, torch.bfloat16), ref)
        if fmt in ("bf16", "int8"):  # decoded step by step, as generate() runs them (this machine's kernels,
            # stage_stack.native's included), with a bf16 and an int8 cache
            for name, kv in ((f"{fmt}+bf16kv", torch.bfloat16), (f"{fmt}+int8kv", torch.int8)):
                result["formats"][name] = compare_logits(cached_guided_logits(lm, codes, mask, steps, kv), ref)
        del lm
    if not work.quick:
        from stage_stack.expert import load_expert
        from stage_stack.registry import Registry

        registry = Registry.load()
        for name in ("drums", "bass", "keys"):
            try:
                path = registry.resolve_expert(name).path
            except Exception as exc:  # not installed: say so in the JSON
                result["demo"][name] = {"error": str(exc).splitlines()[0]}
                continue
            fp32 = load_expert(path, load_text=False).lm
            dcfg = fp32.config
            from stage_stack.layout import TokenLayout, with_chord_row

            gen = torch.Generator().manual_seed(seed)
            # the expert's own layout: a chord stream's PAD row in the context, its positions and
            # context vocabulary (the keys have a chord stream since stop 31)
            ctx = with_chord_row(torch.randint(0, dcfg.card, (1, dcfg.n_q, 50), generator=gen), dcfg)
            frames = generate(fp32, ctx, steps, params=SamplingParams(greedy=True))
            layout = TokenLayout.for_config(dcfg)
            batch = layout.generation_batch(ctx, steps)
            filled = layout.interleave(layout.frames(torch.cat([ctx, torch.full_like(ctx, dcfg.card)]),
                                                     torch.cat([frames, frames])))
            codes_d = filled[..., : batch.start_offset + steps]
            mask_d = batch.attention_mask[:, : codes_d.shape[-1]]
            ref_d = guided_logits(fp32, codes_d, mask_d, steps)
            result["demo"][name] = {fmt: compare_logits(guided_logits(load_expert(path, dtype=fmt, load_text=False).lm,
                                                                      codes_d, mask_d, steps), ref_d)
                                    for fmt in ("bf16", "int8", "int4")}
    return result


def measure_arrange(spec: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Three layers of 10 s through the Arranger on the bundled demo experts, in this fresh process."""
    if spec.get("threads"):
        os.environ["STAGE_STACK_THREADS"] = str(spec["threads"])
    started = time.perf_counter()
    cpu0 = time.process_time()
    from stage_stack import Arranger

    imported = time.perf_counter()
    arranger = Arranger.from_registry(dtype=fmt)
    t0, c0 = time.perf_counter(), time.process_time()
    song = arranger.arrange(["drums", "bass", "keys"], duration=spec["arrange_seconds"], seed=spec["seed"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    seconds = spec["arrange_seconds"]
    layers = [{"instrument": layer.instrument, "weight_format": layer.expert.weight_format,
               **layer.timings.model_dump()} for layer in song.manifest.layers]
    return {"format": fmt, "arrange_s": wall, "cpu_s": cpu, "import_s": imported - started,
            "song_seconds": seconds, "stem_seconds": 3 * seconds,
            "rtf_song": seconds / wall, "rtf_stems": 3 * seconds / wall,
            "load_s": sum(layer["load_s"] for layer in layers),
            "rtf_stems_without_load": 3 * seconds / (wall - sum(layer["load_s"] for layer in layers)),
            "layers": layers, "peak_rss_mb": (peak_rss_bytes() or 0) / MB, "process_cpu_s": time.process_time() - cpu0,
            "runtime": stage_machine.runtime_report(4_000_000), "threads_setting": spec.get("threads") or "auto",
            "load_average": load_average()}


# -- report -----------------------------------------------------------------------------------


def _find(rows, config, method):
    return next((r for r in rows if r["config"] == config and r["method"] == method), None)


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def summarize(rows: list[dict[str, Any]], bandwidth: dict[int, float], isolated: bool) -> tuple[list[dict], list[dict]]:
    """Bandwidth bound per row, ratios between rows and the issue's targets.

    `bandwidth`: copy bandwidth (bytes/s) per thread count; each row's bound uses its own thread
    count's (before 2026-12-07, stop 33, every row used the best of all, which for one-thread rows
    on a 2-core machine was the two-thread copy: `bound_share_best_bw` keeps that convention)."""
    best = max(bandwidth.values())
    for row in rows:
        bw = bandwidth.get(row.get("threads"), best)
        row["bandwidth_gb_per_s"] = bw / 1e9
        row["bound_steps_per_s"] = bw / row["weight_bytes_per_step"]
        row["bound_kv_steps_per_s"] = bw / (row["weight_bytes_per_step"] + row["kv_bytes_per_step"])
        rate = None if row.get("estimated") else row.get("decode_steps_per_s")
        row["bound_share"] = rate / row["bound_steps_per_s"] if rate else None
        row["bound_kv_share"] = rate / row["bound_kv_steps_per_s"] if rate else None
        row["bound_share_best_bw"] = rate * row["weight_bytes_per_step"] / best if rate else None
        row["weight_mb"] = row["weight_bytes"] / MB
        if row.get("peak_rss_bytes") and isolated:  # in one shared process the peaks are not per row
            limit = TARGET_RSS_FACTOR * row["weight_bytes"] + TARGET_RSS_EXTRA
            row["rss_limit_bytes"] = limit
            row["rss_ok"] = row["peak_rss_bytes"] <= limit
            row["peak_rss_mb"] = row["peak_rss_bytes"] / MB
            row["rss_limit_mb"] = limit / MB

    ratios, targets = [], []
    groups = sorted({(r["config"], r.get("thread_setting", "auto")) for r in rows},
                    key=lambda g: (CONFIGS.index(g[0]), g[1]))
    for config, threads in groups:
        group = [r for r in rows if r.get("thread_setting", "auto") == threads]
        fp32, bf16, int8, int4 = (_find(group, config, m) for m in OURS)
        bf16_hkv, int8_hkv, bf16_i8kv, int8_i8kv, fp32_hkv, fp32_i8kv = (_find(group, config, m) for m in OURS_FORCED_KV)
        int8_wo, int8_dyn, int8_nat = (_find(group, config, m) for m in OURS_INT8_KERNEL)
        fp32_tk, bf16_tk, int8_tk = (_find(group, config, m) for m in OURS_TORCH_KERNELS)
        bf16_uf, int8_uf = (_find(group, config, m) for m in OURS_UNFUSED)
        recompute, hf_gen, hf_loop = (_find(group, config, m) for m in ("full-recompute", "hf-generate", "hf-loop"))
        pairs = [
            ("ours fp32 / full-recompute", fp32, recompute, TARGET_OURS_VS_RECOMPUTE, "steps_per_s"),
            ("ours fp32 / hf-generate", fp32, hf_gen, TARGET_OURS_VS_HF_GENERATE, "steps_per_s"),
            ("ours fp32 / hf-generate", fp32, hf_gen, TARGET_OURS_VS_HF_GENERATE, "decode_steps_per_s"),
            ("ours fp32 / hf-loop", fp32, hf_loop, TARGET_OURS_VS_HF_GENERATE, "steps_per_s"),
            ("ours fp32 / hf-loop", fp32, hf_loop, TARGET_OURS_VS_HF_GENERATE, "decode_steps_per_s"),
            ("ours fp32 / hf-loop", fp32, hf_loop, None, "decode_steps_per_cpu_s"),
            ("ours bf16 / ours fp32", bf16, fp32, None, "decode_steps_per_s"),
            ("ours bf16 / ours fp32", bf16, fp32, None, "decode_steps_per_cpu_s"),
            ("ours int8 / ours bf16", int8, bf16, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours int8 / ours bf16", int8, bf16, TARGET_INT8_VS_BF16, "decode_steps_per_cpu_s"),
            ("ours int4 / ours bf16", int4, bf16, None, "decode_steps_per_s"),
            ("ours int8 / ours fp32", int8, fp32, None, "decode_steps_per_s"),
            ("ours bf16, bf16 KV / ours bf16", bf16_hkv, bf16, None, "decode_steps_per_s"),
            ("ours int8, bf16 KV / ours bf16, bf16 KV", int8_hkv, bf16_hkv, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours int8, int8 KV / ours int8", int8_i8kv, int8, None, "decode_steps_per_s"),
            ("ours int8, int8 KV / ours int8", int8_i8kv, int8, None, "decode_steps_per_cpu_s"),
            ("ours int8, int8 KV / ours bf16", int8_i8kv, bf16, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours bf16, int8 KV / ours bf16", bf16_i8kv, bf16, None, "decode_steps_per_s"),
            ("ours fp32, bf16 KV / ours fp32", fp32_hkv, fp32, None, "decode_steps_per_s"),
            ("ours fp32, int8 KV / ours fp32", fp32_i8kv, fp32, None, "decode_steps_per_s"),
            ("ours int8 dynamic / ours int8 weight-only", int8_dyn, int8_wo, None, "decode_steps_per_s"),
            ("ours int8 dynamic / ours int8 weight-only", int8_dyn, int8_wo, None, "decode_steps_per_cpu_s"),
            ("ours int8 weight-only / ours bf16", int8_wo, bf16, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours int8 dynamic / ours bf16", int8_dyn, bf16, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours fp32 / ours fp32 with torch's kernels", fp32, fp32_tk, None, "decode_steps_per_s"),
            ("ours bf16 / ours bf16 with torch's kernels", bf16, bf16_tk, None, "decode_steps_per_s"),
            ("ours bf16 / ours bf16 with torch's kernels", bf16, bf16_tk, None, "decode_steps_per_cpu_s"),
            ("ours int8 / ours int8 with torch's kernels", int8, int8_tk, None, "decode_steps_per_s"),
            ("ours int8 / ours int8 with torch's kernels", int8, int8_tk, None, "decode_steps_per_cpu_s"),
            ("ours int8 with torch's kernels / ours bf16 with torch's kernels", int8_tk, bf16_tk, TARGET_INT8_VS_BF16,
             "decode_steps_per_s"),
            ("ours int8 native / ours int8 dynamic", int8_nat, int8_dyn, None, "decode_steps_per_s"),
            ("ours int8 native / ours bf16", int8_nat, bf16, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours bf16 / ours bf16 unfused", bf16, bf16_uf, None, "decode_steps_per_s"),
            ("ours int8 / ours int8 unfused", int8, int8_uf, None, "decode_steps_per_s"),
            ("ours int8 unfused / ours bf16 unfused", int8_uf, bf16_uf, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
            ("ours int8 dynamic / ours bf16 unfused", int8_dyn, bf16_uf, TARGET_INT8_VS_BF16, "decode_steps_per_s"),
        ]
        for name, a, b, target, key in pairs:
            value = _ratio(a, b, key)
            if value is None:
                continue
            ratios.append({"config": config, "threads": threads, "ratio": name, "on": key, "value": value,
                           "target": target, "met": None if target is None else value >= target})
        if bf16 is not None and bf16.get("bound_share"):
            targets.append({"config": config, "threads": threads, "target": "bf16 decode share of the bandwidth bound",
                            "value": bf16["bound_share"], "limit": TARGET_BF16_SHARE,
                            "met": bf16["bound_share"] >= TARGET_BF16_SHARE})
        for r in (fp32, bf16, int8, int4, bf16_hkv, int8_hkv, bf16_i8kv, int8_i8kv, fp32_hkv, fp32_i8kv, int8_wo,
                  int8_dyn, int8_nat, fp32_tk, bf16_tk, int8_tk, bf16_uf, int8_uf):
            if r is not None and "rss_ok" in r:
                targets.append({"config": config, "threads": threads,
                                "target": f"{r['method']} peak RSS <= 1.2 x weights + 300 MB",
                                "value": r["peak_rss_mb"], "limit": r["rss_limit_mb"], "met": r["rss_ok"]})
    return ratios, targets


def stem_target(rows: list[dict], accuracy: dict | None) -> list[dict]:
    """A 10 s stem with prefill, best format whose top-1 agreement with fp32 is >= 95 %."""
    out = []
    formats = (accuracy or {}).get("formats", {})
    # a format's worst row: teacher forced (prefill GEMMs) and decoded step by step with each KV
    # cache (the decode product: for int8 the machine's int8_decode kernel)
    agree = {f: min(v["top1_agreement"] for g, v in formats.items() if g == f or g.startswith(f + "+"))
             for f in formats if "+" not in f}
    agree["fp32"] = 1.0  # the reference (its rows with a bf16 or int8 cache are options, not the default)
    for config, threads in sorted({(r["config"], r.get("thread_setting", "auto")) for r in rows}):
        cands = [r for r in rows if r["config"] == config and r.get("thread_setting", "auto") == threads
                 and r["method"] in OURS and r.get("stem_total_s_est") and agree.get(OURS[r["method"]], 0) >= 0.95]
        if cands:
            best = min(cands, key=lambda r: r["stem_total_s_est"])
            out.append({"config": config, "threads": threads, "target": "10 s stem total (prefill + 503 steps, "
                        "extrapolated), best format with top-1 >= 95 %", "format": OURS[best["method"]],
                        "value": best["stem_total_s_est"], "limit": TARGET_STEM_S,
                        "met": best["stem_total_s_est"] <= TARGET_STEM_S})
    return out


METHOD_NOTES = {
    "ours-fp32": "stage_stack.generation.generate(use_cache=True), float32. Step 1 is the prefill (C + 2 prefix "
                 "steps, CFG batch 2); the other steps feed one column.",
    "ours-bf16": "The same, model built directly in bfloat16 (KV cache dtype as stage_stack.machine chooses for this "
                 "CPU, see runtime.kernels); CFG mixing and sampling in float32.",
    "ours-int8": "int8 block linears (per output channel), bf16 embeddings and heads; built on the meta device and "
                 "quantized one matrix at a time, as load_expert does. The decode product is this machine's choice "
                 "(runtime.kernels.int8_decode): aten._weight_int8pack_mm with bf16 activations, fbgemm's "
                 "quantized.linear_dynamic with the activations quantized to 8 bits per call, or stage_stack.native's "
                 "with 8 bits per row (then each block of a decode step runs as two fused native calls).",
    "ours-int8-weightonly": "ours-int8 with the decode product forced to aten._weight_int8pack_mm (bf16 activations).",
    "ours-int8-dynamic": "ours-int8 with the decode product forced to fbgemm's quantized.linear_dynamic (whose "
                         "packed matrices the fused decode blocks cannot read: each block's own ops).",
    "ours-int8-native": "ours-int8 with the product forced to stage_stack.native's (8-bit rows, plain int8 matrix).",
    "ours-bf16-unfused": "ours-bf16 with each block's own ops in a decode step (StageLM.fused_decode = False) instead "
                         "of the two fused native calls per block (models.fused_step).",
    "ours-int8-unfused": "ours-int8 likewise.",
    "ours-fp32-torchkernels": "ours-fp32 with torch's kernels where this machine chose stage_stack.native's (one "
                              "query's attention over the int8 KV cache: two products after a float32 copy).",
    "ours-bf16-torchkernels": "ours-bf16 with torch's kernels where this machine chose stage_stack.native's (the bf16 "
                              "products of a decode step: F.linear; attention over the int8 KV cache: two products).",
    "ours-int8-torchkernels": "ours-int8 with torch's kernels where this machine chose stage_stack.native's (the bf16 "
                              "heads: F.linear; attention over the int8 KV cache: two products; the row scaling "
                              "around fbgemm's product: torch ops).",
    "ours-bf16-halfkv": "ours-bf16 with the KV cache in bf16 (generate(kv_dtype=torch.bfloat16)) whatever this "
                        "machine's choice.",
    "ours-int8-halfkv": "ours-int8 with the KV cache in bf16, likewise.",
    "ours-bf16-int8kv": "ours-bf16 with an int8 KV cache (generate(kv_dtype=torch.int8): int8 keys and values, one "
                        "float32 scale per row, head and step).",
    "ours-int8-int8kv": "ours-int8 with an int8 KV cache, likewise.",
    "ours-fp32-halfkv": "ours-fp32 with the KV cache in bf16, likewise.",
    "ours-fp32-int8kv": "ours-fp32 with an int8 KV cache, likewise.",
    "ours-int4": "Weight-only int4 block linears (groups of 128, aten._weight_int4pack_mm_for_cpu), otherwise as "
                 "ours-int8.",
    "full-recompute": "generate(use_cache=False): every step re-runs the whole prefix (the upstream way), same fp32 "
                      "model. ESTIMATED: a few steps are timed at the start, middle and end of the workload (reached "
                      "through generate(prompt=...), so the prefix has the real length) and the total is the sum over "
                      "all steps of a quadratic in prefix length through the region means.",
    "hf-generate/nocross": "MusicgenForCausalLM.generate(do_sample=True, top_k=250, guidance_scale=3): the batch is "
                           "doubled inside generate and ClassifierFreeGuidanceLogitsProcessor mixes the halves (they "
                           "are identical: the CausalLM has no unconditional input). In transformers 5.23 the first "
                           "step feeds only the last prompt token (prepare_inputs_for_generation slices input_ids[:, "
                           "-1:] as soon as a cache object exists), so it never runs the prefill and its cache grows "
                           "from 1 instead of C + 2: it does less work than the others (see forward_query_lengths).",
    "hf-generate/cross": "MusicgenForConditionalGeneration.generate(do_sample=True, top_k=250, guidance_scale=3) "
                         "with a tiny T5 text encoder and a tiny EnCodec around the same-size decoder; the "
                         "unconditional half gets a zeroed text memory. In transformers 5.23 the prefill runs twice "
                         "(once in generate's _prefill, again in _sample; see prefill_forwards). The final EnCodec "
                         "decode is not timed.",
    "hf-loop": "MusicgenForCausalLM.forward with an explicit EncoderDecoderCache, one step at a time after a "
               "prefill; CFG by batch doubling (unconditional row: PAD context masked out, zero text memory), "
               "the same sampler as ours. The forward computes the heads on all prefill positions.",
}


def previous_rows(path: Path, workload: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Successful rows of an earlier run of the same workload, by (config, method)."""
    import json

    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("workload") != workload:
        print(f"--resume: {path} holds another workload; running every row", file=sys.stderr)
        return {}
    return {(r["config"], r["method"]): r for r in earlier.get("rows", []) if "error" not in r}


ACCURACY_COLUMNS = [("model", "model"), ("format", "format"), ("max_logit_error", "max |logit err|"),
                    ("mean_logit_error", "mean |logit err|"), ("logit_range", "max |logit|"),
                    ("top1_agreement", "top-1 agree"), ("kl_guided_mean", "KL mean"), ("kl_guided_max", "KL max")]
ARRANGE_COLUMNS = [("format", "format"), ("thread_setting", "threads"), ("arrange_s", "arrange s"), ("load_s", "load s"),
                   ("rtf_stems", "x real time (stems)"), ("rtf_song", "x real time (song)"),
                   ("rtf_stems_without_load", "x rt (stems, no load)"), ("peak_rss_mb", "peak RSS MB"),
                   ("load_average", "load avg")]
COLUMNS = [
    ("config", "config"), ("method", "method"), ("thread_setting", "threads"), ("dtype", "dtype"), ("steps", "steps"),
    ("prefill_s", "prefill s"), ("decode_steps_per_s", "decode steps/s"), ("total_s", "total s"),
    ("steps_per_s", "steps/s (total)"), ("decode_steps_per_cpu_s", "decode steps/cpu-s"),
    ("bandwidth_gb_per_s", "copy GB/s"), ("bound_steps_per_s", "bw bound steps/s"), ("bound_share", "share"),
    ("bound_kv_share", "share (w+KV)"), ("weight_mb", "weights MB"), ("peak_rss_mb", "peak RSS MB"),
    ("rss_limit_mb", "RSS limit MB"), ("stem_total_s_est", "10 s stem s (est.)"), ("note", "note"),
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, measure):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="decoding steps to run per row, prefill included (default: all, gen frames + n_q - 1)")
    parser.add_argument("--context-seconds", type=float, default=None, help="context length (default 10, quick 1)")
    parser.add_argument("--gen-seconds", type=float, default=None, help="generated length (default 10, quick 1)")
    parser.add_argument("--frame-rate", type=float, default=50.0, help="codec frames per second (MusicGen: 50)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}, or none")
    parser.add_argument("--quick", action="store_true", help="tiny model and 1 s + 1 s: a smoke run in seconds")
    parser.add_argument("--text-tokens", type=int, default=16, help="text memory length with cross-attention")
    parser.add_argument("--recompute-samples", type=int, default=2, help="timed steps per region for full-recompute")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per row (default: torch's; 1 with --quick, which is steadier on a busy "
                             "machine: OpenMP threads spin-wait on each other when the cores are shared)")
    parser.add_argument("--thread-counts", default=None,
                        help="comma list of thread settings to run every row at, side by side: 'auto' (what "
                             "stage_stack.machine chooses, STAGE_STACK_THREADS unset) and/or counts, e.g. auto,1. "
                             "Overrides --threads")
    parser.add_argument("--all-rows-every-thread-count", action="store_true",
                        help="also run the reference rows (transformers, full recompute) at every --thread-counts "
                             "setting (default: the first only)")
    parser.add_argument("--accuracy-steps", type=int, default=None,
                        help="teacher-forced steps of the format-accuracy table (default 48, quick 8; 0 = skip)")
    parser.add_argument("--arrange-formats", default=None,
                        help="weight formats for the demo-expert Arranger rows (default fp32,int8; 'auto' = the "
                             "Arranger's default; 'none' = skip; not with --quick)")
    parser.add_argument("--arrange-seconds", type=float, default=10.0, help="song length of the Arranger rows")
    parser.add_argument("--bandwidth-mb", type=int, default=None, help="copy buffer size (default 512, quick 64)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one Python process per row for clean peak RSS (default: on, off with --quick)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an earlier run in --output that used the same workload and "
                             "succeeded; run only the others (the JSON is rewritten after every row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON path (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    # "--methods none": no MusicGen-size row, e.g. only the Arranger rows (--arrange-formats)
    no_methods = args.methods.strip() == "none"
    methods = [] if no_methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, given, known, or_none in (("--configs", configs, CONFIGS, False),
                                        ("--methods", methods, METHODS, True)):
        unknown = sorted(set(given) - set(known))
        if unknown or not (given or or_none and no_methods):
            parser.error(f"{name}: unknown or empty {unknown or given}; choose from {', '.join(known)}"
                         + (" (or none)" if or_none else ""))
    context_s = args.context_seconds if args.context_seconds is not None else (1.0 if args.quick else 10.0)
    gen_s = args.gen_seconds if args.gen_seconds is not None else (1.0 if args.quick else 10.0)
    context_frames, gen_frames = round(context_s * args.frame_rate), round(gen_s * args.frame_rate)
    if context_frames < 1 or gen_frames < 1:
        parser.error("--context-seconds and --gen-seconds must give at least one frame each")
    n_q = StageLMConfig().n_q
    full_steps = gen_frames + n_q - 1
    steps = full_steps if args.steps is None else args.steps
    if not 2 <= steps <= full_steps:
        parser.error(f"--steps must be between 2 and {full_steps} (the steps of {gen_frames} generated frames)")
    isolate = (not args.quick) if args.isolate is None else args.isolate
    if args.threads is None and args.quick:
        args.threads = 1
    if args.thread_counts:
        thread_settings = [t.strip() for t in args.thread_counts.split(",") if t.strip()]
        bad = [t for t in thread_settings if t != "auto" and not t.isdigit()]
        if bad or not thread_settings:
            parser.error(f"--thread-counts: expected 'auto' or thread counts, got {bad or args.thread_counts!r}")
    else:
        thread_settings = [str(args.threads) if args.threads else "auto"]
    if args.threads:
        torch.set_num_threads(args.threads)
    accuracy_steps = args.accuracy_steps if args.accuracy_steps is not None else (8 if args.quick else 48)
    arrange_formats = [] if args.quick else [
        f.strip() for f in (args.arrange_formats or "fp32,int8").split(",") if f.strip() and f.strip() != "none"]

    machine = {**machine_info(), "runtime": stage_machine.runtime_report(400_000_000)}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"AMX-BF16 {machine['amx_bf16']}, AVX512-BF16 {machine['avx512_bf16']}, "
          f"load {machine['load_average_1_5_15min']}", file=sys.stderr)
    bandwidth_mb = args.bandwidth_mb or (64 if args.quick else 512)
    # the copy at each thread count the rows run with ("auto": what generate() chooses at this size)
    bw_threads = sorted({int(t) if t != "auto" else stage_machine.choose_threads(400_000_000) for t in thread_settings})
    bw_before = bandwidth_by_threads(bandwidth_mb, bw_threads)
    print("copy bandwidth: " + ", ".join(f"{b['best_gb_per_s']:.1f} GB/s ({t} threads)" for t, b in bw_before.items()),
          file=sys.stderr)

    workload = {"context_frames": context_frames, "gen_frames": gen_frames, "steps": steps,
                "prefix_steps": context_frames + 2, "cfg_batch": 2, "samples": 1, "quick": args.quick,
                "text_tokens": args.text_tokens, "threads": args.threads, "isolated_processes": isolate,
                "timing": "prefill_s = wall time to the first sampled step (the prefill forward); decode_s = "
                          "the remaining steps; steps_per_s = steps / (prefill_s + decode_s)"}
    payload = {"benchmark": "generation_speed", "argv": argv, "machine": machine, "workload": workload,
               "bandwidth": {"before": bw_before}, "rows": [], "method_notes": METHOD_NOTES}
    earlier = previous_rows(args.output, workload) if args.resume else {}

    rows = payload["rows"]
    # The transformers and full-recompute rows are the references: at the first thread setting only
    # (they are the slowest rows; the ratios are within one thread setting).
    reference = ("full-recompute", "hf-generate", "hf-loop")
    jobs = [(config, method, threads) for threads in thread_settings for config in configs for method in methods
            if method not in reference or threads == thread_settings[0] or args.all_rows_every_thread_count]
    jobs += [("demo", f"arrange-{fmt}", threads) for threads in thread_settings for fmt in arrange_formats]
    for config, method, threads in jobs:
        spec_threads = None if threads == "auto" else int(threads)
        key_row = (config, method) if len(thread_settings) == 1 else (config, f"{method}@{threads}")
        if key_row in earlier:
            rows.append(earlier[key_row])
            print(f"[{config}/{method}] kept from {args.output}", file=sys.stderr)
            continue
        spec = dict(asdict(Workload(
            quick=args.quick, cross=config == "cross", context_frames=context_frames, gen_frames=gen_frames,
            steps=steps, text_tokens=args.text_tokens, recompute_samples=args.recompute_samples,
            threads=spec_threads, seed=args.seed)), method=method, arrange_seconds=args.arrange_seconds)
        print(f"[{config}/{method}/threads {threads}] running ({'own process' if isolate else 'in process'})...", file=sys.stderr)
        started = time.perf_counter()
        try:
            row = run_isolated(__file__, spec) if isolate else measure(dict(spec))
        except Exception as exc:  # one broken row must not throw away the others (runs take long)
            if not isolate:
                raise
            rows.append({"config": config, "method": method, "thread_setting": threads, "error": str(exc)})
            print(f"[{config}/{method}] FAILED: {exc}", file=sys.stderr)
            write_json(args.output, payload)
            continue
        row["wall_s"] = time.perf_counter() - started
        row["thread_setting"] = threads
        if method.startswith("arrange-"):
            row.update(config=config, method=method)
            payload.setdefault("arrange", []).append(row)
            write_json(args.output, payload)
            print(f"[demo/{method}/threads {threads}] {row['rtf_stems']:.2f}x real time (stems), "
                  f"{row['rtf_song']:.2f}x (song), {row['wall_s']:.0f} s", file=sys.stderr)
            continue
        key = f"{method}/{config}" if f"{method}/{config}" in METHOD_NOTES else method
        row["note"] = {"full-recompute": "estimated", "hf-generate": "no prefill (bug)" if config == "nocross"
                       else "prefill x2 (bug)"}.get(method, "")
        row["method_note"] = METHOD_NOTES[key]
        rows.append(row)
        write_json(args.output, payload)  # progress survives an interrupted run (see --resume)
        print(f"[{config}/{method}] {row['steps_per_s']:.3g} steps/s total, "
              f"{row['decode_steps_per_s'] or float('nan'):.3g} decode steps/s ({row['wall_s']:.0f} s)",
              file=sys.stderr)

    accuracy = None
    if accuracy_steps:
        spec = dict(asdict(Workload(
            quick=args.quick, cross=False, context_frames=context_frames, gen_frames=gen_frames, steps=steps,
            text_tokens=args.text_tokens, recompute_samples=args.recompute_samples, threads=None, seed=args.seed)),
            method="accuracy", accuracy_steps=accuracy_steps)
        print(f"[accuracy] {accuracy_steps} teacher-forced steps per format...", file=sys.stderr)
        try:
            accuracy = run_isolated(__file__, spec) if isolate else measure(dict(spec))
        except Exception as exc:
            if not isolate:
                raise
            accuracy = {"error": str(exc)}
        payload["accuracy"] = accuracy

    bw_after = bandwidth_by_threads(bandwidth_mb, bw_threads)
    bandwidth = {t: max(bw_before[t]["best_gb_per_s"], bw_after[t]["best_gb_per_s"]) * 1e9 for t in bw_threads}
    measured = [r for r in rows if "error" not in r]
    ratios, targets = summarize(measured, bandwidth, isolate)
    targets += stem_target(measured, accuracy if accuracy and "error" not in accuracy else None)
    for row in payload.get("arrange", []):
        targets.append({"config": "demo", "threads": row["thread_setting"],
                        "target": f"demo experts, 3 layers x {row['song_seconds']:g} s through Arranger "
                                  f"({row['format']}), stem-seconds per wall second",
                        "value": row["rtf_stems"], "limit": TARGET_DEMO_RTF, "met": row["rtf_stems"] >= TARGET_DEMO_RTF})

    print()
    print(f"Generation speed: {context_frames} context frames, {gen_frames} generated, {steps} steps "
          f"(step 1 = prefill of {context_frames + 2} steps), CFG batch 2, one sample, "
          f"{'tiny model (--quick)' if args.quick else 'MusicGen-small size, random weights'}")
    print(format_table(measured, COLUMNS))
    if accuracy and "error" not in accuracy:
        acc_rows = [{"model": "this size (random)", "format": f, **v} for f, v in accuracy["formats"].items()]
        for name, per in accuracy.get("demo", {}).items():
            acc_rows += [{"model": f"demo {name}", "format": f, **v} for f, v in per.items() if isinstance(v, dict)]
        print(f"\nAccuracy against fp32, teacher forced over {accuracy['steps']} steps (guided logits, CFG {CFG_COEF}):")
        print(format_table(acc_rows, ACCURACY_COLUMNS))
    if payload.get("arrange"):
        print("\nDemo experts through Arranger (fresh process per row; load includes the first imports of the codec):")
        print(format_table(payload["arrange"], ARRANGE_COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"  [{r['config']}/{r['method']}] failed: {r['error']}")
    print()
    print("bw bound = copy bandwidth at the row's thread count ("
          + ", ".join(f"{b / 1e9:.1f} GB/s with {t}" for t, b in bandwidth.items())
          + "; best of before/after, read+write) / weight bytes read per decode step; share = decode steps/s / "
          "bound; (w+KV) also counts the KV cache read per step.")
    if args.quick:
        print("  (tiny model: the issue's targets are for the full size, so no verdicts here)")
    for r in ratios:
        verdict = ""
        if r["target"] is not None and not args.quick:
            verdict = f"  target >= {r['target']}: {'met' if r['met'] else 'NOT met'}"
        print(f"  [{r['config']}, threads {r['threads']}] {r['ratio']} ({r['on']}): {r['value']:.2f}x{verdict}")
    for t in targets:
        print(f"  [{t['config']}, threads {t['threads']}] {t['target']}{' (' + t['format'] + ')' if 'format' in t else ''}: "
              f"{t['value']:.3g} vs {t['limit']:.3g}: {'met' if t['met'] else 'NOT met'}")
    if not machine["amx_bf16"]:
        print("  note: the issue's targets assume AMX-BF16; this CPU has none "
              f"(AVX512-BF16: {machine['avx512_bf16']}).")
    print("\nmethods:")
    for key, note in METHOD_NOTES.items():
        if key.split("/")[0] in methods:
            print(f"  {key}: {note}")

    payload.update({
        "load_average_end": load_average(),
        "bandwidth": {"before": bw_before, "after": bw_after,
                      "used_gb_per_s_by_threads": {t: b / 1e9 for t, b in bandwidth.items()}},
        "ratios": ratios,
        "targets": targets,
    })
    path = write_json(args.output, payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
