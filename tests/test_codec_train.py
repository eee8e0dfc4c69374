"""Codec training: the EMA residual VQ, the losses and metrics, a short real run, resume, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage_stack.errors import StageStackError, TrainingConfigError
from stage_stack.models.codec import Codec, CodecConfig
from stage_stack.training.checkpoint import latest_checkpoint, load_checkpoint
from stage_stack.training.codec_train import (EMAQuantizer, SpectralLoss, init_codec_weights, kmeans,
                                              load_codec_file, mel_distance, mel_filterbank, nearest_code, si_snr,
                                              train_codec)
from stage_stack.training.config import CodecTrainConfig, load_config

SMALL = dict(sample_rate=16000, dimension=8, n_filters=4, ratios=[8, 5, 4], lstm_layers=1, n_q=2, card=16)


def test_si_snr_and_mel_distance_numbers():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(16000).astype(np.float32)
    noise = rng.standard_normal(16000).astype(np.float32)
    noise -= noise @ ref / (ref @ ref) * ref  # orthogonal to the reference
    noise *= np.linalg.norm(ref) / np.linalg.norm(noise) / 10  # 20 dB below it
    assert si_snr(ref, ref + noise) == pytest.approx(20.0, abs=0.01)
    assert si_snr(ref, 3 * (ref + noise)) == pytest.approx(20.0, abs=0.01)  # scale-invariant
    assert mel_distance(ref, ref, 16000) == 0.0
    assert mel_distance(ref, 10 * ref, 16000) == pytest.approx(1.0, abs=0.01)  # x10 = one decade everywhere


def test_mel_filterbank_covers_the_spectrum():
    bank = mel_filterbank(16000, 1024, 64)
    assert bank.shape == (64, 513)
    assert torch.all(bank >= 0) and torch.all(bank.max(dim=1).values > 0.5)  # every band has a peak
    centres = bank.argmax(dim=1)
    assert torch.all(centres[1:] > centres[:-1])  # increasing centre frequencies


def test_spectral_loss_is_zero_only_for_a_match():
    loss = SpectralLoss(16000, [128, 256], [512], 32)
    x = torch.randn(2, 8000)
    assert float(loss.stft(x, x)) == 0.0 and float(loss.mel(x, x)) == 0.0
    assert float(loss.stft(0.5 * x, x)) > 0.3 and float(loss.mel(0.5 * x, x)) > 0.3


def _codec(seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    return Codec(CodecConfig(**SMALL))


def test_fresh_init_makes_the_decoder_depend_on_its_input():
    codec = _codec()
    init_codec_weights(codec.model)
    with torch.no_grad():
        audio = 0.1 * torch.randn(2, 1, 1600)
        latent = codec.model.encoder(audio)
        out = codec.model.decoder(latent)
        silent = codec.model.decoder(torch.zeros_like(latent))
    assert 0.02 < float(latent.std()) < 2.0  # the signal neither vanishes nor explodes through the encoder
    assert float((out - silent).std()) > 0.5 * float(out.std())  # the latent, not the biases, drives the output
    for name, p in codec.model.named_parameters():
        if name.endswith("bias") and "lstm" not in name:
            assert torch.count_nonzero(p) == 0, name


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    found = kmeans(points, 3, iters=10, generator=gen)
    assert torch.allclose(found[nearest_code(centres, found)], centres, atol=0.1)


def test_ema_quantizer_matches_transformers_encode_and_learns():
    codec = _codec()
    q = EMAQuantizer(codec.model.quantizer, n_q=2, decay=0.9, dead_code_threshold=0.5)
    q.mark_uninitialised()
    assert not q.initialised
    gen = torch.Generator().manual_seed(0)
    audio = torch.randn(4, 1, 1600)
    with torch.no_grad():
        latent = codec.model.encoder(audio)  # [4, 8, 10]
    # No Lloyd iterations: codes start on random latents, so the EMA below has work to do.
    q.kmeans_init(latent.transpose(1, 2).reshape(-1, 8), iters=0, generator=gen)
    assert q.initialised

    quantized, codes, commitment = q(latent, update=False)
    # The codes our trainer uses are exactly what the stock transformers path produces.
    assert torch.equal(codes, codec.encode(audio))
    assert torch.allclose(quantized, codec.model.quantizer.decode(codes.transpose(0, 1)), atol=1e-6)
    assert float(commitment) > 0

    # Straight-through: the gradient reaches the latent unchanged.
    latent = latent.clone().requires_grad_(True)
    out, _, _ = q(latent, update=False)
    out.sum().backward()
    assert torch.equal(latent.grad, torch.ones_like(latent))

    # EMA updates move the used codes toward the data: the quantization error falls.
    data = latent.detach()
    before = float((q(data, update=False)[0] - data).pow(2).mean())
    for _ in range(20):
        q(data, update=True, generator=gen)
    after = float((q(data, update=False)[0] - data).pow(2).mean())
    assert after < 0.8 * before


def test_dead_codes_are_reseeded_on_data():
    codec = _codec()
    q = EMAQuantizer(codec.model.quantizer, n_q=1, decay=0.3, dead_code_threshold=0.5)
    cb = q.codebooks[0]
    with torch.no_grad():
        cb.embed.copy_(torch.randn(16, 8) + 100.0)  # far from the data: only one code will ever be picked
        cb.embed_avg.copy_(cb.embed)
        cb.cluster_size.fill_(1.0)
    data = torch.randn(2, 8, 40)
    q(data, update=True, generator=torch.Generator().manual_seed(0))
    vectors = data.transpose(1, 2).reshape(-1, 8)
    dead_rows = (cb.cluster_size == 0.5).nonzero().squeeze(-1)  # unused codes decayed to 0.3 < 0.5: re-seeded
    assert len(dead_rows) == 15
    for row in dead_rows:  # each re-seeded code is one of the current data vectors
        assert torch.isclose(vectors, cb.embed[row]).all(dim=1).any()


def _config(tmp_path, **overrides) -> CodecTrainConfig:
    data = {"root": str(tmp_path / "songs"), "valid_root": str(tmp_path / "valid"),
            "synth": {"n_songs": 2, "seed": 0, "duration": 3, "sample_rate": 16000},
            "valid_synth": {"n_songs": 1, "seed": 1, "duration": 3, "sample_rate": 16000},
            "segment_seconds": 0.5, "batch_size": 4}
    config = {"run_dir": str(tmp_path / "run"), "output": str(tmp_path / "codec.safetensors"), "codec": SMALL,
              "data": data, "loss": {"l1": 30.0, "stft": 0.5, "mel": 0.5, "stft_sizes": [128, 256],
                                     "mel_sizes": [256, 512], "n_mels": 32},
              "quantizer": {"init_batches": 2, "kmeans_iters": 3}, "eval": {"n_songs": 1, "seconds": 2},
              "lr": 3e-3, "max_steps": 30, "warmup_steps": 5, "eval_every": 30, "log_every": 1,
              "checkpoint_every": 10, "torch_threads": 1}
    config.update(overrides)
    return CodecTrainConfig.model_validate(config)


@pytest.mark.slow
def test_short_codec_run_learns_and_writes_a_loadable_codec(tmp_path):
    result = train_codec(_config(tmp_path), progress=False)
    records = [r for r in result.history if "l1" in r]
    assert len(records) == 30
    first = np.mean([r["l1"] for r in records[:5]])
    last = np.mean([r["l1"] for r in records[-5:]])
    assert last < 0.8 * first
    codec, info = load_codec_file(result.output)
    assert info["steps"] == 30 and set(info["metrics"]) == {"drums", "bass", "keys", "lead", "mix", "click"}
    audio = torch.randn(1, 1, 8000) * 0.1
    assert codec.encode(audio).shape == (1, 2, 50)
    assert codec.decode(codec.encode(audio)).shape == (1, 1, 8000)


@pytest.mark.slow
def test_codec_resume_is_exact(tmp_path):
    straight = train_codec(_config(tmp_path / "a", max_steps=6, eval_every=100), progress=False)
    config = _config(tmp_path / "b", max_steps=6, eval_every=100)
    train_codec(config, progress=False, stop_after=3)
    assert latest_checkpoint(config.run_dir).name == "step-00000003.pt"
    with pytest.raises(StageStackError, match="--resume"):
        train_codec(config, progress=False)
    resumed = train_codec(config, resume=True, progress=False)
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in straight.history if "loss" in r]
    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "run"))["model"]
    b = load_checkpoint(latest_checkpoint(config.run_dir))["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name  # weights and EMA codebook buffers alike


def test_codec_config_errors_name_the_field(tmp_path):
    with pytest.raises(TrainingConfigError) as err:
        _load_codec_config(tmp_path, "codec: {sample_rate: 16000, card: 300}\n"
                                     "data: {root: a, valid_root: b, mix_prob: 0.8, click_prob: 0.5}\n")
    text = str(err.value)
    assert "field 'codec'" in text and "power of two" in text
    assert "field 'data'" in text and "mix_prob + click_prob" in text


def test_load_codec_file_rejects_other_files(tmp_path):
    from stage_stack.expert import atomic_save_safetensors

    path = atomic_save_safetensors({"x": torch.zeros(1)}, tmp_path / "other.safetensors", {"kind": '"other"'})
    with pytest.raises(StageStackError, match="neither a codec file"):
        load_codec_file(path)


def test_data_stems_limit_what_a_codec_trains_on(tmp_path):
    from stage_stack.training.codec_train import ClipSampler, load_songs

    config = _config(tmp_path, data={"root": str(tmp_path / "songs"), "valid_root": str(tmp_path / "valid"),
                                     "synth": {"n_songs": 2, "seed": 0, "duration": 2, "sample_rate": 16000},
                                     "stems": ["keys"], "mix_prob": 0.5})
    config.data.synth.ensure(config.data.root)
    every, _ = load_songs(config.data.root, 16000)
    keys, _ = load_songs(config.data.root, 16000, stems=config.data.stems)
    assert [set(s.stems) for s in keys] == [{"keys"}] * 2 and all(len(s.stems) > 1 for s in every)
    for a, b in zip(keys, every):
        assert np.array_equal(a.stems["keys"], b.stems["keys"])
    # a song of one stem has no mix to draw: every clip is a window of that stem
    sampler = ClipSampler(keys, 16000, 0.5, config.data.mix_prob, 0.0, 0.0, seed=0)
    for clip in sampler.batch(0, 4)[:, 0].numpy():
        assert any(_holds_window(s.stems["keys"], clip) for s in keys)
    with pytest.raises(StageStackError, match=r"no usable songs with a stem among viola \(data.stems\)"):
        load_songs(config.data.root, 16000, stems=("viola",))
    with pytest.raises(TrainingConfigError, match="stems must name at least one stem"):
        _load_codec_config(tmp_path, "codec: {sample_rate: 16000}\ndata: {root: a, valid_root: b, stems: []}\n")


def _load_codec_config(tmp_path, sections: str) -> CodecTrainConfig:
    """A codec config file with a run_dir, an output, 10 steps and `sections`, read as users' are."""
    path = tmp_path / "codec.yaml"
    path.write_text("run_dir: r\noutput: o.safetensors\nmax_steps: 10\n" + sections)
    return load_config(path, CodecTrainConfig)


def _holds_window(audio: np.ndarray, clip: np.ndarray) -> bool:
    starts = np.flatnonzero((audio[:-1] == clip[0]) & (audio[1:] == clip[1]))
    return any(np.array_equal(audio[i:i + clip.size], clip) for i in starts if i + clip.size <= audio.size)
