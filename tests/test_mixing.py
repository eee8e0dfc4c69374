"""Gain staging, the true-peak limiter, conditioning audio and the metronome."""

from __future__ import annotations

import numpy as np
import pytest

from stage_stack.mixing import (CLICK_GAIN_DB, LimiterSettings, conditioning_audio, db_to_gain, fit_length,
                                gain_to_db, limit, limiter_gain, metronome, mix_bus, render_mix, true_peak)

SR = 16000
CEILING = db_to_gain(-1.0)


def tone(freq: float, seconds: float = 1.0, amp: float = 1.0, phase: float = 0.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def test_db_conversions():
    assert db_to_gain(0.0) == 1.0
    assert db_to_gain(-6.0) == pytest.approx(0.501187, abs=1e-6)
    assert gain_to_db(db_to_gain(-13.5)) == pytest.approx(-13.5)
    assert LimiterSettings().ceiling == pytest.approx(0.891251, abs=1e-6)


def test_quiet_signal_passes_bit_for_bit():
    quiet = tone(440, amp=0.5)
    assert np.array_equal(limit(quiet, SR), quiet)
    assert np.all(limiter_gain(quiet, SR) == 1.0)


def test_loud_noise_never_exceeds_the_ceiling():
    rng = np.random.default_rng(0)
    loud = (rng.standard_normal(3 * SR) * 0.8).astype(np.float32)  # peaks near 3.5x full scale
    out = limit(loud, SR)
    assert np.abs(loud).max() > 3.0
    assert np.abs(out).max() <= CEILING
    assert true_peak(out, SR) <= CEILING * db_to_gain(0.1)  # true peak within 0.1 dB of the ceiling
    # the limiter only turns down: same sign, never louder
    assert np.all(np.abs(out) <= np.abs(loud) + 1e-7)
    assert np.all(np.sign(out[loud != 0]) == np.sign(loud[loud != 0]))


def test_inter_sample_peaks_are_limited():
    # fs/4 with a 45 degree phase: samples only reach 0.707 of the waveform's peak
    signal = tone(SR / 4, amp=1.1, phase=np.pi / 4)
    assert np.abs(signal).max() < CEILING  # a sample-peak limiter would do nothing here
    assert true_peak(signal, SR) > 1.05
    out = limit(signal, SR)
    assert true_peak(out, SR) <= CEILING * db_to_gain(0.1)


def test_look_ahead_and_release():
    signal = tone(200, seconds=2.0, amp=0.3)
    hit = SR  # one loud second starts at 1.0 s and lasts 10 ms
    signal[hit: hit + SR // 100] *= 8.0
    gain = limiter_gain(signal, SR)
    assert gain[: hit - SR // 50].min() == 1.0  # untouched until 20 ms before the peak
    assert gain[hit - 1] < 1.0  # already down when the peak arrives (look-ahead)
    assert gain[hit: hit + SR // 100].max() <= CEILING / 2.39 + 1e-3  # 0.3 * 8 = 2.4 peak
    assert np.abs(np.diff(gain)).max() < 0.05  # smooth: no clicks from gain steps
    assert gain[-1] > 0.99  # recovered ~1 s after the hit (80 ms release)


def test_mix_bus_gain_staging():
    a, b, ctx = tone(100, amp=0.1), tone(300, amp=0.2), tone(50, amp=0.05)
    bus = mix_bus(ctx, [(a, 0.0), (b, -6.0)], SR)
    np.testing.assert_allclose(bus, ctx + a + db_to_gain(-6.0) * b, atol=1e-7)
    # quiet enough: the limited mix is the bus
    assert np.array_equal(render_mix(ctx, [(a, 0.0), (b, -6.0)], SR, SR), bus)
    # length: cut and zero-padded
    assert render_mix(None, [(a, 0.0)], SR, SR // 2).shape == (SR // 2,)
    padded = render_mix(None, [(a[: SR // 2], 0.0)], SR, SR)
    assert np.all(padded[SR // 2:] == 0)


def test_many_loud_stems_never_clip():
    rng = np.random.default_rng(1)
    stems = [((rng.standard_normal(SR) * 0.7).astype(np.float32), 6.0) for _ in range(6)]
    mixed = render_mix(None, stems, SR, SR)
    assert np.abs(mix_bus(None, stems, SR)).max() > 5
    assert np.abs(mixed).max() <= CEILING


def test_conditioning_modes():
    mix = tone(220, amp=0.3)
    click = metronome(120, SR, SR)
    assert conditioning_audio(mix, click, "none", SR) is mix
    assert np.array_equal(conditioning_audio(mix, click, "click", SR), click)
    both = conditioning_audio(mix, click, "mix+click", SR)
    np.testing.assert_allclose(both, limit(mix + db_to_gain(CLICK_GAIN_DB) * click, SR), atol=0)
    assert np.abs(both).max() <= CEILING
    with pytest.raises(ValueError, match="click mode"):
        conditioning_audio(mix, click, "loud", SR)
    with pytest.raises(ValueError, match="needs a click track"):
        conditioning_audio(mix, None, "click", SR)


def test_metronome_beats_and_accents():
    track = metronome(120, 4 * SR, SR)  # 2 beats per second, 8 beats, downbeats at 0 s and 2 s
    onsets = np.flatnonzero((np.abs(track[1:]) > 0.01) & (np.abs(track[:-1]) <= 0.01)) + 1
    starts = [o for i, o in enumerate(onsets) if i == 0 or o - onsets[i - 1] > SR // 20]
    assert np.allclose(starts, np.arange(8) * SR // 2, atol=2)
    energy = [float(np.sum(track[s: s + SR // 10] ** 2)) for s in np.arange(8) * SR // 2]
    assert energy[0] > 1.2 * energy[1] and energy[4] > 1.2 * energy[5]  # accented downbeats
    assert np.abs(track).max() <= 1.0


def test_fit_length():
    x = np.arange(5, dtype=np.float32)
    assert fit_length(x, 3).tolist() == [0, 1, 2]
    assert fit_length(x, 7).tolist() == [0, 1, 2, 3, 4, 0, 0]
    assert fit_length(np.ones((2, 5)), 6).shape == (2, 6)


def test_limiter_settings_are_validated():
    with pytest.raises(ValueError, match="ceiling_dbtp"):
        LimiterSettings(ceiling_dbtp=1.0)
    with pytest.raises(ValueError):
        LimiterSettings(release_ms=0)
