"""Small random-weight experts and codecs for tests, examples and benchmarks (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .expert import ExpertMetadata, save_expert
from .models.codec import Codec, CodecConfig
from .models.stage_lm import StageLM, StageLMConfig, init_weights

TINY_CODEC = CodecConfig(sample_rate=16000, dimension=8, n_filters=4, ratios=(8, 5, 4), lstm_layers=1,
                         n_q=2, card=16)
TINY_LM = StageLMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, card=16, n_q=2, cross_attention=False)


def tiny_codec(config: CodecConfig = TINY_CODEC, seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    codec = Codec(config).eval()
    with torch.no_grad():  # random but non-degenerate codebooks so codes vary with the input
        for layer in codec.model.quantizer.layers:
            layer.codebook.embed.normal_(0, 0.5)
            layer.codebook.inited.fill_(1)
    return codec


def calibrated_codec(config: CodecConfig = TINY_CODEC, seed: int = 0) -> Codec:
    """A tiny codec whose codebooks are frames of its own residuals, so codes vary like a trained
    codec's (tiny_codec's random codebooks give a handful of distinct codes)."""
    codec = tiny_codec(config, seed)
    generator = torch.Generator().manual_seed(seed)
    audio = 0.3 * torch.randn(1, config.channels, config.sample_rate * 2, generator=generator)
    with torch.no_grad():
        residual = codec.latent(audio)[0].T
        for layer in codec.model.quantizer.layers:
            picks = torch.randperm(len(residual), generator=generator)[: config.card]
            layer.codebook.embed.copy_(residual[picks])
            residual = residual - layer.codebook.decode(layer.codebook.encode(residual))
    return codec


def tiny_lm(config: StageLMConfig = TINY_LM, seed: int = 0) -> StageLM:
    return init_weights(StageLM(config), seed=seed).eval()


def expert_metadata(instrument: str, lm_config: StageLMConfig, codec_config: CodecConfig, **extra) -> ExpertMetadata:
    fields = dict(base_model="random-init", license="MIT", training={"note": "random weights for tests"})
    fields.update(extra)
    return ExpertMetadata.for_models(instrument, lm_config, codec_config, **fields)


def make_tiny_expert(path: str | os.PathLike, instrument: str = "drums", seed: int = 0,
                     lm_config: StageLMConfig = TINY_LM, codec_config: CodecConfig = TINY_CODEC, **extra) -> Path:
    """Write a tiny random expert file and return its path."""
    lm = tiny_lm(lm_config, seed)
    codec = tiny_codec(codec_config, seed)
    meta = expert_metadata(instrument, lm_config, codec_config, **extra)
    return save_expert(path, meta, lm, codec)
