"""EnCodec through transformers' `EncodecModel`, configured from an expert's metadata.

`CodecConfig` covers MusicGen's 32 kHz codec (`CodecConfig.musicgen_32khz()`) and the small
codecs the demo experts are trained with. Weights use transformers' EncodecModel names; the
importers in `stage_stack.convert.encodec` map the original encodec / audiocraft / STAGE names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn


@dataclass(frozen=True)
class CodecConfig:
    sample_rate: int = 32000
    channels: int = 1
    dimension: int = 128
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 5, 4, 4)
    n_residual_layers: int = 1
    lstm_layers: int = 2
    compress: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    causal: bool = False
    pad_mode: str = "reflect"
    true_skip: bool = True
    n_q: int = 4
    card: int = 2048
    codebook_dim: int | None = None  # None = dimension
    trim_right_ratio: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(self.ratios))
        if self.card & (self.card - 1):
            raise ValueError(f"CodecConfig.card must be a power of two, got {self.card}")
        if self.pad_mode not in ("reflect", "constant", "replicate"):
            raise ValueError(f"CodecConfig.pad_mode must be reflect, constant or replicate, got {self.pad_mode!r}")

    @classmethod
    def musicgen_32khz(cls) -> "CodecConfig":
        """MusicGen's (and STAGE's) EnCodec 32 kHz: 4 codebooks of 2048 at 50 Hz."""
        return cls()

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def bandwidth(self) -> float:
        """kbps that select exactly n_q codebooks in transformers' EncodecModel."""
        return self.n_q * self.frame_rate * math.log2(self.card) / 1000

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "CodecConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CodecConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def to_hf(self):
        from transformers import EncodecConfig

        return EncodecConfig(
            target_bandwidths=[self.bandwidth],
            sampling_rate=self.sample_rate,
            audio_channels=self.channels,
            normalize=False,
            chunk_length_s=None,
            overlap=None,
            hidden_size=self.dimension,
            num_filters=self.n_filters,
            num_residual_layers=self.n_residual_layers,
            upsampling_ratios=list(self.ratios),
            norm_type="weight_norm",
            kernel_size=self.kernel_size,
            last_kernel_size=self.last_kernel_size,
            residual_kernel_size=self.residual_kernel_size,
            dilation_growth_rate=self.dilation_base,
            use_causal_conv=self.causal,
            pad_mode=self.pad_mode,
            compress=self.compress,
            num_lstm_layers=self.lstm_layers,
            trim_right_ratio=self.trim_right_ratio,
            codebook_size=self.card,
            codebook_dim=self.codebook_dim or self.dimension,
            use_conv_shortcut=not self.true_skip,
        )


class Codec(nn.Module):
    """Audio [B, 1, samples] <-> codes [B, n_q, frames]. Weights live under `model.`."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        from transformers import EncodecModel

        self.config = config
        self.model = EncodecModel(config.to_hf())

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 3 or audio.shape[1] != self.config.channels:
            raise ValueError(f"Codec.encode expects audio [B, {self.config.channels}, samples], got {tuple(audio.shape)}")
        audio = audio.to(self.model.encoder.layers[0].conv.bias.dtype)
        out = self.model.encode(audio, bandwidth=self.config.bandwidth, return_dict=True)
        return out.audio_codes[0]  # [B, n_q, frames] (transformers adds a chunk axis)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(codes[None], [None], return_dict=True)
        return out.audio_values.float()

    def latent(self, audio: torch.Tensor) -> torch.Tensor:
        """Encoder output before quantisation [B, dimension, frames]."""
        return self.model.encoder(audio)
