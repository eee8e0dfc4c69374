"""The codec's musical targets (onsets, chroma), the taught training run, and the information probe."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stage_stack.audio import click_track
from stage_stack.training.checkpoint import latest_checkpoint, load_checkpoint
from stage_stack.training.codec_features import FeatureHead, FrameFeatures, chroma_filterbank, feature_losses
from stage_stack.training.codec_train import EMAQuantizer, train_codec
from stage_stack.models.codec import Codec, CodecConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from codec_information import beat_labels, chord_labels, onset_labels, predictive_information  # noqa: E402

from test_codec_train import SMALL, _config  # noqa: E402

SR, HOP = 16000, 640


def _sine(hz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_chroma_filterbank_puts_each_bin_on_its_nearest_pitch_class():
    bank = chroma_filterbank(SR, 2048)
    assert bank.shape == (12, 1025)
    assert torch.all(bank.sum(0) <= 1)  # one class per bin, none outside 55 Hz - 4 kHz
    assert bank[:, : int(50 / (SR / 2048))].sum() == 0
    a440 = round(440 / (SR / 2048))
    assert bank[9, a440] == 1  # A = 9 with C = 0


@pytest.mark.parametrize("hz, pitch_class", [(440.0, 9), (261.63, 0), (98.0, 7), (73.42, 2)])
def test_chroma_of_a_sine_is_its_pitch_class(hz, pitch_class):
    _, chroma, mask = FrameFeatures(SR, HOP)(torch.from_numpy(_sine(hz))[None])
    assert chroma.shape == (1, 12, 25) and mask.all()
    torch.testing.assert_close(chroma.sum(1), torch.ones(1, 25))
    assert (chroma[0].argmax(0)[3:-3] == pitch_class).all()  # the edges see the start and end transients
    assert chroma[0, pitch_class, 3:-3].min() > 0.6  # low notes leak into the neighbouring bins


def test_onset_lights_the_frame_that_holds_the_click_and_silence_is_not_scored():
    beats = np.array([0.1, 0.5, 0.9])  # frames 2, 12 and 22
    audio = click_track(beats, beats[:1], SR, SR)
    onset, _, mask = FrameFeatures(SR, HOP)(torch.from_numpy(audio.astype(np.float32))[None])
    onset = onset[0].numpy()
    assert set(np.argsort(onset)[-3:]) == {2, 12, 22}
    # The click's cut-off at -60 dB (frames 4, 14, 24) still shows in the log domain, at half height.
    assert onset[[2, 12, 22]].min() > 1.5 * np.delete(onset, [2, 12, 22]).max()
    assert np.delete(onset, [2, 4, 12, 14, 22, 24]).max() < 0.01
    assert not mask[0].all()  # the silent frames between clicks carry no chroma target


def test_feature_losses_are_small_only_for_a_head_that_knows_the_features():
    audio = torch.from_numpy(np.stack([_sine(440.0), _sine(261.63)]))
    features = FrameFeatures(SR, HOP)
    onset, chroma, _ = features(audio)
    head = FeatureHead(13)
    with torch.no_grad():  # a "first stage" that holds the features, read by an identity-like head
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.weight[0, 0, 0] = 1.0
        for k in range(12):
            head.proj.weight[1 + k, 1 + k, 0] = 20.0
    first = torch.cat([onset[:, None], chroma], dim=1)
    good = feature_losses(head, features, first, audio)
    bad = feature_losses(head, features, torch.roll(first, 3, dims=1), audio)
    assert good["onset"] < 1e-6
    assert good["chroma"] < 0.3 < 1.0 < bad["chroma"]  # cross-entropy: the edge frames are not one-hot


def test_clip_onset_scale_scores_each_clip_by_its_own_contrast():
    # a click track and the same 20 dB quieter over faint noise: "clip" scores a head against
    # each clip's standardized onset strength, so predicting exactly that costs nothing, while
    # the absolute target (what "absolute" scores) is far from it
    beats = np.array([0.1, 0.5, 0.9])
    loud = click_track(beats, beats[:1], SR, SR).astype(np.float32)
    audio = torch.from_numpy(np.stack([loud, 0.1 * loud + 0.001 * np.random.default_rng(0).standard_normal(SR)
                                       .astype(np.float32)]))
    features = FrameFeatures(SR, HOP)
    onset, _, _ = features(audio)
    standard = (onset - onset.mean(-1, keepdim=True)) / onset.std(-1, keepdim=True)
    head = FeatureHead(13)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.weight[0, 0, 0] = 1.0
    first = torch.cat([standard[:, None], torch.zeros(2, 12, standard.shape[-1])], dim=1)
    assert feature_losses(head, features, first, audio, onset_scale="clip")["onset"] < 1e-8
    assert feature_losses(head, features, first, audio)["onset"] > 0.1  # not the absolute target
    with pytest.raises(ValueError, match="onset_scale must be 'absolute' or 'clip', got 'max'"):
        feature_losses(head, features, first, audio, onset_scale="max")


def test_quantizer_first_stage_is_the_first_code_with_a_straight_through_gradient():
    codec = Codec(CodecConfig(**SMALL))
    quantizer = EMAQuantizer(codec.model.quantizer, 2, 0.9, 0.0)
    latent = torch.randn(2, 8, 5, requires_grad=True)
    quantized, codes, _, first = quantizer(latent, update=False, first_stage=True)
    embed = codec.model.quantizer.layers[0].codebook.embed
    torch.testing.assert_close(first.detach(), embed[codes[:, 0]].transpose(1, 2))
    first.sum().backward()
    torch.testing.assert_close(latent.grad, torch.ones_like(latent))
    assert len(quantizer(latent, update=False)) == 3  # unchanged without first_stage


@pytest.mark.slow
def test_taught_codec_run_logs_the_feature_losses_and_resumes_exactly(tmp_path):
    loss = {"l1": 30.0, "stft": 0.5, "mel": 0.5, "stft_sizes": [128, 256], "mel_sizes": [256, 512], "n_mels": 32,
            "onset": 1.0, "chroma": 1.0}
    straight = train_codec(_config(tmp_path / "a", max_steps=6, eval_every=100, loss=loss), progress=False)
    records = [r for r in straight.history if "loss" in r]
    assert all({"onset", "chroma"} <= set(r) for r in records) and len(records) == 6
    config = _config(tmp_path / "b", max_steps=6, eval_every=100, loss=loss)
    train_codec(config, progress=False, stop_after=3)
    state = load_checkpoint(latest_checkpoint(config.run_dir))
    assert set(state["feature_head"]) == {"proj.weight", "proj.bias"}
    resumed = train_codec(config, resume=True, progress=False)
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in records]
    head_a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "run"))["feature_head"]
    head_b = load_checkpoint(latest_checkpoint(config.run_dir))["feature_head"]
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


def test_predictive_information_is_zero_for_noise_and_the_entropy_for_a_copy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 20_000)
    noise = rng.integers(0, 64, 20_000)
    h = float(np.log(4))
    none = predictive_information(noise[:10_000], labels[:10_000], noise[10_000:], labels[10_000:], 64, 4)
    assert abs(none["nats"]) < 0.02
    copy = labels * 16 + rng.integers(0, 16, 20_000)  # the token determines the label
    full = predictive_information(copy[:10_000], labels[:10_000], copy[10_000:], labels[10_000:], 64, 4)
    assert full["nats"] == pytest.approx(h, abs=0.02) and full["share"] == pytest.approx(1.0, abs=0.01)


def test_frame_labels_of_beats_and_chords():
    assert beat_labels([0.0, 0.5, 0.99, 2.0], 25, 25).nonzero()[0].tolist() == [0, 12, 24]

    class Note:
        def __init__(self, start):
            self.start = start

    assert onset_labels([Note(0.01), Note(0.5), Note(0.5), Note(3.0)], 25, 25).nonzero()[0].tolist() == [0, 12]

    class Chord:
        def __init__(self, root, start, end):
            self.root, self.start, self.end = root, start, end

    labels = chord_labels([Chord(2, 0.0, 0.5), Chord(7, 0.5, 1.0)], 30, 25)
    assert labels[:12].tolist() == [2] * 12 and labels[13:25].tolist() == [7] * 12 and (labels[25:] == 12).all()


def test_codec_information_benchmark_writes_every_probe_per_codebook(tmp_path, capsys):
    import json

    from codec_information import main

    from stage_stack.testing import make_tiny_expert

    expert = make_tiny_expert(tmp_path / "tiny.safetensors", instrument="drums", seed=0)
    out = tmp_path / "info.json"
    assert main([str(expert), "--songs", "2", "--seconds", "4", "--no-ceilings", "--output", str(out)]) == 0
    payload = json.loads(out.read_text())
    result = payload["codecs"][0]
    assert len(result["information"]) == 9
    n_q = result["config"]["n_q"]
    for name, per_codebook in result["information"].items():
        assert len(per_codebook) == n_q
        binary = name.startswith(("beats", "onsets"))
        most = np.log(2) if binary else np.log(13)  # a binary label / 12 classes + none
        assert all(0 < c["label_entropy"] <= most + 1e-6 and c["nats"] <= c["label_entropy"] + 0.05
                   for c in per_codebook)
    assert set(result["round_trip"]) >= {"drums", "bass", "keys", "mix", "click"}
    # the codec-free reference: every beat probe, scored from the audio's onset envelope; a
    # click's onsets are its beats, so it must tell more than a mix of pitched stems
    envelope = payload["onset_envelope"]
    timed = {name for name in result["information"] if name.startswith(("beats", "onsets"))}
    assert set(envelope) == timed | {"lag_frames"} and set(result["q0_by_lag"]) == timed
    assert 0 <= envelope["lag_frames"] <= 3
    assert envelope["beats | click"]["nats"] > envelope["beats | bass+keys+lead"]["nats"]
    assert "beats | click" in capsys.readouterr().out
