"""Long form: window plans, crossfaded stitching, time-aligned contexts, continued prompts, a 60 s song."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arranger_helpers import FAST_CODEC, SR, band, make_band  # noqa: F401  (fixtures)
from stage_stack import Arranger
from stage_stack import pipeline as pipeline_module
from stage_stack.expert import load_expert
from stage_stack.longform import crossfade_ramp, expert_window_seconds, plan_windows, stitch
from stage_stack.pipeline import generate_stem, render_stem

HOP = FAST_CODEC.hop_length  # 640 samples, 25 frames per second


def test_plan_covers_the_song_with_overlapping_windows():
    plan = plan_windows(60.0, 32000, 640)  # MusicGen's rate: 50 frames/s, 10 s windows
    assert plan.total_frames == 3000 and plan.samples == 60 * 32000
    assert (plan.max_target_frames, plan.max_context_frames, plan.overlap_frames) == (500, 500, 200)
    windows = plan.windows
    assert windows[0].start_frame == 0 and windows[0].prompt_frames == 0 and windows[-1].end_frame == 3000
    for before, after in zip(windows, windows[1:]):
        assert after.start_frame < before.end_frame  # overlap, no gap
        assert after.prompt_frames == before.end_frame - after.start_frame >= plan.overlap_frames
        assert after.new_frames > 0
        # the seam lies in the middle of the overlap
        overlap = (after.start_frame * 640, before.end_frame * 640)
        assert overlap[0] <= after.crossfade_start_sample < after.crossfade_end_sample <= overlap[1]
        assert after.crossfade_start_sample - overlap[0] == pytest.approx(overlap[1] - after.crossfade_end_sample, abs=1)
    assert all(w.n_frames == 500 for w in windows)  # the last window is moved back to stay full
    assert all(w.context_start_frame == w.start_frame for w in windows)  # time-aligned contexts
    assert sum(w.new_frames for w in windows) == 3000


def test_short_songs_are_one_window():
    plan = plan_windows(7.3, 32000, 640)
    assert len(plan.windows) == 1 and plan.windows[0].n_frames == 365 and plan.samples == int(7.3 * 32000)
    assert plan.windows[0].crossfade_start_sample is None


def test_plan_options_and_errors():
    plan = plan_windows(30.0, 32000, 640, max_context_seconds=5.0, max_target_seconds=10.0, overlap_seconds=2.0,
                        crossfade_seconds=0.5)
    assert plan.max_context_frames == 250 and plan.overlap_frames == 100 and plan.crossfade_samples == 16000
    assert plan.windows[1].context_end_frame - plan.windows[1].context_start_frame == 250
    with pytest.raises(ValueError, match="overlap must be"):
        plan_windows(30.0, 32000, 640, overlap_seconds=10.0)
    with pytest.raises(ValueError, match="duration must be > 0"):
        plan_windows(0, 32000, 640)
    assert expert_window_seconds({}) == (10.0, 10.0)
    assert expert_window_seconds({"max_context_seconds": 5, "max_target_seconds": 30}) == (5.0, 30.0)


def test_stitch_crossfades_each_seam():
    plan = plan_windows(3.0, 100, 1, max_context_seconds=1.0, max_target_seconds=1.0)  # 100 frames/s
    pieces = [np.full((2, w.n_frames), float(k + 1), dtype=np.float32) for k, w in enumerate(plan.windows)]
    out = stitch(plan, pieces)
    assert out.shape == (2, 300)
    for k, w in enumerate(plan.windows[1:], start=1):
        start, end = w.crossfade_start_sample, w.crossfade_end_sample
        ramp = crossfade_ramp(end - start)
        np.testing.assert_allclose(out[0, start:end], k * (1 - ramp) + (k + 1) * ramp, rtol=1e-6)
        assert out[0, start - 1] == k and out[0, end] == k + 1  # before: the old window; after: the new
    assert np.all(np.diff(out[0]) >= 0)  # monotonic: no gap or jump back anywhere
    r = crossfade_ramp(8)
    np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="decoded windows"):
        stitch(plan, pieces[:-1])


def test_windows_condition_on_aligned_context_and_continue_their_prompt(band, monkeypatch):
    expert = load_expert(band["bass"])
    seen = {"encode": [], "generate": []}
    real_encode, real_generate = expert.codec.encode, pipeline_module.generate

    def encode(audio):
        seen["encode"].append(audio[0, 0].numpy().copy())
        return real_encode(audio)

    def generate(lm, context, n_frames, **kwargs):
        out = real_generate(lm, context, n_frames, **kwargs)
        seen["generate"].append(dict(context=context, n_frames=n_frames, prompt=kwargs["prompt"], out=out))
        return out

    monkeypatch.setattr(expert.codec, "encode", encode)
    monkeypatch.setattr(pipeline_module, "generate", generate)
    rng = np.random.default_rng(0)
    context = (rng.standard_normal(3 * SR) * 0.1).astype(np.float32)
    result = render_stem(expert, context, SR, 3.0, candidates=2, seed=1)
    plan = result.plan
    assert [w.start_frame for w in plan.windows] == [0, 15, 30, 45, 50]  # 1 s windows, 0.6 s apart, over 3 s
    for k, window in enumerate(plan.windows):
        slice_ = context[window.context_start_frame * HOP: window.context_end_frame * HOP]
        np.testing.assert_array_equal(seen["encode"][k], slice_)  # the time-aligned part of the context
        call = seen["generate"][k]
        assert call["n_frames"] == window.n_frames
        if k == 0:
            assert call["prompt"] is None
        else:
            prev = seen["generate"][k - 1]["out"]
            shared = plan.windows[k - 1].end_frame - window.start_frame
            assert call["prompt"].shape == (2, 2, shared)  # one prompt row per candidate
            torch.testing.assert_close(call["prompt"], prev[:, :, -shared:], rtol=0, atol=0)
            torch.testing.assert_close(call["out"][:, :, :shared], call["prompt"], rtol=0, atol=0)
    assert result.audio.shape == (2, 3 * SR) and result.codes.shape == (2, 2, 75)
    assert not np.array_equal(result.audio[0], result.audio[1])


def test_generate_stem_without_context_and_its_errors(band):
    expert = load_expert(band["drums"])
    audio = generate_stem(expert, None, SR, 0.5, seed=0)
    assert audio.shape == (1, SR // 2) and np.all(np.isfinite(audio))
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        generate_stem(expert, None, SR, 0.5, candidates=0)


@pytest.mark.slow
def test_sixty_second_arrangement_has_no_gaps_and_crossfaded_seams(tmp_path, monkeypatch):
    experts = make_band(tmp_path, training={"max_context_seconds": 10.0, "max_target_seconds": 10.0},
                        instruments=("drums", "bass"))
    decoded = []  # every window's decode, in order
    real_render = pipeline_module.stitch

    def keep(plan, pieces):
        decoded.append((plan, [p.copy() for p in pieces]))
        return real_render(plan, pieces)

    monkeypatch.setattr(pipeline_module, "stitch", keep)
    song = Arranger(experts).arrange(["drums", "bass"], bpm=100, duration=60.0, seed=0)
    assert song.mix.shape == (60 * SR,)
    for layer, (plan, pieces) in zip(song.manifest.layers, decoded):
        assert layer.window_plan == plan and len(plan.windows) == 10
        stem = song.stems[layer.name]
        # no gaps: every 50 ms of the stem has sound
        blocks = stem[: len(stem) // 800 * 800].reshape(-1, 800)
        assert np.sqrt((blocks ** 2).mean(axis=1)).min() > 1e-4
        # each seam is the crossfade of the two windows' decodes
        for k, window in enumerate(plan.windows[1:], start=1):
            start, end = window.crossfade_start_sample, window.crossfade_end_sample
            prev_w = plan.windows[k - 1]
            a = pieces[k - 1][0, start - prev_w.start_frame * HOP: end - prev_w.start_frame * HOP]
            b = pieces[k][0, start - window.start_frame * HOP: end - window.start_frame * HOP]
            ramp = crossfade_ramp(end - start)
            np.testing.assert_allclose(stem[start:end], a * (1 - ramp) + b * ramp, atol=1e-6)
            np.testing.assert_array_equal(stem[end: end + 100], pieces[k][0, end - window.start_frame * HOP:][:100])
            assert end - start == plan.crossfade_samples
