"""A small beat tracker: a mix's log-mel spectrogram -> how likely each frame holds a beat.

    audio [samples] --STFT, mel filterbank, log--> bands [n_mels, T]; their rise (positive
    frame-to-frame difference) --> features [2 n_mels, T]
    --Conv1d--> [channels, T] --residual dilated Conv1d blocks (ELU)--> --Conv1d 1x1--> logits [T]

The dilations double up to `dilations[-1]`, so a frame sees ~10 s around it: enough to hear a
tempo, not just an onset. Trained on the synthetic band's mixes without their drums
(stage_stack.training.beat_train); `stage_stack.beat_tracking` turns its output into a beat grid.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class BeatTrackerConfig:
    sample_rate: int = 16000
    hop_length: int = 160  # 100 frames per second
    n_fft: int = 1024
    n_mels: int = 40
    fmin: float = 30.0
    fmax: float = 8000.0
    channels: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.fmax > self.sample_rate / 2:
            raise ValueError(f"fmax ({self.fmax} Hz) must not exceed half the sample rate ({self.sample_rate} Hz)")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


def mel_filterbank(config: BeatTrackerConfig) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, evenly spaced on the HTK mel scale."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(config.fmin), mel(config.fmax), config.n_mels + 2))
    freqs = np.fft.rfftfreq(config.n_fft, 1.0 / config.sample_rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32))


class BeatTracker(nn.Module):
    def __init__(self, config: BeatTrackerConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.register_buffer("mel", mel_filterbank(config), persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.input = nn.Conv1d(2 * config.n_mels, c, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv1d(c, c, 3, padding=d, dilation=d) for d in config.dilations)
        self.output = nn.Conv1d(c, 1, 1)
        self.drop = nn.Dropout(config.dropout)

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, samples] at config.sample_rate -> [B, 2 n_mels, samples // hop_length + 1]."""
        cfg = self.config
        spec = torch.stft(audio, cfg.n_fft, cfg.hop_length, window=self.window, center=True,
                          return_complex=True).abs().pow(2)
        bands = torch.log1p(100.0 * (self.mel @ spec))
        rise = F.relu(torch.diff(bands, dim=-1, prepend=bands[..., :1]))
        return torch.cat([bands, rise], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 2 n_mels, T] -> beat logits [B, T]."""
        h = F.elu(self.input(features))
        for block in self.blocks:
            h = h + self.drop(F.elu(block(h)))
        return self.output(h)[:, 0]

    @torch.inference_mode()
    def activation(self, audio: np.ndarray) -> np.ndarray:
        """[samples] at config.sample_rate -> [frames] beat probability per frame."""
        wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
        return torch.sigmoid(self(self.features(wave)))[0].numpy()


def save_beat_tracker(path: str | Path, tracker: BeatTracker, training: dict | None = None) -> None:
    """One safetensors file: the weights, the config and what trained it (metadata)."""
    metadata = {"format": "stage-stack-beat-tracker", "version": "1", "config": json.dumps(asdict(tracker.config))}
    if training is not None:
        metadata["training"] = json.dumps(training)
    state = {k: v.detach().contiguous() for k, v in tracker.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_beat_tracker_file(path: str | Path) -> tuple[BeatTracker, dict]:
    """(the tracker, eval mode on the CPU; its training record) from `save_beat_tracker`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"beat tracker file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "stage-stack-beat-tracker":
        raise ValueError(f"{path}: not a stage-stack beat tracker (metadata 'format' is "
                         f"{metadata.get('format')!r}, expected 'stage-stack-beat-tracker')")
    tracker = BeatTracker(BeatTrackerConfig(**json.loads(metadata["config"])))
    tracker.load_state_dict(load_file(str(path)))
    return tracker.eval(), json.loads(metadata.get("training", "{}"))
