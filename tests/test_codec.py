"""EnCodec wrapper: shapes, chunked encode/decode, checkpoint key maps and config inference."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from stage_stack.convert.encodec import (
    encodec_key_to_hf,
    encodec_state_dict_to_hf,
    infer_codec_config,
    load_audiocraft_compression,
    load_codec_state,
)
from stage_stack.errors import CheckpointKeyError, StageStackError
from stage_stack.models.codec import Codec, CodecConfig, _windows
from stage_stack.testing import TINY_CODEC, calibrated_codec, tiny_codec

FIXTURE = Path("/work/shared/fixtures/stage_ref_small")


def to_original_names(codec: Codec, legacy: bool) -> dict[str, torch.Tensor]:
    """The codec's weights under the original encodec / audiocraft / STAGE names."""
    convtr = {name for name, module in codec.model.named_modules() if isinstance(module, nn.ConvTranspose1d)}
    out = {}
    for key, tensor in codec.model.state_dict().items():
        module, _, leaf = key.partition(".conv.")
        if key.startswith("quantizer."):
            key = key.replace("quantizer.layers.", "quantizer.vq.layers.").replace(".codebook.", "._codebook.")
        elif leaf:
            wrapper = "convtr.convtr" if f"{module}.conv" in convtr else "conv.conv"
            if legacy:
                leaf = leaf.replace("parametrizations.weight.original0", "weight_g")
                leaf = leaf.replace("parametrizations.weight.original1", "weight_v")
            key = f"{module}.{wrapper}.{leaf}"
        key = key.replace("encoder.layers.", "encoder.model.").replace("decoder.layers.", "decoder.model.")
        out[key] = tensor.clone()
    return out


# ---------------------------------------------------------------------------------------------
# shapes and input checks


@pytest.mark.parametrize("samples", [0, 1, 159, 160, 161, 1600])
def test_frames_are_ceil_of_samples_over_hop(samples):
    codec = tiny_codec()
    hop = codec.config.hop_length
    assert hop == 160
    codes = codec.encode(torch.randn(2, 1, samples))
    assert codes.shape == (2, codec.config.n_q, math.ceil(samples / hop))
    assert codes.dtype == torch.long
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, codes.shape[-1] * hop) and audio.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    codec = tiny_codec()
    with pytest.raises(ValueError, match=r"audio \[B, 1, samples\]"):
        codec.encode(torch.randn(1, 2, 100))
    with pytest.raises(ValueError, match=r"codes \[B, 2, frames\]"):
        codec.decode(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\).*PAD/SEP"):
        codec.decode(torch.full((1, 2, 5), 16))
    with pytest.raises(ValueError, match="chunk must be > 0"):
        codec.encode(torch.randn(1, 1, 1600), chunk_seconds=0)


# ---------------------------------------------------------------------------------------------
# chunked encode / decode


@pytest.mark.parametrize("n_frames,chunk,margin", [(10, 3, 2), (1001, 200, 20), (400, 200, 50), (7, 1, 0)])
def test_windows_tile_the_input_with_margins(n_frames, chunk, margin):
    windows = _windows(n_frames, chunk, margin)
    kept = [(lo, hi) for _, _, lo, hi in windows]
    assert kept[0][0] == 0 and kept[-1][1] == n_frames
    assert all(a[1] == b[0] for a, b in zip(kept, kept[1:]))
    sizes = [hi - lo for lo, hi in kept]
    assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1  # balanced, no tiny last piece
    for start, end, lo, hi in windows:
        assert start == max(0, lo - margin) and end == min(n_frames, hi + margin)


def test_short_input_takes_one_exact_pass_and_long_input_is_windowed(monkeypatch):
    codec = calibrated_codec()
    calls = []
    original = codec._encode_window
    monkeypatch.setattr(codec, "_encode_window", lambda audio: calls.append(audio.shape[-1]) or original(audio))
    audio = 0.3 * torch.randn(1, 1, 16000 * 3)  # 300 frames
    codec.encode(audio, chunk_seconds=2.0, margin_seconds=0.5)  # 300 <= 200 + 2 * 50: one pass
    assert calls == [audio.shape[-1]]
    calls.clear()
    codec.encode(audio, chunk_seconds=1.0, margin_seconds=0.2)  # 3 windows of <= 100 + 2 * 20 frames
    assert len(calls) == 3 and max(calls) <= 140 * 160


@pytest.mark.slow
def test_chunked_matches_full_pass():
    codec = calibrated_codec()
    audio = 0.3 * torch.randn(1, 1, 16000 * 4, generator=torch.Generator().manual_seed(1))  # 400 frames
    full = codec.encode(audio, chunk_seconds=math.inf)
    assert len(full.unique()) > 8  # the codes really vary, so agreement below is informative

    chunked = codec.encode(audio, chunk_seconds=0.5, margin_seconds=0.2)  # 8 windows of <= 90 frames
    no_margin = codec.encode(audio, chunk_seconds=0.5, margin_seconds=0.0)
    assert chunked.shape == full.shape
    assert (chunked == full).float().mean() >= 0.99  # observed 0.9975
    assert (no_margin == full).float().mean() < 0.95  # observed 0.88: the margin is what makes windows agree

    reference = codec.decode(full, chunk_frames=math.inf)
    decoded = codec.decode(full, chunk_frames=50, margin_frames=20)
    assert decoded.shape == reference.shape
    assert (decoded - reference).abs().max() < 1e-4  # observed ~2e-7
    hard_cut = codec.decode(full, chunk_frames=50, margin_frames=0)
    assert (hard_cut - reference).abs().max() > 1e-3  # observed ~5e-2 without context


# ---------------------------------------------------------------------------------------------
# key maps


@pytest.mark.parametrize("source,target", [
    ("encoder.model.0.conv.conv.weight_g", "encoder.layers.0.conv.parametrizations.weight.original0"),
    ("encoder.model.0.conv.conv.parametrizations.weight.original1",
     "encoder.layers.0.conv.parametrizations.weight.original1"),
    ("encoder.model.1.block.3.conv.conv.bias", "encoder.layers.1.block.3.conv.bias"),
    ("encoder.model.1.shortcut.conv.conv.weight_v", "encoder.layers.1.shortcut.conv.parametrizations.weight.original1"),
    ("encoder.model.13.lstm.weight_hh_l1", "encoder.layers.13.lstm.weight_hh_l1"),
    ("decoder.model.3.convtr.convtr.weight_v", "decoder.layers.3.conv.parametrizations.weight.original1"),
    ("decoder.model.3.convtr.convtr.parametrizations.weight.original0",
     "decoder.layers.3.conv.parametrizations.weight.original0"),
    ("decoder.model.15.conv.conv.bias", "decoder.layers.15.conv.bias"),
    ("quantizer.vq.layers.2._codebook.embed_avg", "quantizer.layers.2.codebook.embed_avg"),
    ("quantizer.vq.layers.0._codebook.inited", "quantizer.layers.0.codebook.inited"),
    ("decoder.layers.3.conv.bias", "decoder.layers.3.conv.bias"),  # already transformers' name
])
def test_key_map(source, target):
    assert encodec_key_to_hf(source) == target


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "weight_g_v"])
def test_state_dict_round_trip_and_identical_outputs(legacy):
    codec = calibrated_codec()
    original = to_original_names(codec, legacy)
    assert any(k.endswith("weight_g") for k in original) == legacy
    assert "decoder.model.3.convtr.convtr.bias" in original
    stage_style = {f"encodec_model.{k}": v for k, v in original.items()} | {"lm.other.weight": torch.zeros(1)}

    hf = encodec_state_dict_to_hf(stage_style, prefix="encodec_model.")
    assert hf.keys() == codec.model.state_dict().keys()
    restored = load_codec_state(Codec(codec.config).eval(), hf, "test")
    audio = 0.3 * torch.randn(1, 1, 4000)
    assert torch.equal(restored.encode(audio), codec.encode(audio))
    assert torch.equal(restored.latent(audio), codec.latent(audio))


def test_legacy_weight_g_v_mean_what_parametrizations_mean():
    """torch's old weight_norm (g, v) and the parametrization (original0, original1) give the same conv."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        legacy = nn.utils.weight_norm(nn.Conv1d(1, 4, 7))
    with torch.no_grad():
        legacy.weight_g.mul_(torch.rand_like(legacy.weight_g) + 0.5)  # g no longer equals |v|
    source = {f"encoder.model.0.conv.conv.{k}": v for k, v in legacy.state_dict().items()}
    hf = encodec_state_dict_to_hf(source)
    conv = tiny_codec().model.encoder.layers[0].conv
    conv.load_state_dict({k.removeprefix("encoder.layers.0.conv."): v for k, v in hf.items()})
    x = torch.randn(1, 1, 50)
    torch.testing.assert_close(conv(x), legacy(x))


def test_both_namings_of_one_weight_is_an_error():
    state = {"encoder.model.0.conv.conv.weight_g": torch.ones(4, 1, 1),
             "encoder.model.0.conv.conv.parametrizations.weight.original0": torch.ones(4, 1, 1)}
    with pytest.raises(CheckpointKeyError, match="both legacy and parametrization"):
        encodec_state_dict_to_hf(state)


# ---------------------------------------------------------------------------------------------
# config inference and loading errors


@pytest.mark.parametrize("config", [
    TINY_CODEC,
    CodecConfig(sample_rate=24000, dimension=16, n_filters=8, ratios=(6, 5, 2), n_residual_layers=2,
                lstm_layers=1, compress=4, kernel_size=5, last_kernel_size=3, residual_kernel_size=5,
                true_skip=False, n_q=3, card=32),
    CodecConfig(dimension=8, n_filters=4, lstm_layers=2, n_q=4, card=16),  # MusicGen's layout, tiny widths
], ids=["tiny16k", "odd", "musicgen_layout"])
def test_infer_codec_config_from_shapes(config):
    legacy = to_original_names(Codec(config), legacy=True)
    assert infer_codec_config(legacy, sample_rate=config.sample_rate, dilation_base=config.dilation_base) == config
    hf = Codec(config).model.state_dict()
    assert infer_codec_config(hf, sample_rate=config.sample_rate, pad_mode="constant") == \
        CodecConfig(**(config.to_dict() | {"pad_mode": "constant"}))


def test_infer_codec_config_names_what_is_missing():
    with pytest.raises(CheckpointKeyError, match="quantizer.vq.layers.i._codebook.embed") as info:
        infer_codec_config({k: v for k, v in to_original_names(tiny_codec(), True).items()
                            if not k.startswith("quantizer")}, sample_rate=16000)
    assert len(info.value.missing) == 1


def test_load_codec_state_lists_every_bad_key_and_changes_nothing():
    codec = tiny_codec()
    before = {k: v.clone() for k, v in codec.model.state_dict().items()}
    state = Codec(codec.config).model.state_dict()
    del state["encoder.layers.0.conv.bias"]
    del state["quantizer.layers.1.codebook.embed"]
    state["encoder.layers.99.conv.bias"] = torch.zeros(3)
    state["encoder.layers.0.conv.parametrizations.weight.original1"] = torch.zeros(4, 1, 5)
    with pytest.raises(CheckpointKeyError) as info:
        load_codec_state(codec, state, "ckpt.bin")
    error = info.value
    assert error.missing == ["encoder.layers.0.conv.bias", "quantizer.layers.1.codebook.embed"]
    assert error.unexpected == ["encoder.layers.99.conv.bias"]
    assert error.mis_shaped == [("encoder.layers.0.conv.parametrizations.weight.original1", (4, 1, 5), (4, 1, 7))]
    assert str(error).startswith("ckpt.bin:") and "got (4, 1, 5), expected (4, 1, 7)" in str(error)
    assert all(torch.equal(before[k], v) for k, v in codec.model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# audiocraft compression_state_dict.bin


def audiocraft_cfg(config: CodecConfig, pad_mode: str) -> str:
    """The relevant part of an audiocraft xp.cfg, as `OmegaConf.to_yaml` writes it (interpolations kept)."""
    return yaml.safe_dump({
        "sample_rate": config.sample_rate, "channels": config.channels, "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": "${sample_rate}",
                    "channels": "${channels}", "causal": False, "renormalize": False},
        "seanet": {"dimension": config.dimension, "channels": "${channels}", "causal": "${encodec.causal}",
                   "n_filters": config.n_filters, "n_residual_layers": 1, "ratios": list(config.ratios),
                   "activation": "ELU", "norm": "weight_norm", "kernel_size": 7, "residual_kernel_size": 3,
                   "last_kernel_size": 7, "dilation_base": 2, "pad_mode": pad_mode, "true_skip": True,
                   "compress": 2, "lstm": config.lstm_layers, "decoder": {"trim_right_ratio": 1.0}, "encoder": {}},
        "rvq": {"n_q": config.n_q, "bins": config.card, "decay": 0.99},
    })


def test_audiocraft_compression_bin(tmp_path):
    codec = calibrated_codec()
    path = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": to_original_names(codec, legacy=True),
                "xp.cfg": audiocraft_cfg(codec.config, "constant"), "version": "1.3.0", "exported": True}, path)

    config, state = load_audiocraft_compression(path)
    assert config == CodecConfig(**(codec.config.to_dict() | {"pad_mode": "constant"}))  # xp.cfg's padding
    config, state = load_audiocraft_compression(path, pad_mode="reflect")  # STAGE runs these weights with reflect
    assert config == codec.config
    restored = load_codec_state(Codec(config).eval(), state, str(path))
    audio = 0.3 * torch.randn(1, 1, 4000)
    assert torch.equal(restored.encode(audio), codec.encode(audio))


def test_audiocraft_training_checkpoint_layout(tmp_path):
    codec = tiny_codec()
    path = tmp_path / "checkpoint.th"
    torch.save({"best_state": {"model": to_original_names(codec, legacy=True)},
                "xp.cfg": audiocraft_cfg(codec.config, "reflect")}, path)
    config, state = load_audiocraft_compression(path)
    assert config == codec.config and state.keys() == codec.model.state_dict().keys()


def test_audiocraft_bad_files_say_what_is_wrong(tmp_path):
    pointer = tmp_path / "pointer.bin"
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.3.0"}, pointer)
    with pytest.raises(StageStackError, match="only a reference to the pretrained codec 'facebook/encodec_32khz'"):
        load_audiocraft_compression(pointer)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(StageStackError, match="garbage.bin: cannot be read as audiocraft.s compression_state_dict.bin"):
        load_audiocraft_compression(garbage)
    no_rate = tmp_path / "no_cfg.bin"
    torch.save({"best_state": to_original_names(tiny_codec(), legacy=True)}, no_rate)
    with pytest.raises(StageStackError, match="pass sample_rate"):
        load_audiocraft_compression(no_rate)
    assert load_audiocraft_compression(no_rate, sample_rate=16000)[0] == TINY_CODEC


# ---------------------------------------------------------------------------------------------
# upstream parity (the fixture's tiny EnCodec, produced by STAGE's own code)


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="parity fixture not available")
def test_stage_fixture_codec_parity():
    from safetensors.torch import load_file

    checkpoint = load_file(FIXTURE / "lightning_musicgen_small.safetensors")
    state = encodec_state_dict_to_hf(checkpoint, prefix="encodec_model.")
    config = infer_codec_config(state, sample_rate=32000)
    assert (config.dimension, config.n_filters, config.ratios, config.lstm_layers, config.n_q, config.card) == \
        (8, 4, (8, 5, 4, 4), 2, 4, 16)
    codec = load_codec_state(Codec(config).eval(), state, "fixture")
    io = load_file(FIXTURE / "io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(codec.latent(io["encodec/audio_in"]), io["encodec/encoder_out"], rtol=0, atol=1e-4)
    assert torch.equal(codec.encode(io["encodec/audio_in"]), io["encodec/codes"])
    torch.testing.assert_close(codec.decode(io["encodec/codes"]), io["encodec/audio_out"], rtol=0, atol=1e-4)
