"""Train a small EnCodec (`stage_stack.models.encodec`) on the stems of a multi-stem dataset.

The demo experts need a codec that is small enough to embed in every expert file and good
enough that drums and a pitched bass are recognisable after a round trip. Without network
access the project trains its own, on the synthetic band:

    audio clip (a stem, a mix of stems, or a click track)
      -> encoder -> latent [B, D, F]
      -> residual VQ (EMA codebooks, straight-through gradient to the encoder)
      -> decoder -> reconstruction
    loss = l1 * |x - y| + stft * multi-resolution STFT + mel * multi-scale log-mel
           + commitment * |latent residual - code|^2

There is no adversarial loss: it would double the cost and is not needed to make drum hits and
bass notes recognisable; the spectral losses keep the timbre, the waveform L1 keeps the phase
roughly right. The codebooks live in the model's own buffers (`embed`, `embed_avg`,
`cluster_size`, `inited`), trained here with exponential moving averages, a k-means start from
real latents and re-seeding of unused ("dead") codes, so the trained model encodes with the
stock `Codec.encode` and nothing else changes at inference.

Metrics (`evaluate_codec`) run the real encode/decode path on held-out songs: SI-SNR in dB and
the mel distance (mean absolute difference of log10 mel magnitudes, 64 bands, 1024-point FFT).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..audio import click_track
from ..errors import StageStackError
from ..expert import atomic_save_safetensors
from ..models.codec import Codec, CodecConfig
from .checkpoint import (interrupts_between_steps, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import CODEC_RESUME_KEYS, CodecTrainConfig, check_resume_compatible

log = logging.getLogger(__name__)


# -- spectral tools ----------------------------------------------------------------------------

def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, [n_mels, n_fft // 2 + 1], 0 Hz to Nyquist."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    edges = to_hz(np.linspace(0.0, to_mel(sample_rate / 2), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()


def magnitude(audio: torch.Tensor, n_fft: int) -> torch.Tensor:
    """|STFT| of [B, samples] with a Hann window and hop n_fft / 4 -> [B, bins, frames]."""
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio.float(), n_fft, hop_length=n_fft // 4, window=window, return_complex=True)
    return spec.abs()


LOG_FLOOR = 1e-3  # magnitudes below about -60 dB count as silence in the log-domain losses


class SpectralLoss(nn.Module):
    """Multi-resolution STFT loss (spectral convergence + log magnitude) and multi-scale log-mel L1.

    The log terms use a floor of LOG_FLOOR rather than a tiny epsilon: with 1e-5, the rests of a
    stem (exact digital silence) dominate the loss and the model learns to play everything quietly.
    """

    def __init__(self, sample_rate: int, stft_sizes: list[int], mel_sizes: list[int], n_mels: int) -> None:
        super().__init__()
        self.stft_sizes, self.mel_sizes = list(stft_sizes), list(mel_sizes)
        for n_fft in self.mel_sizes:
            self.register_buffer(f"mel_{n_fft}", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def stft(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        total = estimate.new_zeros(())
        for n_fft in self.stft_sizes:
            est, ref = magnitude(estimate, n_fft), magnitude(reference, n_fft)
            convergence = torch.linalg.norm(ref - est) / (torch.linalg.norm(ref) + 1e-7)
            log_mag = (torch.log(est + LOG_FLOOR) - torch.log(ref + LOG_FLOOR)).abs().mean()
            total = total + convergence + log_mag
        return total / len(self.stft_sizes)

    def mel(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        total = estimate.new_zeros(())
        for n_fft in self.mel_sizes:
            bank = getattr(self, f"mel_{n_fft}")
            est = torch.log(bank @ magnitude(estimate, n_fft) + LOG_FLOOR)
            ref = torch.log(bank @ magnitude(reference, n_fft) + LOG_FLOOR)
            total = total + (est - ref).abs().mean()
        return total / len(self.mel_sizes)


def si_snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SNR in dB (both signals zero-meaned)."""
    ref = reference - reference.mean()
    est = estimate - estimate.mean()
    target = (est @ ref) / (ref @ ref + 1e-12) * ref
    noise = est - target
    return float(10 * np.log10((target @ target + 1e-12) / (noise @ noise + 1e-12)))


def mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int, n_fft: int = 1024,
                 n_mels: int = 64) -> float:
    """Mean |log10 mel(reference) - log10 mel(estimate)| over bands and frames (0 = identical)."""
    bank = mel_filterbank(sample_rate, n_fft, n_mels)
    ref = bank @ magnitude(torch.from_numpy(reference)[None], n_fft)
    est = bank @ magnitude(torch.from_numpy(estimate)[None], n_fft)
    return float((torch.log10(ref + 1e-5) - torch.log10(est + 1e-5)).abs().mean())


# -- residual VQ training ----------------------------------------------------------------------

def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean, as `models.encodec.Codebook.encode`)."""
    dist = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)[None]
    return dist.argmin(dim=-1)


def kmeans(vectors: torch.Tensor, n_codes: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from random data points; empty clusters keep their previous centre."""
    pick = torch.randint(len(vectors), (n_codes,), generator=generator, device="cpu").to(vectors.device)
    centres = vectors[pick].clone()
    for _ in range(iters):
        assign = nearest_code(vectors, centres)
        counts = torch.bincount(assign, minlength=n_codes).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class EMAQuantizer:
    """Trains the codebooks of a `models.encodec.ResidualVectorQuantizer` in place.

    Not an nn.Module: it owns no tensors, only the update rule for the quantizer's buffers.
    """

    def __init__(self, quantizer: nn.Module, n_q: int, decay: float, dead_code_threshold: float,
                 eps: float = 1e-5) -> None:
        self.codebooks = [layer.codebook for layer in quantizer.layers[:n_q]]
        self.decay, self.dead_code_threshold, self.eps = decay, dead_code_threshold, eps

    @property
    def initialised(self) -> bool:
        return all(bool(cb.inited.item()) for cb in self.codebooks)

    def mark_uninitialised(self) -> None:
        for cb in self.codebooks:
            cb.inited.fill_(0)

    @torch.no_grad()
    def kmeans_init(self, latents: torch.Tensor, iters: int, generator: torch.Generator) -> None:
        """Initialise stage after stage on the residuals of real latents [N, D]."""
        residual = latents.float()
        for cb in self.codebooks:
            centres = kmeans(residual, cb.embed.shape[0], iters, generator)
            cb.embed.copy_(centres)
            cb.embed_avg.copy_(centres)
            cb.cluster_size.fill_(1.0)
            cb.inited.fill_(1)
            residual = residual - centres[nearest_code(residual, centres)]

    def __call__(self, latent: torch.Tensor, update: bool, generator: torch.Generator | None = None,
                 first_stage: bool = False):
        """latent [B, D, F] -> (quantized [B, D, F] with a straight-through gradient,
        codes [B, n_q, F], commitment loss averaged over stages), plus the first stage's quantized
        vector [B, D, F] (also straight-through) when `first_stage`."""
        B, D, n_frames = latent.shape
        x = latent.transpose(1, 2).reshape(-1, D)
        residual, total, commitment, codes = x, torch.zeros_like(x), x.new_zeros(()), []
        for cb in self.codebooks:
            idx = nearest_code(residual.detach(), cb.embed)
            code = cb.embed[idx]  # a buffer: no gradient flows into the codebook
            commitment = commitment + F.mse_loss(residual, code)
            if update:
                self._ema_update(cb, residual.detach(), idx, generator)
            if not codes:
                first = x + (code - x).detach()
            total = total + code
            residual = residual - code
            codes.append(idx.view(B, n_frames))
        quantized = x + (total - x).detach()
        out = (quantized.view(B, n_frames, D).transpose(1, 2), torch.stack(codes, dim=1),
               commitment / len(self.codebooks))
        return out + (first.view(B, n_frames, D).transpose(1, 2),) if first_stage else out

    @torch.no_grad()
    def _ema_update(self, cb, vectors: torch.Tensor, idx: torch.Tensor, generator) -> None:
        n_codes = cb.embed.shape[0]
        counts = torch.bincount(idx, minlength=n_codes).float()
        sums = torch.zeros_like(cb.embed).index_add_(0, idx, vectors.float())
        cb.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        cb.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = cb.cluster_size.sum()
        smoothed = (cb.cluster_size + self.eps) / (total + n_codes * self.eps) * total  # Laplace smoothing
        cb.embed.copy_(cb.embed_avg / smoothed[:, None])
        # Codes nobody uses get a fresh start on a random current vector, so every code stays in play.
        dead = (cb.cluster_size < self.dead_code_threshold).nonzero().squeeze(-1)
        if len(dead):
            pick = torch.randint(len(vectors), (len(dead),), generator=generator, device="cpu").to(vectors.device)
            cb.embed[dead] = vectors[pick]
            cb.embed_avg[dead] = vectors[pick] * self.dead_code_threshold
            cb.cluster_size[dead] = self.dead_code_threshold


# -- initialisation ----------------------------------------------------------------------------

@torch.no_grad()
def fresh_codec(config: CodecConfig, seed: int) -> Codec:
    """The codec a training run starts from, after `torch.manual_seed(seed)`.

    The shipped demo codecs were trained when `Codec` wrapped transformers' EncodecModel, so the
    start is drawn as it was then: transformers' init (its LSTM init, its draws from the torch
    RNG) and `init_codec_weights`, copied into our model. Our own init runs on a forked RNG and
    is overwritten, so the global RNG stream the training draws from next is unchanged too.
    """
    from transformers import EncodecModel as ReferenceEncodec

    torch.manual_seed(seed)
    reference = ReferenceEncodec(config.to_hf())
    init_codec_weights(reference)
    with torch.random.fork_rng():
        codec = Codec(config)
    codec.model.load_state_dict(reference.state_dict())
    return codec


@torch.no_grad()
def init_codec_weights(model: nn.Module, gain: float = 1.0) -> None:
    """Variance-preserving init for a fresh EnCodec: normal weights with std gain / sqrt(fan_in), zero biases.

    The init of PyTorch and transformers for the weight-normed convolutions goes through the
    computed `weight`, which does not reach the stored `original0` / `original1`, so a fresh
    model keeps PyTorch's default init: every conv shrinks the signal (about 1/3 of the variance) and the default
    biases then dominate. The decoder's output ignores its input (measured: 99 % of it is the
    same for any latent) and training sits at "play a constant hum". With this init the
    autoencoder reaches 0 dB SI-SNR within about 50 steps instead of not at all.
    """
    for module in model.modules():
        if not isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) or not hasattr(module, "parametrizations"):
            continue
        direction = module.parametrizations.weight.original1
        if isinstance(module, nn.Conv1d):
            fan_in = direction.shape[1] * direction.shape[2]
        else:  # [in, out, k]: each output sample sums in * k / stride inputs
            fan_in = direction.shape[0] * direction.shape[2] / module.stride[0]
        direction.normal_(0.0, gain / math.sqrt(fan_in))
        module.parametrizations.weight.original0.copy_(
            direction.norm(dim=tuple(range(1, direction.dim())), keepdim=True))
        if module.bias is not None:
            module.bias.zero_()


# -- data --------------------------------------------------------------------------------------

@dataclass
class SongAudio:
    song_id: str
    stems: dict[str, np.ndarray]  # stem -> float32 [samples] at the codec rate


def load_songs(root: str | Path, sample_rate: int, limit: int | None = None,
               stems: tuple[str, ...] | None = None) -> tuple[list[SongAudio], dict]:
    """Every usable song of a MoisesDB-style folder, fully decoded at `sample_rate` (only `stems`
    of each, when given: a song with none of them is left out).

    Bad songs are skipped with a counted warning (`scan_songs` / `BadSong`); returns (songs, skip counts).
    """
    from ..audio import resample
    from .data import BadSong, read_stem, scan_songs

    sources, skipped, _ = scan_songs(root)
    songs = []
    for source in sources[:limit]:
        names = [s for s in source.stems if stems is None or s in stems]
        if not names:
            continue
        try:
            audio = {s: resample(read_stem(source, s, 0, source.num_frames), source.sample_rate, sample_rate)
                     for s in names}
        except BadSong as e:
            skipped[e.reason] += 1
            log.warning("skipping song %s (%s): %s", source.song_id, e.reason, e)
            continue
        songs.append(SongAudio(source.song_id, audio))
    if not songs:
        wanted = "" if stems is None else f" with a stem among {', '.join(stems)} (data.stems)"
        raise StageStackError(f"{root}: no usable songs{wanted} for codec training "
                              f"(skipped: {dict(skipped) or 'none'})")
    return songs, dict(skipped)


class ClipSampler:
    """Training clips for step `s`, drawn from a generator seeded by (seed, s): resuming at step s
    gives the same clips as an uninterrupted run, with no sampler state to save."""

    def __init__(self, songs: list[SongAudio], sample_rate: int, segment_seconds: float, mix_prob: float,
                 click_prob: float, silence_threshold: float, seed: int) -> None:
        self.songs, self.sample_rate = songs, sample_rate
        self.length = int(round(segment_seconds * sample_rate))
        self.mix_prob, self.click_prob, self.silence_threshold, self.seed = mix_prob, click_prob, silence_threshold, seed

    def batch(self, step: int, batch_size: int, stream: int = 0) -> torch.Tensor:
        """Clips [batch, 1, samples]; stream 0 is training, stream 1 the k-means initialisation."""
        rng = np.random.default_rng([self.seed, stream, step])
        return torch.from_numpy(np.stack([self.clip(rng) for _ in range(batch_size)]))[:, None]

    def clip(self, rng: np.random.Generator) -> np.ndarray:
        kind = rng.random()
        if kind < self.click_prob:
            bpm = rng.uniform(70, 170)
            beats = np.arange(rng.uniform(0, 60 / bpm), self.length / self.sample_rate, 60 / bpm)
            return click_track(beats, beats[int(rng.integers(4))::4], self.sample_rate, self.length)
        for _ in range(10):  # a few tries to find an audible window
            song = self.songs[int(rng.integers(len(self.songs)))]
            names = sorted(song.stems)
            if kind < self.click_prob + self.mix_prob and len(names) > 1:
                chosen = rng.choice(names, size=int(rng.integers(2, len(names) + 1)), replace=False)
            else:
                chosen = [names[int(rng.integers(len(names)))]]
            n = len(song.stems[names[0]])
            start = int(rng.integers(0, max(n - self.length, 0) + 1))
            clip = np.sum([song.stems[s][start:start + self.length] for s in chosen], axis=0)
            clip = np.pad(clip, (0, self.length - len(clip)))
            if np.abs(clip).max() >= self.silence_threshold:
                break
        return clip.astype(np.float32)


# -- evaluation --------------------------------------------------------------------------------

def eval_clips(songs: list[SongAudio], sample_rate: int, seconds: float) -> dict[str, list[np.ndarray]]:
    """Held-out clips per kind: each stem, the full mix, and a 120 BPM click track."""
    n = int(round(seconds * sample_rate))
    clips: dict[str, list[np.ndarray]] = {}
    for song in songs:
        for stem, audio in song.stems.items():
            clips.setdefault(stem, []).append(audio[:n])
        clips.setdefault("mix", []).append(np.sum([a[:n] for a in song.stems.values()], axis=0))
    beats = np.arange(0, seconds, 0.5)
    clips["click"] = [click_track(beats, beats[::4], sample_rate, n)]
    return clips


@torch.no_grad()
def evaluate_codec(codec: Codec, clips: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    """Round trip through `Codec.encode` / `Codec.decode`; mean SI-SNR (dB) and mel distance per kind."""
    codec.eval()
    device = next(codec.parameters()).device
    sr = codec.config.sample_rate
    results = {}
    for kind, audios in clips.items():
        snrs, mels = [], []
        for audio in audios:
            x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None].to(device)
            y = codec.decode(codec.encode(x))[0, 0, : x.shape[-1]].cpu().numpy()
            snrs.append(si_snr(audio, y))
            mels.append(mel_distance(audio.astype(np.float32), y, sr))
        results[kind] = {"si_snr_db": round(float(np.mean(snrs)), 3), "mel_distance": round(float(np.mean(mels)), 4)}
    return results


# -- the codec file ----------------------------------------------------------------------------

def save_trained_codec(path: str | Path, codec: Codec, codec_id: str, training: dict) -> Path:
    """`expert.save_codec`'s format plus a `training` entry (config, metrics, data) in the metadata."""
    meta = {"kind": json.dumps("codec"), "id": json.dumps(codec_id),
            "codec_config": json.dumps(codec.config.to_dict()), "training": json.dumps(training)}
    return atomic_save_safetensors(codec.model.state_dict(), path, meta)


def load_codec_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[Codec, dict]:
    """A codec from a codec file (`save_codec` format) or from an expert that embeds one.

    Returns (codec, training info recorded in the file, or {}).
    """
    from safetensors import safe_open

    from ..expert import ExpertMetadata, read_header

    path = Path(path)
    header, entries = read_header(path)
    header = header or {}
    if header.get("format_version"):  # an expert file
        meta = ExpertMetadata.from_header(header, str(path))
        if not meta.codec.embedded:
            raise StageStackError(f"{path}: this expert references its codec instead of embedding it; "
                                  f"point 'codec' at the codec file {meta.codec.filename} instead")
        config, prefix, info = meta.codec_cfg, "codec.", meta.training.get("codec", {})
    elif header.get("kind") == json.dumps("codec"):
        config, prefix = CodecConfig.from_dict(json.loads(header["codec_config"])), ""
        info = json.loads(header.get("training", "{}"))
    else:
        raise StageStackError(f"{path}: neither a codec file (metadata kind 'codec') nor an expert file; "
                              "train one with `stage-stack train-codec CONFIG.yaml`")
    codec = Codec(config)
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for name in codec.model.state_dict():
            if prefix + name not in entries:
                raise StageStackError(f"{path}: codec tensor '{prefix + name}' is missing; the file is not a "
                                      f"codec with config {config}")
            state[name] = f.get_tensor(prefix + name)
    codec.model.load_state_dict(state)
    return codec.to(device).eval(), info


# -- training ----------------------------------------------------------------------------------

def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class CodecTrainResult:
    output: Path | None  # the codec file (None when the session stopped before max_steps)
    steps: int
    seconds: float  # this session
    history: list[dict]
    metrics: dict


def train_codec(config: CodecTrainConfig, resume: bool = False, progress: bool = True,
                stop_after: int | None = None) -> CodecTrainResult:
    """Train the codec described by `config`.

    Checkpoints go to `config.run_dir`; with `resume` the newest one is continued. A run dir
    that already holds checkpoints is never overwritten without `resume`. `stop_after` ends the
    session after that many steps (checkpointing first), as an interruption would.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    accelerator = Accelerator(cpu=config.cpu)
    if accelerator.num_processes > 1:
        raise StageStackError("codec training runs in one process (its EMA codebooks are not synchronised); "
                              "launch it without `accelerate launch`/torchrun")
    device = accelerator.device
    run_dir = Path(config.run_dir)
    codec_cfg = config.codec_config

    codec = fresh_codec(codec_cfg, config.seed).to(device)
    quantizer = EMAQuantizer(codec.model.quantizer, codec_cfg.n_q, config.quantizer.ema_decay,
                             config.quantizer.dead_code_threshold)
    quantizer.mark_uninitialised()
    if config.init_from is not None:
        start, _ = load_codec_file(config.init_from)
        if start.config != codec_cfg:
            raise StageStackError(f"init_from {config.init_from}: its codec config {start.config.to_dict()} differs "
                                  f"from the config's 'codec' {codec_cfg.to_dict()}")
        codec.model.load_state_dict(start.model.state_dict())
    trained = "" if config.train_encoder else "decoder."  # frozen encoder: only the decoder learns
    for name, p in codec.model.named_parameters():  # (the codebooks are buffers: EMA, not gradients)
        p.requires_grad_(name.startswith(trained))
    params = [p for p in codec.model.parameters() if p.requires_grad]
    # The feature head is a training aid (codec_features.py says why); it is not in the codec file.
    taught = config.train_encoder and (config.loss.onset > 0 or config.loss.chroma > 0)
    head = features = None
    if taught:
        from .codec_features import FeatureHead, FrameFeatures, feature_losses

        head = FeatureHead(codec_cfg.dimension).to(device)
        features = FrameFeatures(codec_cfg.sample_rate, codec_cfg.hop_length).to(device)
        params += list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, config.max_steps))
    spectral = SpectralLoss(codec_cfg.sample_rate, config.loss.stft_sizes, config.loss.mel_sizes,
                            config.loss.n_mels).to(device)

    step, history = 0, []
    found = latest_checkpoint(run_dir)
    if found is not None and not resume:
        raise StageStackError(f"{run_dir} already holds checkpoints ({found.name}); pass --resume to continue "
                              "that run, or set a new run_dir")
    if found is None and resume:
        raise StageStackError(f"nothing to resume: {run_dir} holds no checkpoints ({run_dir / 'checkpoints'}/"
                              "step-*.pt). Check run_dir in the config, or leave out --resume to start the run")
    if found is not None:
        state = load_checkpoint(found, device)
        check_resume_compatible(state["config"], config, CODEC_RESUME_KEYS, run_dir)
        codec.model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["feature_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
        log.info("resumed %s at step %d", run_dir, step)
    run_dir.mkdir(parents=True, exist_ok=True)

    for root, synth in ((config.data.root, config.data.synth), (config.data.valid_root, config.data.valid_synth)):
        if synth is not None:
            synth.ensure(root)
    songs, skipped = load_songs(config.data.root, codec_cfg.sample_rate, stems=config.data.stems)
    valid_songs, valid_skipped = load_songs(config.data.valid_root, codec_cfg.sample_rate, config.eval.n_songs)
    sampler = ClipSampler(songs, codec_cfg.sample_rate, config.data.segment_seconds, config.data.mix_prob,
                          config.data.click_prob, config.data.silence_threshold, config.seed)
    clips = eval_clips(valid_songs, codec_cfg.sample_rate, config.eval.seconds)
    codec.model, optimizer = accelerator.prepare(codec.model, optimizer)

    def checkpoint() -> None:
        save_checkpoint(run_dir, step, {
            "model": accelerator.unwrap_model(codec.model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step, "history": history,
            "config": config.model_dump(mode="json"),
            **({"feature_head": head.state_dict()} if head is not None else {})}, config.keep_checkpoints)

    if not quantizer.initialised:
        gen = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            latents = [codec.model.encoder(sampler.batch(i, config.data.batch_size, stream=1).to(device))
                       for i in range(config.quantizer.init_batches)]
        latents = torch.cat([z.transpose(1, 2).reshape(-1, z.shape[1]) for z in latents])
        quantizer.kmeans_init(latents, config.quantizer.kmeans_iters, gen)

    started, session_steps = time.time(), 0
    bar = tqdm(total=config.max_steps, initial=step, desc="codec", disable=not progress, dynamic_ncols=True)
    codec.train()
    at_boundary = True  # a Ctrl-C waits for the end of its step (training.checkpoint.interrupts_between_steps)
    try:
        with interrupts_between_steps(progress) as interrupted:
            while step < config.max_steps:
                at_boundary = False
                x = sampler.batch(step, config.data.batch_size).to(device)
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                with accelerator.autocast(), torch.set_grad_enabled(config.train_encoder):
                    latent = codec.model.encoder(x)
                quantized, _, commitment, *first = quantizer(latent.float(), update=config.train_encoder,
                                                             generator=gen, first_stage=taught)
                with accelerator.autocast():
                    y = codec.model.decoder(quantized)[..., : x.shape[-1]]
                y, x2 = y.float()[:, 0], x[:, 0]
                parts = {"l1": (y - x2).abs().mean(), "stft": spectral.stft(y, x2), "mel": spectral.mel(y, x2),
                         "commitment": commitment}
                if taught:
                    parts.update(feature_losses(head, features, first[0], x2, config.loss.onset_scale))
                loss = sum(getattr(config.loss, k) * v for k, v in parts.items())
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if config.grad_clip_norm is not None:
                    accelerator.clip_grad_norm_(params, config.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                session_steps += 1
                record = {"step": step, "loss": round(loss.item(), 5), **{k: round(v.item(), 5) for k, v in parts.items()}}
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", mel=f"{record['mel']:.3f}")
                if step % config.log_every == 0:
                    history.append(record)
                    log.info("codec step %d %s", step, record)
                if step % config.eval_every == 0 or step == config.max_steps:
                    metrics = evaluate_codec(codec, clips)
                    history.append({"step": step, "eval": metrics})
                    log.info("codec step %d eval %s", step, metrics)
                    codec.train()
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    checkpoint()
                at_boundary = True
                if stop_after is not None and session_steps >= stop_after:
                    checkpoint()
                    break
                if interrupted():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if at_boundary:
            checkpoint()  # nothing learnt so far is lost; `--resume` continues from here
        bar.close()
        raise
    bar.close()

    if step < config.max_steps:
        return CodecTrainResult(None, step, time.time() - started, history, {})
    metrics = evaluate_codec(codec, clips)
    training = {"steps": step, "init_from": str(config.init_from) if config.init_from else None,
                "data": str(config.data.root), "songs": len(songs), "skipped": skipped,
                "valid_data": str(config.data.valid_root), "valid_songs": len(valid_songs),
                "metrics": metrics, "config": config.model_dump(mode="json")}
    out = save_trained_codec(config.output, codec, config.id, training)
    (run_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": history}, indent=1))
    return CodecTrainResult(out, step, time.time() - started, history, metrics)
