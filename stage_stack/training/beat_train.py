"""Training the beat tracker (stage_stack.models.beat_tracker) on the synthetic band.

Each song is rendered by `synth.generate_song` (deterministic by seed, at a tempo drawn from
`tempo_range`); the tracker hears the mix of every stem but the drums, which is what a drums
layer hears, and learns where the song's beats are (binary cross-entropy per frame; the frames
beside a beat count half). Minutes on one CPU thread: no checkpoints, a run is redone whole.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models.beat_tracker import BeatTracker, BeatTrackerConfig, save_beat_tracker
from .synth import generate_song


class BeatTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: Path  # the tracker file written at the end
    songs: int = Field(240, ge=1)
    seconds: float = Field(20.0, gt=2.0)  # per song
    seed_base: int = Field(100_000, ge=0)  # song i has seed seed_base + i (the held-out songs use 10000+)
    tempo_range: tuple[float, float] = (75.0, 165.0)
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(16, ge=1)
    window_frames: int = Field(1000, ge=16)  # frames per training excerpt (10 s)
    lr: float = Field(1e-3, gt=0)
    beat_weight: float = Field(5.0, gt=0)  # BCE's pos_weight: beats are ~1 frame in 50
    seed: int = 0
    threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "BeatTrainConfig":
        low, high = self.tempo_range
        if not 0 < low <= high:
            raise ValueError(f"tempo_range must be (low, high) with 0 < low <= high, got {self.tempo_range}")
        return self


def beat_targets(beats, frames: int, frame_rate: float) -> np.ndarray:
    """[frames] 1 at each beat's frame, 0.5 beside it, 0 elsewhere."""
    target = np.zeros(frames, np.float32)
    for beat in beats:
        i = int(round(beat * frame_rate))
        for j, weight in ((i - 1, 0.5), (i + 1, 0.5), (i, 1.0)):
            if 0 <= j < frames:
                target[j] = max(target[j], weight)
    return target


def training_songs(config: BeatTrainConfig, tracker: BeatTracker) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(features [2 n_mels, T], targets [T]) per song."""
    rng = np.random.default_rng(config.seed_base)
    out = []
    for i in range(config.songs):
        bpm = float(rng.uniform(*config.tempo_range))
        song = generate_song(config.seed_base + i, config.seconds, tracker.config.sample_rate, bpm=bpm)
        mix = np.sum([audio for stem, audio in song.stems.items() if stem != "drums"], axis=0).astype(np.float32)
        with torch.no_grad():
            features = tracker.features(torch.from_numpy(mix)[None])[0]
        out.append((features, beat_targets(song.metadata.beats, features.shape[-1], tracker.config.frame_rate)))
    return out


def train_beat_tracker(config: BeatTrainConfig, tracker_config: BeatTrackerConfig = BeatTrackerConfig(),
                       progress: bool = True) -> Path:
    """Train, write `config.output`, return its path."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tracker = BeatTracker(tracker_config)
    started = time.perf_counter()
    songs = training_songs(config, tracker)
    frames = min(config.window_frames, min(f.shape[-1] for f, _ in songs))
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.Adam(tracker.parameters(), lr=config.lr)
    pos_weight = torch.tensor(config.beat_weight)
    tracker.train()
    for step in range(1, config.steps + 1):
        picks = rng.integers(0, len(songs), config.batch_size)
        starts = [int(rng.integers(0, songs[i][0].shape[-1] - frames + 1)) for i in picks]
        x = torch.stack([songs[i][0][:, s:s + frames] for i, s in zip(picks, starts)])
        y = torch.from_numpy(np.stack([songs[i][1][s:s + frames] for i, s in zip(picks, starts)]))
        loss = F.binary_cross_entropy_with_logits(tracker(x), y, pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress and step % 500 == 0:
            print(f"step {step}/{config.steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s",
                  flush=True)
    tracker.eval()
    config.output.parent.mkdir(parents=True, exist_ok=True)
    training = {"config": config.model_dump(mode="json"), "tracker": asdict(tracker_config),
                "final_loss": round(float(loss.item()), 4), "seconds": round(time.perf_counter() - started, 1)}
    save_beat_tracker(config.output, tracker, training)
    return config.output
