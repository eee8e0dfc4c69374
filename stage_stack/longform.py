"""Long form: stems longer than an expert's window, generated in overlapping windows.

An expert generates at most `max_target_seconds` of stem per call and was trained on at most
`max_context_seconds` of context (STAGE: 10 s + 10 s; recorded in the expert's
`metadata.training` when known). A longer stem is planned as windows of that length, in codec
frames, each starting `stride = window - overlap` frames after the previous one:

    stem   |----- w0 -----|
                 |----- w1 -----|
                       |----- w2 -----|      (the last window is moved back to end exactly
    context|-- c0 --|                         at the stem's end, so every window is full)
                 |-- c1 --|
                       |-- c2 --|

- The context of a window is the time-aligned part of the conditioning audio: it starts where
  the window starts (STAGE crops contexts that way in training, reference §5 step 8).
- A window continues the stem's own previous tokens: the frames it shares with the previous
  window are passed to `generate(..., prompt=codes)` (they count toward its frames) and only
  the rest are sampled, so the token stream has no seam.
- Each window is decoded on its own (memory stays bounded), and consecutive windows are
  crossfaded with a raised-cosine over the middle of their overlap, where both decodes hold
  the same tokens and neither is at its edge. The plan, seams included, goes into the manifest.

The default overlap is 40% of the window, MusicGen's ratio for extending (an 18 s stride on its
30 s window), and the crossfade is half the overlap.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_CONTEXT_SECONDS = 10.0  # STAGE's training window (reference §5)
DEFAULT_TARGET_SECONDS = 10.0
DEFAULT_OVERLAP_RATIO = 0.4
DEFAULT_CROSSFADE_RATIO = 0.5  # of the overlap


class Window(BaseModel):
    """One generation call. Frames are codec frames of the expert; samples at the expert's rate."""

    model_config = ConfigDict(extra="forbid")
    start_frame: int = Field(ge=0)  # first stem frame this window covers
    end_frame: int  # one past the last
    prompt_frames: int = Field(ge=0)  # frames at the start taken from the previous window
    context_start_frame: int = Field(ge=0)  # the time-aligned context slice
    context_end_frame: int
    crossfade_start_sample: int | None = None  # the seam with the previous window (None for the first)
    crossfade_end_sample: int | None = None

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def new_frames(self) -> int:
        return self.n_frames - self.prompt_frames


class WindowPlan(BaseModel):
    """How one stem is cut into windows; recorded per layer in the manifest."""

    model_config = ConfigDict(extra="forbid")
    sample_rate: int  # the expert's
    hop_length: int  # samples per codec frame
    samples: int  # length of the stem
    total_frames: int
    max_context_frames: int
    max_target_frames: int
    overlap_frames: int
    crossfade_samples: int
    windows: list[Window]


def expert_window_seconds(training: dict) -> tuple[float, float]:
    """(context, target) seconds an expert was trained for, from its `metadata.training`."""
    context = float(training.get("max_context_seconds") or DEFAULT_CONTEXT_SECONDS)
    target = float(training.get("max_target_seconds") or DEFAULT_TARGET_SECONDS)
    if context <= 0 or target <= 0:
        raise ValueError(f"training window must be positive, got context {context} s and target {target} s")
    return context, target


def plan_windows(
    duration: float,
    sample_rate: int,
    hop_length: int,
    max_context_seconds: float = DEFAULT_CONTEXT_SECONDS,
    max_target_seconds: float = DEFAULT_TARGET_SECONDS,
    overlap_seconds: float | None = None,
    crossfade_seconds: float | None = None,
) -> WindowPlan:
    """Cut `duration` seconds into windows (see the module docstring)."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    samples = int(round(duration * sample_rate))
    total = math.ceil(samples / hop_length)
    window = max(1, int(max_target_seconds * sample_rate / hop_length))
    context = max(1, int(max_context_seconds * sample_rate / hop_length))
    if overlap_seconds is None:
        overlap = int(round(DEFAULT_OVERLAP_RATIO * window))
    else:
        overlap = int(round(overlap_seconds * sample_rate / hop_length))
    if not 0 < overlap < window:
        raise ValueError(f"overlap must be more than 0 and less than the {max_target_seconds} s window; "
                         f"got {overlap} of {window} frames")
    if crossfade_seconds is None:
        crossfade = int(round(DEFAULT_CROSSFADE_RATIO * overlap * hop_length))
    else:
        crossfade = int(round(crossfade_seconds * sample_rate))
    crossfade = max(1, min(crossfade, overlap * hop_length))

    starts = [0]
    while starts[-1] + window < total:
        starts.append(min(starts[-1] + window - overlap, total - window))

    windows: list[Window] = []
    for k, start in enumerate(starts):
        end = min(start + window, total)
        prompt = windows[-1].end_frame - start if k else 0
        seam_start = seam_end = None
        if k:
            overlap_start, overlap_end = start * hop_length, windows[-1].end_frame * hop_length
            fade = min(crossfade, overlap_end - overlap_start)
            seam_start = overlap_start + (overlap_end - overlap_start - fade) // 2
            seam_end = seam_start + fade
        windows.append(Window(start_frame=start, end_frame=end, prompt_frames=prompt, context_start_frame=start,
                              context_end_frame=min(start + context, total),
                              crossfade_start_sample=seam_start, crossfade_end_sample=seam_end))
    return WindowPlan(sample_rate=sample_rate, hop_length=hop_length, samples=samples, total_frames=total,
                      max_context_frames=context, max_target_frames=window, overlap_frames=overlap,
                      crossfade_samples=crossfade, windows=windows)


def crossfade_ramp(length: int) -> np.ndarray:
    """Raised-cosine fade-in 0 -> 1 over `length` samples; the fade-out is 1 - ramp (sums to 1)."""
    t = (np.arange(length) + 0.5) / length
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


def stitch(plan: WindowPlan, window_audio: list[np.ndarray]) -> np.ndarray:
    """Join decoded windows ([..., window samples] each) into [..., plan.samples], crossfading seams."""
    if len(window_audio) != len(plan.windows):
        raise ValueError(f"{len(window_audio)} decoded windows for a plan of {len(plan.windows)}")
    hop = plan.hop_length
    lead = window_audio[0].shape[:-1]
    out = np.zeros(lead + (plan.total_frames * hop,), dtype=np.float32)
    for window, audio in zip(plan.windows, window_audio):
        begin, end = window.start_frame * hop, window.end_frame * hop
        if audio.shape[-1] != end - begin:
            raise ValueError(f"window {begin}-{end} decoded to {audio.shape[-1]} samples, expected {end - begin}")
        if window.crossfade_start_sample is None:
            out[..., begin:end] = audio
            continue
        fade_start, fade_end = window.crossfade_start_sample, window.crossfade_end_sample
        ramp = crossfade_ramp(fade_end - fade_start)
        local = slice(fade_start - begin, fade_end - begin)
        out[..., fade_start:fade_end] = out[..., fade_start:fade_end] * (1.0 - ramp) + audio[..., local] * ramp
        out[..., fade_end:end] = audio[..., fade_end - begin:]
    return out[..., : plan.samples]
