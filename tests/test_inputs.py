"""Bad input: every case of the issue gets one clear error (or a warning), before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf

from stage_stack import inputs
from stage_stack.errors import InputError, UnknownInstrumentError
from stage_stack.inputs import (SilentAudioWarning, check_bpm, check_duration, check_layers, context_from_array,
                                load_context, read_context_file)

SR = 16000


def noise(seconds: float, channels: int = 1, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (int(seconds * sr), channels) if channels > 1 else (int(seconds * sr),)
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def wav(path, audio, sr=SR, subtype="FLOAT"):
    sf.write(str(path), audio, sr, subtype=subtype)
    return path


# -- files ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.wav: no such file"):
        read_context_file(tmp_path / "nope.wav")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_context_file(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = wav(tmp_path / "locked.wav", noise(2))
    # root ignores permission bits, so the check is exercised through os.access
    monkeypatch.setattr(inputs.os, "access", lambda p, mode: os.fspath(p) != os.fspath(path))
    with pytest.raises(InputError, match="permission denied"):
        read_context_file(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_context_file(path)


def test_file_that_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 10)
    with pytest.raises(InputError, match="not an audio file"):
        read_context_file(path)


def test_audio_file_with_no_samples(tmp_path):
    path = wav(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32))
    with pytest.raises(InputError, match="no samples"):
        read_context_file(path)


def test_nan_and_inf_samples_are_refused(tmp_path):
    audio = noise(2)
    audio[SR // 2] = np.nan
    audio[SR] = np.inf
    with pytest.raises(InputError, match=r"2 sample\(s\) are NaN or infinite \(first at 0.500 s\)"):
        read_context_file(wav(tmp_path / "nan.wav", audio))
    with pytest.raises(InputError, match="NaN or infinite"):
        context_from_array(audio, SR)


def test_silence_warns_and_proceeds(tmp_path):
    with pytest.warns(SilentAudioWarning, match="silent"):
        ctx = read_context_file(wav(tmp_path / "silence.wav", np.zeros(2 * SR, dtype=np.float32)))
    assert ctx.seconds == 2.0
    with pytest.warns(SilentAudioWarning):
        context_from_array(np.full(SR * 2, 1e-6, dtype=np.float32), SR)


def test_too_short_and_too_long(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"0\.50 s long; a context needs at least 1 s"):
        read_context_file(wav(tmp_path / "short.wav", noise(0.5)))
    with pytest.raises(InputError, match="at least 1 s"):
        context_from_array(noise(0.9), SR)
    monkeypatch.setattr(inputs, "MAX_AUDIO_SECONDS", 2.0)  # the real limit is 20 min
    with pytest.raises(InputError, match="the limit is"):
        read_context_file(wav(tmp_path / "long.wav", noise(3)))
    with pytest.raises(InputError, match="the limit is"):
        context_from_array(noise(3), SR)


def test_stereo_and_multichannel_are_downmixed(tmp_path):
    stereo = noise(2, channels=2)
    ctx = read_context_file(wav(tmp_path / "stereo.wav", stereo))
    assert ctx.channels == 2 and ctx.audio.ndim == 1
    np.testing.assert_allclose(ctx.audio, stereo.mean(axis=1), atol=1e-7)
    six = noise(1.5, channels=6)
    ctx = read_context_file(wav(tmp_path / "surround.wav", six))
    assert ctx.channels == 6
    np.testing.assert_allclose(ctx.audio, six.mean(axis=1), atol=1e-7)
    # arrays: channels first or last, the shorter axis is channels
    for array in (stereo.T, stereo):
        ctx = context_from_array(array, SR)
        assert ctx.channels == 2
        np.testing.assert_allclose(ctx.audio, stereo.mean(axis=1), atol=1e-7)


def test_any_sample_rate_is_kept_for_resampling(tmp_path):
    ctx = read_context_file(wav(tmp_path / "odd.wav", noise(1.5, sr=22050), sr=22050))
    assert ctx.sample_rate == 22050 and ctx.audio.shape == (int(1.5 * 22050),)
    assert context_from_array(noise(1.2, sr=8000), 8000).sample_rate == 8000
    with pytest.raises(InputError, match="sample rate 100 Hz is outside"):
        context_from_array(noise(2, sr=100), 100)


def test_pcm_file_and_digest(tmp_path):
    audio = noise(1.5)
    a = read_context_file(wav(tmp_path / "a.wav", audio, subtype="PCM_16"))
    b = read_context_file(wav(tmp_path / "b.wav", audio, subtype="PCM_16"))
    assert a.audio.dtype == np.float32 and a.sha256 == b.sha256 and len(a.sha256) == 64


def test_array_errors():
    with pytest.raises(InputError, match="pass its sample rate"):
        load_context(noise(2), None)
    with pytest.raises(InputError, match="not floating point"):
        context_from_array((noise(2) * 32767).astype(np.int16), SR)
    with pytest.raises(InputError, match="is not audio"):
        context_from_array(np.zeros((2, 2, SR), dtype=np.float32), SR)
    with pytest.raises(InputError, match="must be a path, a numpy array or None"):
        load_context(12, SR)
    assert load_context(None) is None


# -- numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bpm", [29.9, 301, -120, float("nan"), float("inf")])
def test_bpm_out_of_range(bpm):
    with pytest.raises(InputError, match="outside 30-300"):
        check_bpm(bpm)


def test_bpm_in_range():
    assert check_bpm(30) == 30.0 and check_bpm(300) == 300.0 and check_bpm(None) is None
    with pytest.raises(InputError, match="must be a number"):
        check_bpm("fast")


@pytest.mark.parametrize("duration", [0, -1, float("nan")])
def test_duration_must_be_positive(duration):
    with pytest.raises(InputError, match="more than 0 seconds"):
        check_duration(duration, None, 10.0)


def test_duration_defaults_and_limit():
    ctx = context_from_array(noise(2.5), SR)
    assert check_duration(None, ctx, 10.0) == 2.5
    assert check_duration(None, None, 10.0) == 10.0
    assert check_duration(4, ctx, 10.0) == 4.0
    with pytest.raises(InputError, match="over the 20 min limit"):
        check_duration(20 * 60 + 1, None, 10.0)


# -- layers -----------------------------------------------------------------------------------

@dataclass
class L:
    instrument: str
    name: str | None = None


def test_unknown_instrument_lists_the_known_ones():
    with pytest.raises(UnknownInstrumentError, match="unknown instrument 'tuba'; known instruments: bass, drums"):
        check_layers([L("drums"), L("tuba")], ["drums", "bass"])


def test_same_instrument_twice_needs_a_name():
    with pytest.raises(InputError, match=r"used twice; give the second layer its own name: Layer\('keys', name="):
        check_layers([L("keys"), L("keys")], ["keys"])
    check_layers([L("keys"), L("keys", name="pad")], ["keys"])
    with pytest.raises(InputError, match="two layers are named 'pad'"):
        check_layers([L("keys", name="pad"), L("bass", name="pad")], ["keys", "bass"])
    with pytest.raises(InputError, match="already has a layer named"):  # against an arrangement's existing layers
        check_layers([L("keys")], ["keys"], taken=["keys"])
    with pytest.raises(InputError, match="no layers"):
        check_layers([], ["keys"])
