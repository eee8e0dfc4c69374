"""The codec an expert reads and writes audio through: `CodecConfig` (stored in expert files) and
`Codec`, which windows long audio around the model of `stage_stack.models.encodec`.

`CodecConfig` covers MusicGen's 32 kHz codec (`CodecConfig.musicgen_32khz()`) and the small
codecs the demo experts are trained with. Weights use transformers' EncodecModel names (our
model keeps them, and `to_hf()` builds transformers' config, the reference in the tests); the
importers in `stage_stack.convert.encodec` map the original encodec / audiocraft / STAGE names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

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


DEFAULT_CHUNK_SECONDS = 20.0
# Context decoded/encoded on each side of a chunk and then thrown away. The convolutions see only a
# few frames around each frame, but the LSTM carries state from the past, so the margin is sized
# for the LSTM to forget the window's artificial (reflect-padded) start: 2 s = 100 frames at 50 Hz.
DEFAULT_MARGIN_SECONDS = 2.0


def _chunking(chunk: float, margin: float) -> tuple[float, int]:
    """Validated chunk and margin in frames; the chunk stays math.inf when a single pass is forced."""
    if not chunk > 0 or not margin >= 0:
        raise ValueError(f"chunk must be > 0 frames and margin >= 0 frames, got chunk {chunk} and margin {margin}")
    return (chunk if math.isinf(chunk) else max(1, round(chunk))), round(margin)


def _windows(n_frames: int, chunk: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(window_start, window_end, keep_start, keep_end) in frames. The kept parts tile [0, n_frames)
    in equal-as-possible pieces of at most `chunk` frames (no tiny last piece); each window adds up
    to `margin` frames of context on both sides."""
    n_chunks = math.ceil(n_frames / chunk)
    bounds = [round(i * n_frames / n_chunks) for i in range(n_chunks + 1)]
    return [(max(0, lo - margin), min(n_frames, hi + margin), lo, hi) for lo, hi in zip(bounds, bounds[1:])]


class Codec(nn.Module):
    """Audio [B, channels, samples] <-> codes [B, n_q, frames]. Weights live under `model.`.

    Long inputs are processed in windows of `chunk + 2 * margin` frames so that memory stays bounded:
    on MusicGen's codec (CPU, fp32) a full encode+decode of 60 s peaks ~2.2 GB above the model, the
    default 24 s windows ~1.0 GB whatever the length (measured for 60 s and 5 min). Each window keeps only
    its centre; decoded windows are crossfaded over half a margin around each boundary. Inputs that
    fit in one window take a single exact pass. Pass `chunk_seconds=math.inf` /
    `chunk_frames=math.inf` to force a single pass.

    Frames: `ceil(samples / hop_length)`; a trailing partial frame is padded, so audio shorter than
    one frame (but not empty) gives one frame, and empty audio gives zero frames (and decodes to
    empty audio).
    """

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        from .encodec import EncodecModel

        self.config = config
        self.model = EncodecModel(config)

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, chunk_seconds: float | None = None,
               margin_seconds: float = DEFAULT_MARGIN_SECONDS) -> torch.Tensor:
        if audio.dim() != 3 or audio.shape[1] != self.config.channels:
            raise ValueError(f"Codec.encode expects audio [B, {self.config.channels}, samples], got {tuple(audio.shape)}")
        rate = self.config.frame_rate
        chunk, margin = _chunking(rate * (DEFAULT_CHUNK_SECONDS if chunk_seconds is None else chunk_seconds),
                                  rate * margin_seconds)
        hop = self.config.hop_length
        audio = audio.to(self.model.encoder.layers[0].conv.bias.dtype)
        n_frames = math.ceil(audio.shape[-1] / hop)
        if n_frames == 0:
            return torch.zeros(audio.shape[0], self.config.n_q, 0, dtype=torch.long, device=audio.device)
        if n_frames <= chunk + 2 * margin:
            return self._encode_window(audio)
        pieces = []
        for start, end, keep_start, keep_end in _windows(n_frames, int(chunk), margin):
            # Windows start on a frame boundary, so window frame j is global frame start + j.
            codes = self._encode_window(audio[..., start * hop:end * hop])
            pieces.append(codes[..., keep_start - start:keep_end - start])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, chunk_frames: float | None = None,
               margin_frames: float | None = None) -> torch.Tensor:
        if codes.dim() != 3 or codes.shape[1] != self.config.n_q:
            raise ValueError(f"Codec.decode expects codes [B, {self.config.n_q}, frames], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.card):
            raise ValueError(f"Codec.decode: codes must lie in [0, {self.config.card}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]; strip special tokens (PAD/SEP) first")
        rate = self.config.frame_rate
        chunk, margin = _chunking(rate * DEFAULT_CHUNK_SECONDS if chunk_frames is None else chunk_frames,
                                  rate * DEFAULT_MARGIN_SECONDS if margin_frames is None else margin_frames)
        batch, _, n_frames = codes.shape
        hop = self.config.hop_length
        if n_frames == 0:
            return torch.zeros(batch, self.config.channels, 0, device=codes.device)
        if n_frames <= chunk + 2 * margin:
            return self._decode_window(codes)
        windows = _windows(n_frames, int(chunk), margin)
        # Neighbouring windows are blended linearly over `fade` samples centred on their boundary,
        # half a margin wide: far enough from either window's edge to be accurate in both.
        fade = min(margin // 2, min(hi - lo for _, _, lo, hi in windows)) * hop
        ramp = (torch.arange(fade, device=codes.device) + 0.5) / fade  # fade-in; 1 - ramp fades out
        audio = torch.zeros(batch, self.config.channels, n_frames * hop, device=codes.device)
        for start, end, keep_start, keep_end in windows:
            window = self._decode_window(codes[..., start:end])
            first, last = keep_start == 0, keep_end == n_frames
            lo = keep_start * hop - (0 if first else fade // 2)
            hi = keep_end * hop + (0 if last else fade - fade // 2)
            weight = torch.ones(hi - lo, device=codes.device)
            if not first:
                weight[:fade] = ramp
            if not last:
                weight[hi - lo - fade:] = 1 - ramp
            audio[..., lo:hi] += weight * window[..., lo - start * hop:hi - start * hop]
        return audio

    def _encode_window(self, audio: torch.Tensor) -> torch.Tensor:
        return self.model.encode(audio)

    def _decode_window(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).float()

    def latent(self, audio: torch.Tensor) -> torch.Tensor:
        """Encoder output before quantisation [B, dimension, frames]."""
        return self.model.encoder(audio)
