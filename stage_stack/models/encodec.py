"""EnCodec: a SEANet encoder and decoder around a residual vector quantizer (RVQ).

The whole model, in the order audio flows through it:

    audio [B, C, samples] -> Encoder -> latent [B, D, frames] -> RVQ.encode -> codes [n_q, B, frames]
    codes -> RVQ.decode (sum of the codebook rows) -> latent -> Decoder -> audio

Tensor names and shapes are those of transformers' `EncodecModel` (weight-normed convolutions
as `conv.parametrizations.weight.original0/1`, codebooks as the `embed`, `embed_avg`,
`cluster_size` and `inited` buffers), so expert files, codec files and the importers'
key maps are the same whichever implementation reads them. transformers' model is the
reference this one is tested against (tests/test_encodec.py): the same codes and audio.

Why our own: importing transformers' EnCodec takes ~3 s and ~140 MB on a 2-core CPU
(torch._dynamo comes with it), which was most of the first demo arrangement's load time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from .codec import CodecConfig


def _pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    # Reflect padding needs the input longer than the pad: a very short input is zero-extended
    # first and the extension cut off again (the reference does the same).
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    if extra:
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode)
    return padded[..., : padded.shape[-1] - extra]


class _WeightNorm(nn.Module):
    """weight = g * v / ||v|| over every dim but 0, as torch's weight_norm parametrization
    (same `original0` = g and `original1` = v tensors), except that a meta-device weight gets
    an empty g: a big codec is built on the meta device and filled from its file, and the norm
    of a meta tensor runs a Python reference kernel that imports torch._dynamo (~73 MB, ~1 s)."""

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return torch._weight_norm(weight_v, weight_g, 0)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if weight.is_meta:
            return weight.new_empty((weight.shape[0],) + (1,) * (weight.dim() - 1)), weight
        return torch.norm_except_dim(weight, 2, 0), weight


def weight_norm(module: nn.Module) -> nn.Module:
    parametrize.register_parametrization(module, "weight", _WeightNorm(), unsafe=True)
    return module


class Conv1d(nn.Module):
    """A weight-normed Conv1d padded so that `frames = ceil(samples / stride)`."""

    def __init__(self, config: CodecConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation))
        self.causal, self.pad_mode = config.causal, config.pad_mode
        self.stride = stride
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.padding_total = self.effective_kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        # pad the end so that the last window is whole (no sample dropped)
        n_frames = math.ceil((length - self.effective_kernel + self.padding_total) / self.stride + 1) - 1
        extra = n_frames * self.stride + self.effective_kernel - self.padding_total - length
        if self.causal:
            left, right = self.padding_total, extra
        else:
            right = self.padding_total // 2
            left, right = self.padding_total - right, right + extra
        return self.conv(_pad(x, left, right, self.pad_mode))


class ConvTranspose1d(nn.Module):
    """A weight-normed ConvTranspose1d trimmed back to `frames * stride` samples."""

    def __init__(self, config: CodecConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int) -> None:
        super().__init__()
        if not (config.causal or config.trim_right_ratio == 1.0):
            raise ValueError("CodecConfig.trim_right_ratio != 1.0 needs a causal codec (causal=True)")
        self.conv = weight_norm(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride))
        padding_total = kernel_size - stride
        self.right = math.ceil(padding_total * config.trim_right_ratio) if config.causal else padding_total // 2
        self.left = padding_total - self.right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.left : y.shape[-1] - self.right]


class LSTM(nn.Module):
    """A residual LSTM over time, in and out in the convolutions' [B, D, frames] layout."""

    def __init__(self, config: CodecConfig, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, config.lstm_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)
        return (self.lstm(x)[0] + x).permute(1, 2, 0)


class ResnetBlock(nn.Module):
    """ELU -> dilated conv (dim -> dim / compress) -> ELU -> 1x1 conv back, plus the input."""

    def __init__(self, config: CodecConfig, dim: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // config.compress
        self.block = nn.ModuleList([
            nn.ELU(), Conv1d(config, dim, hidden, config.residual_kernel_size, dilation=dilation),
            nn.ELU(), Conv1d(config, hidden, dim, 1),
        ])
        self.shortcut = nn.Identity() if config.true_skip else Conv1d(config, dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


class _Layers(nn.Module):
    """`layers` applied in order (an nn.Sequential would name them `0.`, not `layers.0.`)."""

    layers: nn.ModuleList

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Encoder(_Layers):
    """Audio -> latent: each ratio r doubles the channels and divides the time by r."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        width = config.n_filters
        layers: list[nn.Module] = [Conv1d(config, config.channels, width, config.kernel_size)]
        for ratio in reversed(config.ratios):
            layers += [ResnetBlock(config, width, config.dilation_base ** j) for j in range(config.n_residual_layers)]
            layers += [nn.ELU(), Conv1d(config, width, width * 2, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [LSTM(config, width), nn.ELU(), Conv1d(config, width, config.dimension, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)


class Decoder(_Layers):
    """Latent -> audio: the encoder mirrored, transposed convolutions upsampling by each ratio."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        width = config.n_filters * 2 ** len(config.ratios)
        layers: list[nn.Module] = [Conv1d(config, config.dimension, width, config.kernel_size), LSTM(config, width)]
        for ratio in config.ratios:
            layers += [nn.ELU(), ConvTranspose1d(config, width, width // 2, 2 * ratio, stride=ratio)]
            layers += [ResnetBlock(config, width // 2, config.dilation_base ** j)
                       for j in range(config.n_residual_layers)]
            width //= 2
        layers += [nn.ELU(), Conv1d(config, config.n_filters, config.channels, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)


class Codebook(nn.Module):
    """One codebook's rows. `embed_avg`, `cluster_size` and `inited` are the EMA training
    state (stage_stack.training.codec_train updates them); inference reads `embed` only."""

    def __init__(self, card: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("inited", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(card))
        self.register_buffer("embed", torch.zeros(card, dim))
        self.register_buffer("embed_avg", torch.zeros(card, dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest row (squared Euclidean) of each vector of x [..., D] -> indices [...]."""
        vectors = x.reshape(-1, x.shape[-1])
        embed = self.embed.t()
        # the reference's expression term for term, so that near-ties round the same way
        dist = -(vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ embed + embed.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices.view(x.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """indices [...] -> their rows [..., D]."""
        return F.embedding(codes, self.embed)


class VectorQuantizer(nn.Module):
    """One codebook over the convolutions' [B, D, frames] layout."""

    def __init__(self, card: int, dim: int) -> None:
        super().__init__()
        self.codebook = Codebook(card, dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codebook.encode(x.transpose(1, 2))  # [B, frames]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook.decode(codes).transpose(1, 2)  # [B, D, frames]


class ResidualVectorQuantizer(nn.Module):
    """n_q codebooks, each quantizing what the previous ones left of the latent."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        dim = config.codebook_dim or config.dimension
        self.layers = nn.ModuleList([VectorQuantizer(config.card, dim) for _ in range(config.n_q)])

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, D, frames] -> codes [n_q, B, frames]."""
        residual, codes = latent, []
        for layer in self.layers:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            codes.append(idx)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, B, frames] (n <= n_q: the first n codebooks) -> latent [B, D, frames]."""
        return sum(self.layers[i].decode(c) for i, c in enumerate(codes))


class EncodecModel(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = ResidualVectorQuantizer(config)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, C, samples] -> codes [B, n_q, frames]."""
        with parametrize.cached():  # each weight-normed weight computed once per call, not per use
            return self.quantizer.encode(self.encoder(audio)).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n_q, frames] -> audio [B, C, frames * hop]."""
        with parametrize.cached():
            return self.decoder(self.quantizer.decode(codes.transpose(0, 1)))
