"""Musical targets that the demo codec's first codebook is taught to carry: onsets and pitch class.

Why: with reconstruction losses alone, the demo codec's first codebook spent its 256 codes on
what dominates a waveform loss (loudness and broad timbre). Measured with
`benchmarks/codec_information.py`, a click-track frame's codebook-0 token told a model 25 % of
"is there a beat here", and a keys frame's token 13 % of its chord root. An expert reads the
context through those tokens, so what they do not carry it cannot follow.

The fix is the one speech tokenizers use for content (SpeechTokenizer distils HuBERT into the
first RVQ level; Mimi distils WavLM): a small head reads the *quantized* first-stage vector,
through the straight-through estimator, and predicts features computed from the input audio.
The encoder learns to put those features where the first codebook keeps them. Here the
features are signal processing, not a pretrained model, so any contributor's stems work:

  onset   the positive log-mel flux at 10 ms, max-pooled over each codec frame (a hit anywhere
          inside the frame lights it, so the target is sharp at the frame rate), then log1p
  chroma  the energy per pitch class (65 Hz - 4 kHz, each FFT bin on its nearest semitone) of a
          256 ms window centred on the frame, as a distribution; frames more than 50 dB below
          the clip's peak are not scored. (A 2048-point FFT has 7.8 Hz bins: a 98 Hz G lands
          on F# and G#. 4096 points resolve semitones down to ~65 Hz, the low E of a bass.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codec_train import LOG_FLOOR, mel_filterbank

ONSET_HOP_SECONDS = 0.01
CHROMA_RANGE_HZ = (65.0, 4000.0)
SILENT_DB = -50.0


def chroma_filterbank(sample_rate: int, n_fft: int, low: float = CHROMA_RANGE_HZ[0],
                      high: float = CHROMA_RANGE_HZ[1]) -> torch.Tensor:
    """[12, n_fft // 2 + 1]: each FFT bin in [low, high] counts for its nearest pitch class (C = 0)."""
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    bank = np.zeros((12, freqs.size), dtype=np.float32)
    inside = (freqs >= low) & (freqs <= min(high, sample_rate / 2))
    midi = np.round(69 + 12 * np.log2(freqs[inside] / 440.0)).astype(int)
    bank[midi % 12, np.flatnonzero(inside)] = 1.0
    return torch.from_numpy(bank)


class FrameFeatures(nn.Module):
    """Per-codec-frame targets of clips [B, samples]: onset [B, F] and chroma [B, 12, F] plus a mask [B, F].

    Frame t covers samples [t * hop, (t + 1) * hop), as the codec's frame t does.
    """

    def __init__(self, sample_rate: int, hop: int, chroma_fft: int = 4096, onset_fft: int = 512,
                 n_mels: int = 64) -> None:
        super().__init__()
        self.hop, self.chroma_fft, self.onset_fft = hop, chroma_fft, onset_fft
        self.onset_hop = max(1, round(ONSET_HOP_SECONDS * sample_rate))
        if hop % self.onset_hop:
            raise ValueError(f"codec hop {hop} is not a multiple of the onset hop {self.onset_hop}")
        self.register_buffer("mel", mel_filterbank(sample_rate, onset_fft, n_mels), persistent=False)
        self.register_buffer("chroma", chroma_filterbank(sample_rate, chroma_fft), persistent=False)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        audio = audio.float()
        n_frames = math.ceil(audio.shape[-1] / self.hop)
        # onsets: 10 ms log-mel flux; sub-frame j of frame t is centred at t * hop + (j + 0.5) * onset_hop
        sub = self.hop // self.onset_hop
        shifted = F.pad(audio, (0, n_frames * self.hop - audio.shape[-1]))[:, self.onset_hop // 2:]
        spec = torch.stft(shifted, self.onset_fft, hop_length=self.onset_hop,
                          window=torch.hann_window(self.onset_fft, device=audio.device), return_complex=True).abs()
        log_mel = torch.log(self.mel @ spec + LOG_FLOOR)[..., : n_frames * sub]
        flux = F.relu(log_mel[..., 1:] - log_mel[..., :-1]).mean(dim=1)
        flux = F.pad(flux, (1, n_frames * sub - 1 - flux.shape[-1]))
        onset = torch.log1p(flux.view(audio.shape[0], n_frames, sub).amax(dim=-1))  # clicks reach ~8
        # chroma: one long window per frame, centred on the frame
        shifted = audio[:, self.hop // 2:] if audio.shape[-1] > self.hop // 2 else audio
        spec = torch.stft(shifted, self.chroma_fft, hop_length=self.hop,
                          window=torch.hann_window(self.chroma_fft, device=audio.device), return_complex=True)
        power = spec.abs().pow(2)[..., :n_frames]
        power = F.pad(power, (0, n_frames - power.shape[-1]))
        chroma = self.chroma @ power
        energy = chroma.sum(dim=1)
        peak = energy.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        mask = energy > peak * 10 ** (SILENT_DB / 10)
        chroma = chroma / energy.clamp_min(1e-12)[:, None]
        return onset, chroma, mask


class FeatureHead(nn.Module):
    """Reads the quantized first-stage vector [B, D, F]: onset strength [B, F] and chroma logits [B, 12, F]."""

    def __init__(self, dimension: int) -> None:
        super().__init__()
        self.proj = nn.Conv1d(dimension, 13, kernel_size=1)

    def forward(self, first_stage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.proj(first_stage.float())
        return out[:, 0], out[:, 1:]


def feature_losses(head: FeatureHead, features: FrameFeatures, first_stage: torch.Tensor,
                   audio: torch.Tensor, onset_scale: str = "absolute") -> dict[str, torch.Tensor]:
    """{'onset': MSE on the onset strength, 'chroma': cross-entropy with the chroma distribution}.

    `onset_scale` "clip" standardizes each clip's onset strength (zero mean, unit variance), so
    that a clip's onsets count by their contrast within it, not by how loud a hit is."""
    onset, chroma, mask = features(audio)
    n = min(first_stage.shape[-1], onset.shape[-1])
    predicted_onset, chroma_logits = head(first_stage[..., :n])
    target = onset[:, :n]
    if onset_scale == "clip":
        target = (target - target.mean(dim=-1, keepdim=True)) / target.std(dim=-1, keepdim=True).clamp_min(1e-3)
    elif onset_scale != "absolute":
        raise ValueError(f"onset_scale must be 'absolute' or 'clip', got {onset_scale!r}")
    onset_loss = F.mse_loss(predicted_onset, target)
    log_p = F.log_softmax(chroma_logits, dim=1)
    per_frame = -(chroma[..., :n] * log_p).sum(dim=1)
    m = mask[:, :n].float()
    chroma_loss = (per_frame * m).sum() / m.sum().clamp_min(1.0)
    return {"onset": onset_loss, "chroma": chroma_loss}
