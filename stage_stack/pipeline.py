"""One layer, audio to audio: context audio -> codec tokens -> expert -> stem audio.

    context [samples] at `sample_rate`
      --resample--> the expert's rate
      --per window: codec.encode(time-aligned slice)--> context codes
      --generate(lm, context codes, prompt = the stem's previous tokens)--> stem codes
      --codec.decode--> window audio --crossfade (longform.stitch)--> stem [candidates, samples]

The result is at the expert's sample rate; the Arranger resamples it to the song's rate.
Timings of each stage are kept so the per-layer overhead (everything but generation) can be
measured (benchmarks/arrange_overhead.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from .audio import resample
from .chord_recognition import recognize_chords
from .expert import Expert
from .generation import SamplingParams, generate, generation_steps
from .layout import UNFILLED, audio_codes, with_chord_row
from .longform import WindowPlan, expert_window_seconds, plan_windows, stitch
from .machine import decode_threads
from .models.quant import weight_count

ProgressCallback = Callable[[int, int], None]  # (steps done, steps total) over all windows


@dataclass
class StageTimings:
    """Seconds spent in each stage of one layer."""

    resample_s: float = 0.0
    encode_s: float = 0.0
    generate_s: float = 0.0
    decode_s: float = 0.0
    stitch_s: float = 0.0
    chords_s: float = 0.0  # hearing the context's chords (chords="heard")

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


@dataclass
class StemResult:
    audio: np.ndarray  # [candidates, samples] at the expert's rate
    plan: WindowPlan
    codes: torch.Tensor  # [candidates, streams, frames], the whole stem's tokens (a chord stream's first)
    timings: StageTimings = field(default_factory=StageTimings)


def window_plan_for(expert: Expert, duration: float, overlap_seconds: float | None = None,
                    crossfade_seconds: float | None = None) -> WindowPlan:
    """The window plan of `duration` seconds for this expert's training window."""
    context_s, target_s = expert_window_seconds(expert.metadata.training)
    return plan_windows(duration, expert.sample_rate, expert.codec.config.hop_length, context_s, target_s,
                        overlap_seconds, crossfade_seconds)


def text_memory_for(expert: Expert, prompt_text: str | None, explicit: bool = True):
    """Projected text conditioning for one row, or None (null condition).

    An expert without a text encoder ignores the prompt; the user is warned when they gave it.
    """
    if not prompt_text:
        return None
    if expert.text is None:
        if explicit:
            warnings.warn(f"the {expert.instrument!r} expert has no text encoder: prompt {prompt_text!r} is ignored",
                          stacklevel=3)
        return None
    from .models.text import conditioning_for

    return conditioning_for(expert, [prompt_text])


def _encode(expert: Expert, audio: np.ndarray) -> torch.Tensor:
    """[samples] -> the LM's context codes [1, streams, frames] (a chord stream's row PAD); fewer
    samples than one frame give an empty context."""
    config = expert.lm.config
    encoder = expert.context_encoder
    if audio.shape[-1] < encoder.config.hop_length:
        return torch.zeros(1, config.streams, 0, dtype=torch.long, device=expert.device)
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None].to(expert.device)
    return with_chord_row(encoder.encode(wave), config)


def render_stem(
    expert: Expert,
    context_audio: np.ndarray | None,
    sample_rate: int,
    duration: float,
    **kwargs,
) -> StemResult:
    """Generate `candidates` stems of `duration` seconds conditioned on `context_audio` (see `_render_stem`).

    Encoding, generation and decoding all run with the thread count stage_stack.machine chooses
    for this expert (one thread for a small one: more threads on busy cores spin-wait).
    """
    size = weight_count(expert.lm) + sum(p.numel() for p in expert.codec.parameters())
    if expert.context_codec is not None:
        size += sum(p.numel() for p in expert.context_codec.parameters())
    with decode_threads(size, expert.device):
        return _render_stem(expert, context_audio, sample_rate, duration, **kwargs)


def _render_stem(
    expert: Expert,
    context_audio: np.ndarray | None,
    sample_rate: int,
    duration: float,
    *,
    prompt_text: str | None = None,
    prompt_is_default: bool = False,
    candidates: int = 1,
    params: SamplingParams = SamplingParams(),
    seed: int = 0,
    callback: ProgressCallback | None = None,
    plan: WindowPlan | None = None,
    chords: np.ndarray | Literal["heard"] | None = None,
) -> StemResult:
    """Generate `candidates` stems of `duration` seconds conditioned on `context_audio` (see module doc).

    `context_audio` None means no context at all (an empty prefix). All windows draw from one
    generator seeded with `seed`, so the result is a function of the inputs alone. `chords`
    (an expert with a chord stream): one chord class per frame of the plan (stage_stack.chords;
    UNFILLED where the expert names its own), given to the chord stream instead of drawn by it,
    or "heard": those `recognize_chords` hears in the context.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    timings = StageTimings()
    plan = plan or window_plan_for(expert, duration)
    if plan.sample_rate != expert.sample_rate or plan.hop_length != expert.codec.config.hop_length:
        raise ValueError("the window plan was made for another codec (sample rate / hop length differ)")
    hop = plan.hop_length

    context = None
    if context_audio is not None:
        start = time.perf_counter()
        context = resample(np.asarray(context_audio, dtype=np.float32), sample_rate, expert.sample_rate)
        timings.resample_s += time.perf_counter() - start
    if isinstance(chords, str):
        if chords != "heard":
            raise ValueError(f"chords must be 'heard', an array of chord classes or None, got {chords!r}")
        if context is None:
            raise ValueError("chords='heard' needs a context to hear them in")
        start = time.perf_counter()
        chords = recognize_chords(context, expert.sample_rate, hop, plan.total_frames)
        timings.chords_s += time.perf_counter() - start
    given_chords = _chord_row(expert, chords, plan.total_frames, candidates)

    text = text_memory_for(expert, prompt_text, explicit=not prompt_is_default)
    device = expert.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    streams = expert.lm.config.streams
    codes = torch.zeros(candidates, streams, plan.total_frames, dtype=torch.long, device=device)
    total_steps = sum(generation_steps(w.n_frames, streams) - w.prompt_frames for w in plan.windows)
    steps_before = 0
    pieces: list[np.ndarray] = []

    for window in plan.windows:
        start = time.perf_counter()
        if context is None:
            context_codes = torch.zeros(1, streams, 0, dtype=torch.long, device=device)
        else:
            context_codes = _encode(expert, context[window.context_start_frame * hop: window.context_end_frame * hop])
        timings.encode_s += time.perf_counter() - start

        if window.prompt_frames:
            # Each candidate continues its own tokens: one row per candidate, prompt per row.
            prompt = codes[:, :, window.start_frame: window.start_frame + window.prompt_frames]
            rows_context, num_samples = context_codes.expand(candidates, -1, -1), 1
            rows_text = None if text is None else tuple(t.expand(candidates, *t.shape[1:]) for t in text)
        else:
            prompt, rows_context, num_samples, rows_text = None, context_codes, candidates, text

        def on_step(done: int, _total: int, offset: int = steps_before) -> None:
            if callback is not None:
                callback(offset + done, total_steps)

        start = time.perf_counter()
        given = None if given_chords is None else given_chords[:1 if num_samples > 1 else candidates, :,
                                                               window.start_frame: window.end_frame]
        out = generate(expert.lm, rows_context, window.n_frames, text_memory=rows_text, prompt=prompt,
                       num_samples=num_samples, params=params, generator=generator, callback=on_step, given=given)
        timings.generate_s += time.perf_counter() - start
        steps_before += generation_steps(window.n_frames, streams) - window.prompt_frames
        codes[:, :, window.start_frame: window.end_frame] = out

        start = time.perf_counter()
        pieces.append(expert.codec.decode(audio_codes(out, expert.lm.config))[:, 0].float().cpu().numpy())
        timings.decode_s += time.perf_counter() - start

    start = time.perf_counter()
    audio = stitch(plan, pieces)
    timings.stitch_s += time.perf_counter() - start
    return StemResult(audio=audio, plan=plan, codes=codes.cpu(), timings=timings)


def _chord_row(expert: Expert, chords: np.ndarray | None, frames: int, candidates: int) -> torch.Tensor | None:
    """`chords` [frames] as `generate`'s `given` over the whole plan: [candidates, streams, frames]."""
    if chords is None:
        return None
    config = expert.lm.config
    if not config.chord_classes:
        raise ValueError(f"chords were given, but the {expert.instrument!r} expert has no chord stream to take them")
    chords = np.asarray(chords)
    if chords.shape != (frames,):
        raise ValueError(f"chords has shape {chords.shape}, expected ({frames},): one chord class per frame")
    if chords.min(initial=0) < UNFILLED or chords.max(initial=0) >= config.chord_classes:
        raise ValueError(f"chord classes are 0..{config.chord_classes - 1} (or {UNFILLED}: the expert's own), "
                         f"got {chords.min()}..{chords.max()}")
    unfilled = torch.full((candidates, config.n_q, frames), UNFILLED, dtype=torch.long, device=expert.device)
    return with_chord_row(unfilled, config, torch.from_numpy(chords.astype(np.int64)).expand(candidates, -1))


def generate_stem(
    expert: Expert,
    context_audio: np.ndarray | None,
    sample_rate: int,
    duration: float,
    *,
    prompt_text: str | None = None,
    candidates: int = 1,
    params: SamplingParams = SamplingParams(),
    seed: int = 0,
    callback: ProgressCallback | None = None,
    plan: WindowPlan | None = None,
) -> np.ndarray:
    """Generate a stem: [candidates, samples] float32 at the expert's sample rate (see `render_stem`)."""
    return render_stem(expert, context_audio, sample_rate, duration, prompt_text=prompt_text, candidates=candidates,
                       params=params, seed=seed, callback=callback, plan=plan).audio
