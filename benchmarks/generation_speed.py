"""Generation speed of the STAGE LM: ours (fp32, bf16) vs full recompute vs transformers' MusicGen.

Setup (issue 2, point 9): MusicGen-small size (StageLMConfig() defaults: dim 1024, 24 layers,
16 heads, card 2048, n_q 4) with random weights, with and without cross-attention; a 10 s context
(500 frames at 50 Hz) and 10 s generated (500 frames = 503 decoding steps with the delay
pattern); classifier-free guidance (batch of 2); one sample.

Rows (each in its own Python process by default, so its peak RSS is its own):
  ours-fp32       stage_stack.generation.generate(use_cache=True), float32
  ours-bf16       the same model built in bfloat16 (weights and KV cache)
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
"""

from __future__ import annotations

import argparse
import math
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

from stage_stack.generation import SamplingParams, generate, sample_next  # noqa: E402
from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights  # noqa: E402

METHODS = ("ours-fp32", "ours-bf16", "full-recompute", "hf-generate", "hf-loop")
CONFIGS = ("nocross", "cross")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "generation_speed.json"
CFG_COEF = 3.0
TOP_K = 250

# Issue 2 targets (stated for a CPU with AMX-BF16).
TARGET_OURS_VS_RECOMPUTE = 10.0
TARGET_OURS_VS_HF_GENERATE = 1.3
TARGET_BF16_VS_FP32 = 1.8
TARGET_RSS_FACTOR, TARGET_RSS_EXTRA = 1.2, 300 * MB


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


def build_ours(work: Workload, dtype: torch.dtype) -> StageLM:
    # Built directly in `dtype` (not fp32 then cast) so the process never holds two copies and
    # its peak RSS is what loading an expert in that dtype costs.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        lm = StageLM(work.lm_config)
    finally:
        torch.set_default_dtype(previous)
    return init_weights(lm, seed=work.seed).eval()


def run_ours(lm: StageLM, work: Workload, context: torch.Tensor, *, use_cache: bool = True,
             prompt: torch.Tensor | None = None, stop_after: int | None = None) -> StepClock:
    memory = text_memory(work, lm.config.dim)
    clock = StepClock(stop_after=stop_after if stop_after is not None else work.steps)
    try:
        generate(lm, context, work.gen_frames, text_memory=memory, prompt=prompt, seed=work.seed,
                 callback=clock.tick, use_cache=use_cache)
    except _StopGeneration:
        pass
    return clock


def warm_up_ours(lm: StageLM, work: Workload, use_cache: bool = True) -> None:
    """A few short steps so one-time kernel set-up is not charged to the timed run."""
    short = Workload(**{**asdict(work), "context_frames": 8, "gen_frames": 2, "steps": 4})
    run_ours(lm, short, context_codes(short), use_cache=use_cache)


def ours_step_bytes(lm: StageLM) -> int:
    """Weight bytes one decoding step reads: every matrix on the per-step path, plus one
    embedding row per codebook. Cross-attention k/v and text_proj run once per call, not per step."""
    skipped = ("embeddings.", "text_proj.")
    total = sum(p.numel() * p.element_size() for name, p in lm.named_parameters()
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


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model for one (config, method), warm up, time the workload, report memory."""
    method = spec.pop("method")
    work = Workload(**spec)
    if work.threads:
        torch.set_num_threads(work.threads)
    torch.manual_seed(work.seed)
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    cfg = work.lm_config
    row: dict[str, Any] = {"config": "cross" if work.cross else "nocross", "method": method}
    B = 2  # CFG rows
    kv_rows_len = work.prefix_steps + (work.steps - 1) / 2 + 0.5  # mean cache length over decode steps
    extra_kv = work.text_tokens if work.cross else 0

    with torch.no_grad():
        if method in ("ours-fp32", "ours-bf16", "full-recompute"):
            dtype = torch.bfloat16 if method == "ours-bf16" else torch.float32
            model = build_ours(work, dtype)
            row["build_s"] = time.perf_counter() - t0
            weights = list(model.parameters())
            step_bytes = ours_step_bytes(model)
            kv_dtype = model.new_cache(1, 1).keys[0].dtype  # may differ from the weights'
            warm_up_ours(model, work, use_cache=method != "full-recompute")
            peak_build = peak_rss_bytes()
            reset_peak_rss()
            load_before = load_average()
            context = context_codes(work)
            if method == "full-recompute":
                timing = time_full_recompute(model, work, context)
            else:
                timing = run_ours(model, work, context).timing()
        elif method in ("hf-generate", "hf-loop"):
            dtype = torch.float32
            model = build_hf(work, conditional=method == "hf-generate" and work.cross)
            row["build_s"] = time.perf_counter() - t0
            weights = list(model.parameters())
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
                timing = run_hf_loop(model, work).timing()
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

    peak_run = peak_rss_bytes()
    element = torch.tensor([], dtype=kv_dtype).element_size()
    kv_bytes = 2 * cfg.n_layers * B * (kv_rows_len + extra_kv) * cfg.dim * element
    row.update(timing)
    row.update({
        "dtype": str(dtype).removeprefix("torch."),
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "weight_bytes": tensor_bytes(weights),
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


# -- report -----------------------------------------------------------------------------------


def _find(rows, config, method):
    return next((r for r in rows if r["config"] == config and r["method"] == method), None)


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def summarize(rows: list[dict[str, Any]], bandwidth: float, isolated: bool) -> tuple[list[dict], list[dict]]:
    """Bandwidth bound per row, ratios between rows and the issue's targets."""
    for row in rows:
        row["bound_steps_per_s"] = bandwidth / row["weight_bytes_per_step"]
        row["bound_kv_steps_per_s"] = bandwidth / (row["weight_bytes_per_step"] + row["kv_bytes_per_step"])
        rate = None if row.get("estimated") else row.get("decode_steps_per_s")
        row["bound_share"] = rate / row["bound_steps_per_s"] if rate else None
        row["bound_kv_share"] = rate / row["bound_kv_steps_per_s"] if rate else None
        row["weight_mb"] = row["weight_bytes"] / MB
        if row.get("peak_rss_bytes") and isolated:  # in one shared process the peaks are not per row
            limit = TARGET_RSS_FACTOR * row["weight_bytes"] + TARGET_RSS_EXTRA
            row["rss_limit_bytes"] = limit
            row["rss_ok"] = row["peak_rss_bytes"] <= limit
            row["peak_rss_mb"] = row["peak_rss_bytes"] / MB
            row["rss_limit_mb"] = limit / MB

    ratios, targets = [], []
    for config in sorted({r["config"] for r in rows}, key=CONFIGS.index):
        fp32, bf16 = _find(rows, config, "ours-fp32"), _find(rows, config, "ours-bf16")
        recompute, hf_gen, hf_loop = (_find(rows, config, m) for m in ("full-recompute", "hf-generate", "hf-loop"))
        pairs = [
            ("ours fp32 / full-recompute", fp32, recompute, TARGET_OURS_VS_RECOMPUTE, "steps_per_s"),
            ("ours fp32 / hf-generate", fp32, hf_gen, TARGET_OURS_VS_HF_GENERATE, "steps_per_s"),
            ("ours fp32 / hf-generate", fp32, hf_gen, TARGET_OURS_VS_HF_GENERATE, "decode_steps_per_s"),
            ("ours fp32 / hf-loop", fp32, hf_loop, None, "steps_per_s"),
            ("ours fp32 / hf-loop", fp32, hf_loop, None, "decode_steps_per_s"),
            ("ours bf16 / ours fp32", bf16, fp32, TARGET_BF16_VS_FP32, "steps_per_s"),
            ("ours bf16 / ours fp32", bf16, fp32, TARGET_BF16_VS_FP32, "decode_steps_per_s"),
            ("ours bf16 / full-recompute", bf16, recompute, None, "steps_per_s"),
        ]
        for name, a, b, target, key in pairs:
            value = _ratio(a, b, key)
            if value is None:
                continue
            entry = {"config": config, "ratio": name, "on": key, "value": value, "target": target,
                     "met": None if target is None else value >= target}
            ratios.append(entry)
        for r in (fp32, bf16):
            if r is not None and "rss_ok" in r:
                targets.append({"config": config, "target": f"{r['method']} peak RSS <= 1.2 x weights + 300 MB",
                                "value_mb": r["peak_rss_mb"], "limit_mb": r["rss_limit_mb"], "met": r["rss_ok"]})
    return ratios, targets


METHOD_NOTES = {
    "ours-fp32": "stage_stack.generation.generate(use_cache=True), float32. Step 1 is the prefill (C + 2 prefix "
                 "steps, CFG batch 2); the other steps feed one column.",
    "ours-bf16": "The same, model built directly in bfloat16 (weights and KV cache); sampling in float32.",
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


COLUMNS = [
    ("config", "config"), ("method", "method"), ("dtype", "dtype"), ("steps", "steps"),
    ("prefill_s", "prefill s"), ("decode_steps_per_s", "decode steps/s"), ("total_s", "total s"),
    ("steps_per_s", "steps/s (total)"), ("decode_steps_per_cpu_s", "decode steps/cpu-s"),
    ("bound_steps_per_s", "bw bound steps/s"), ("bound_share", "share"),
    ("bound_kv_share", "share (w+KV)"), ("weight_mb", "weights MB"), ("peak_rss_mb", "peak RSS MB"),
    ("rss_limit_mb", "RSS limit MB"), ("note", "note"),
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
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    parser.add_argument("--quick", action="store_true", help="tiny model and 1 s + 1 s: a smoke run in seconds")
    parser.add_argument("--text-tokens", type=int, default=16, help="text memory length with cross-attention")
    parser.add_argument("--recompute-samples", type=int, default=2, help="timed steps per region for full-recompute")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per row (default: torch's; 1 with --quick, which is steadier on a busy "
                             "machine: OpenMP threads spin-wait on each other when the cores are shared)")
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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, given, known in (("--configs", configs, CONFIGS), ("--methods", methods, METHODS)):
        unknown = sorted(set(given) - set(known))
        if unknown or not given:
            parser.error(f"{name}: unknown or empty {unknown or given}; choose from {', '.join(known)}")
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
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"AMX-BF16 {machine['amx_bf16']}, AVX512-BF16 {machine['avx512_bf16']}, "
          f"load {machine['load_average_1_5_15min']}", file=sys.stderr)
    bandwidth_mb = args.bandwidth_mb or (64 if args.quick else 512)
    bw_before = copy_bandwidth(bandwidth_mb)
    print(f"copy bandwidth: {bw_before['best_gb_per_s']:.1f} GB/s", file=sys.stderr)

    workload = {"context_frames": context_frames, "gen_frames": gen_frames, "steps": steps,
                "prefix_steps": context_frames + 2, "cfg_batch": 2, "samples": 1, "quick": args.quick,
                "text_tokens": args.text_tokens, "threads": args.threads, "isolated_processes": isolate,
                "timing": "prefill_s = wall time to the first sampled step (the prefill forward); decode_s = "
                          "the remaining steps; steps_per_s = steps / (prefill_s + decode_s)"}
    payload = {"benchmark": "generation_speed", "argv": argv, "machine": machine, "workload": workload,
               "bandwidth": {"before": bw_before}, "rows": [], "method_notes": METHOD_NOTES}
    earlier = previous_rows(args.output, workload) if args.resume else {}

    rows = payload["rows"]
    for config in configs:
        for method in methods:
            if (config, method) in earlier:
                rows.append(earlier[(config, method)])
                print(f"[{config}/{method}] kept from {args.output}", file=sys.stderr)
                continue
            spec = dict(asdict(Workload(
                quick=args.quick, cross=config == "cross", context_frames=context_frames, gen_frames=gen_frames,
                steps=steps, text_tokens=args.text_tokens, recompute_samples=args.recompute_samples,
                threads=args.threads, seed=args.seed)), method=method)
            print(f"[{config}/{method}] running ({'own process' if isolate else 'in process'})...", file=sys.stderr)
            started = time.perf_counter()
            try:
                row = run_isolated(__file__, spec) if isolate else measure(dict(spec))
            except Exception as exc:  # one broken row must not throw away the others (runs take long)
                if not isolate:
                    raise
                rows.append({"config": config, "method": method, "error": str(exc)})
                print(f"[{config}/{method}] FAILED: {exc}", file=sys.stderr)
                write_json(args.output, payload)
                continue
            row["wall_s"] = time.perf_counter() - started
            key = f"{method}/{config}" if f"{method}/{config}" in METHOD_NOTES else method
            row["note"] = {"full-recompute": "estimated", "hf-generate": "no prefill (bug)" if config == "nocross"
                           else "prefill x2 (bug)"}.get(method, "")
            row["method_note"] = METHOD_NOTES[key]
            rows.append(row)
            write_json(args.output, payload)  # progress survives an interrupted run (see --resume)
            print(f"[{config}/{method}] {row['steps_per_s']:.3g} steps/s total, "
                  f"{row['decode_steps_per_s'] or float('nan'):.3g} decode steps/s ({row['wall_s']:.0f} s)",
                  file=sys.stderr)

    bw_after = copy_bandwidth(bandwidth_mb)
    bandwidth = max(bw_before["best_gb_per_s"], bw_after["best_gb_per_s"]) * 1e9
    measured = [r for r in rows if "error" not in r]
    ratios, targets = summarize(measured, bandwidth, isolate)

    print()
    print(f"Generation speed: {context_frames} context frames, {gen_frames} generated, {steps} steps "
          f"(step 1 = prefill of {context_frames + 2} steps), CFG batch 2, one sample, "
          f"{'tiny model (--quick)' if args.quick else 'MusicGen-small size, random weights'}")
    print(format_table(measured, COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"  [{r['config']}/{r['method']}] failed: {r['error']}")
    print()
    print(f"bw bound = copy bandwidth {bandwidth / 1e9:.1f} GB/s (best of before/after, read+write) / weight bytes "
          "read per decode step; share = decode steps/s / bound; (w+KV) also counts the KV cache read per step.")
    if args.quick:
        print("  (tiny model: the issue's targets are for the full size, so no verdicts here)")
    for r in ratios:
        verdict = ""
        if r["target"] is not None and not args.quick:
            verdict = f"  target >= {r['target']}: {'met' if r['met'] else 'NOT met'}"
        print(f"  [{r['config']}] {r['ratio']} ({r['on']}): {r['value']:.2f}x{verdict}")
    for t in targets:
        print(f"  [{t['config']}] {t['target']}: {t['value_mb']:.0f} MB vs {t['limit_mb']:.0f} MB: "
              f"{'met' if t['met'] else 'NOT met'}")
    if not machine["amx_bf16"]:
        print("  note: the issue's targets assume AMX-BF16; this CPU has none "
              f"(AVX512-BF16: {machine['avx512_bf16']}).")
    print("\nmethods:")
    for key, note in METHOD_NOTES.items():
        if key.split("/")[0] in methods:
            print(f"  {key}: {note}")

    payload.update({
        "load_average_end": load_average(),
        "bandwidth": {"before": bw_before, "after": bw_after, "used_gb_per_s": bandwidth / 1e9},
        "ratios": ratios,
        "targets": targets,
    })
    path = write_json(args.output, payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
