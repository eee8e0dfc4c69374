"""The STAGE fine-tuning recipe on Accelerate (reference §5): `train(config)` / `stage-stack train`.

    base expert (imported MusicGen, another expert) or a fresh small StageLM
      + pre-tokenized pairs (context codes, target codes, description)
      -> TokenLayout.training_batch  (context dropout -> PAD rows, for CFG)
      -> StageLM (text memory from the frozen T5, with text and word dropout, when the LM has
         cross-attention)
      -> TokenLayout.loss            (the reference's masked per-codebook cross-entropy)
      -> AdamW with two parameter groups and the paper's two phases:
           phase 1: embeddings (SEP row included) + text projection only, at a boosted LR;
           phase 2: everything, the rest of the model ramping up from 0.

What makes a run resumable exactly: every random draw is a function of (seed, step) or of the
sample index (the data), the checkpoint holds model, optimizer, scheduler, the global RNGs,
the step and the data position, and checkpoints are only taken between optimizer steps: a
Ctrl-C is held until the step it falls in is complete (a second one stops at once, without a
checkpoint), so no checkpoint ever holds half a step. A
resumed run therefore computes the same losses and weights as one that was never stopped.

Accelerate provides the device, DDP across processes (`accelerate launch -m stage_stack
train ...`), mixed precision (`mixed_precision: bf16|fp16`) and loss scaling; gradient
accumulation is explicit below (`no_sync` on all but the last micro-batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import faults
from ..atomic import atomic_write_text
from ..chords import CHORD_CLASSES
from ..errors import StageStackError, TrainingConfigError
from ..expert import ExpertMetadata, context_codec_mismatches, load_expert
from ..layout import TokenLayout, with_chord_row
from ..models.codec import Codec
from ..models.stage_lm import StageLM, StageLMConfig, init_weights
from .auxiliary import HEADS, auxiliary_heads, head_loss, head_weights, scored_rows
from .checkpoint import (interrupts_between_steps, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import RESUME_KEYS, TrainConfig, check_resume_compatible

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict], None]  # (step just completed, its record)


# -- the model to start from -------------------------------------------------------------------

@dataclass
class Base:
    lm: StageLM
    codec: Codec
    metadata: ExpertMetadata | None  # None for a fresh LM
    text: object | None = None  # models.text.TextConditioner when the LM uses text
    codec_info: dict = field(default_factory=dict)  # codec id and metrics, for the model card
    source: str = ""
    context_codec: Codec | None = None  # encodes the contexts when the expert has its own
    context_codec_info: dict = field(default_factory=dict)


def load_base(config: TrainConfig) -> Base:
    """The LM to fine-tune (float32, CPU) with its codec and text conditioner."""
    spec = config.base
    if spec.expert is not None:
        expert = load_expert(spec.expert, device="cpu", dtype="float32")
        info = expert.metadata.training.get("codec", {"id": expert.metadata.codec.id or "embedded"})
        lm_cfg = expert.metadata.lm_cfg
        if lm_cfg.cross_attention and expert.text is None:
            raise StageStackError(f"{spec.expert}: the LM uses text cross-attention but its text encoder was not "
                                  "found; install it (see `stage-stack install`) before training")
        context_info = expert.metadata.training.get("context_codec", {})
        codec = expert.codec
        if spec.codec is not None:
            codec, info = _same_codes_codec(spec.codec, expert.codec, spec.expert)
        lm = expert.lm.train()
        if spec.add_chord_stream:
            lm = add_chord_stream(lm, config.seed, spec.expert)
        context_codec = expert.context_codec
        if spec.add_context_codec is not None:
            if context_codec is not None:
                raise TrainingConfigError(f"{spec.expert} already hears through a context codec; remove "
                                          "base.add_context_codec")
            context_codec, context_info = _load_context_codec(spec.add_context_codec, codec, "base.add_context_codec",
                                                              f"the codec of base.expert ({spec.expert})")
            lm = add_context_rows(lm, context_codec.config.card, config.seed)
        return Base(lm, codec, expert.metadata, expert.text, info, str(spec.expert), context_codec, context_info)

    from .codec_train import load_codec_file

    fresh = spec.fresh
    codec, codec_training = load_codec_file(fresh.codec)

    context_codec, context_info = None, {}
    if fresh.context_codec is not None:
        context_codec, context_info = _load_context_codec(fresh.context_codec, codec, "base.fresh.context_codec",
                                                          f"base.fresh.codec ({fresh.codec})")
    lm_cfg = StageLMConfig(dim=fresh.dim, n_layers=fresh.n_layers, n_heads=fresh.n_heads, ffn_dim=fresh.ffn_dim,
                           card=codec.config.card, n_q=codec.config.n_q, cross_attention=False,
                           positions=fresh.positions,
                           context_card=0 if context_codec is None else context_codec.config.card,
                           chord_classes=CHORD_CLASSES if fresh.chord_stream else 0)
    lm = init_weights(StageLM(lm_cfg), seed=fresh.init_seed).train()
    return Base(lm, codec, None, None, _codec_info(fresh.codec, codec_training), f"fresh {lm_cfg}", context_codec,
                context_info)


def _load_context_codec(path: Path, codec: Codec, field_name: str, codec_named: str) -> tuple[Codec, dict]:
    """The context codec file at `path` (config field `field_name`) and its card info, refused
    unless it shares `codec`'s (`codec_named`) sample rate, frame rate and codebook count."""
    from .codec_train import load_codec_file

    context_codec, training = load_codec_file(path)
    for name, theirs, mine in context_codec_mismatches(codec.config, context_codec.config):
        raise TrainingConfigError(f"{field_name} ({path}) has {name} {theirs}, but {codec_named} has {mine}: the two "
                                  "codecs must share the sample rate, frame rate and number of codebooks")
    return context_codec, _codec_info(path, training)


def add_chord_stream(lm: StageLM, seed: int, source: Path | str = "the base expert") -> StageLM:
    """A copy of `lm` with a chord stream first (stage_stack.chords): its streams move one place
    up, with their embeddings and heads; the chord stream's table and head are fresh (`seed`)."""
    if lm.config.chord_classes:
        raise TrainingConfigError(f"{source} already has a chord stream ({lm.config.chord_classes} classes); "
                                  "remove base.add_chord_stream")
    grown = init_weights(StageLM(replace(lm.config, chord_classes=CHORD_CLASSES)), seed=seed)
    renamed = {}
    for key, value in lm.state_dict().items():
        prefix, _, rest = key.partition(".")
        if prefix in ("embeddings", "heads"):
            index, _, name = rest.partition(".")
            key = f"{prefix}.{int(index) + 1}.{name}"
        renamed[key] = value
    missing, unexpected = grown.load_state_dict(renamed, strict=False)
    if unexpected or sorted(missing) != ["embeddings.0.weight", "heads.0.weight"]:
        raise AssertionError(f"chord stream surgery: missing {missing}, unexpected {unexpected}")
    return grown.train()


def add_context_rows(lm: StageLM, context_card: int, seed: int) -> StageLM:
    """A copy of a one-codec `lm` that hears through a context codec of `context_card` codes:
    every embedding table keeps its rows and gains fresh ones (`seed`) for the context's codes
    (StageLMConfig.context_card, layout.TokenLayout.context_offset)."""
    grown = init_weights(StageLM(replace(lm.config, context_card=context_card)), seed=seed)
    state = lm.state_dict()
    with torch.no_grad():
        for name, value in grown.state_dict().items():
            old = state[name]
            if name.startswith("embeddings."):
                value[: old.shape[0]] = old
            else:
                value.copy_(old)
    return grown.train()


def _same_codes_codec(path: Path, current: Codec, expert_path: Path) -> tuple[Codec, dict]:
    """base.codec: the codec file at `path` (and its card info), refused unless it gives the same
    codes as the base expert's own codec."""
    from .codec_train import load_codec_file

    codec, training = load_codec_file(path)
    if codec_fingerprint(codec) != codec_fingerprint(current):
        raise TrainingConfigError(
            f"base.codec ({path}) gives other codes than the codec embedded in base.expert ({expert_path}): its "
            f"config, encoder or codebooks differ. Use a codec trained from that one with `train_encoder: false` "
            f"(its decoder alone retrained), or leave base.codec out")
    return codec, _codec_info(path, training)


def _codec_info(path: Path, training: dict) -> dict:
    """A trained codec's id, metrics and file, for the model card."""
    return {"id": training.get("config", {}).get("id", Path(path).stem), "metrics": training.get("metrics", {}),
            "file": str(path)}


def codec_fingerprint(codec: Codec) -> str:
    """sha256 of what decides the codes (config, encoder, codebooks): names the token cache.

    The decoder is left out on purpose: a codec whose decoder was retrained with a frozen
    encoder (`train-codec` with `train_encoder: false`) gives the same codes, so it shares the
    cache and can continue or re-export a run.
    """
    h = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(codec.model.state_dict().items()):
        if not name.startswith(("encoder.", "quantizer.")):
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- data --------------------------------------------------------------------------------------

def cache_dirs(config: TrainConfig, codec: Codec) -> tuple[Path, Path | None]:
    """(training cache, separate validation cache or None) under `data.cache`, each named by its
    songs folder and a key over that folder, the codec's codes and the augmentation settings."""
    d = config.data
    codes = codec_fingerprint(codec)

    def folder(root: Path, variants: int) -> Path:
        settings = {"root": str(Path(root).resolve()), "codec": codes, "variants": variants, "speed": list(d.speed),
                    "pitch": list(d.pitch), "mixes": d.max_mixes_per_target}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return Path(d.cache) / f"{Path(root).name}-{key}"

    return folder(d.root, d.variants), folder(d.valid_root, 1) if d.valid_root is not None else None


def build_datasets(config: TrainConfig, codec: Codec, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                   progress: bool = False, context_codec: Codec | None = None, chord_stream: bool = False):
    """Write the synthetic songs if configured, pre-tokenize (main process), then the pair datasets.

    With a `context_codec` the songs are pre-tokenized with both codecs (each into its own
    cache) and the pairs take their contexts from the context codec's cache. `chord_stream`:
    the LM has one, so the pairs carry each target frame's chord.
    """
    from .token_cache import TokenPairDataset, pretokenize

    d = config.data
    train_dir, valid_dir = cache_dirs(config, codec)
    ctx_train_dir, ctx_valid_dir = cache_dirs(config, context_codec) if context_codec is not None else (None, None)
    if is_main:
        for root, synth in ((d.root, d.synth), (d.valid_root, d.valid_synth)):
            if root is not None and synth is not None:
                synth.ensure(root)
        for c, t_dir, v_dir in ((codec, train_dir, valid_dir), (context_codec, ctx_train_dir, ctx_valid_dir)):
            if c is None:
                continue
            c.eval()
            pretokenize(d.root, c, t_dir, variants=d.variants, speed=d.speed, pitch=d.pitch,
                        max_mixes_per_target=d.max_mixes_per_target, progress=progress)
            if v_dir is not None:
                pretokenize(d.valid_root, c, v_dir, variants=1, max_mixes_per_target=d.max_mixes_per_target,
                            progress=progress)
    wait()
    pair_args = dict(target_stem=d.target_stem, segment_seconds=d.segment_seconds, context_seconds=d.context_seconds,
                     full_context_prob=d.full_context_prob, click_prob=d.click_prob, context_stems=d.context_stems,
                     chord_labels=bool(config.loss.harmony_weight) or chord_stream,
                     beat_labels=bool(config.loss.beat_weight))
    if valid_dir is None:
        train = TokenPairDataset(train_dir, split="train", n_valid=d.n_valid, identity_prob=d.identity_prob,
                                 seed=config.seed, source=d.root, context_cache_dir=ctx_train_dir,
                                 all_stems_prob=d.all_stems_prob, **pair_args)
        valid = TokenPairDataset(train_dir, split="valid", n_valid=d.n_valid, identity_prob=1.0,
                                 samples_per_epoch=d.valid_samples, seed=config.seed + 1, source=d.root,
                                 context_cache_dir=ctx_train_dir, **pair_args)
    else:
        train = TokenPairDataset(train_dir, split="all", identity_prob=d.identity_prob, seed=config.seed,
                                 source=d.root, context_cache_dir=ctx_train_dir, all_stems_prob=d.all_stems_prob,
                                 **pair_args)
        valid = TokenPairDataset(valid_dir, split="all", identity_prob=1.0, samples_per_epoch=d.valid_samples,
                                 seed=config.seed + 1, source=d.valid_root, context_cache_dir=ctx_valid_dir,
                                 **pair_args)
    return train, valid


def pairs_at(dataset, positions: list[int]) -> list:
    """Items at global sample positions: position p is item p mod len of epoch p // len."""
    items = []
    for p in positions:
        epoch, index = divmod(p, len(dataset))
        dataset.set_epoch(epoch)
        items.append(dataset[index])
    return items


# -- optimisation ------------------------------------------------------------------------------

def is_embedding_param(name: str) -> bool:
    """Phase-1 parameters: the token embeddings (SEP row included) and the text projection."""
    return name.startswith(("embeddings.", "text_proj."))


def param_groups(lm: StageLM) -> list[dict]:
    embed = [p for n, p in lm.named_parameters() if is_embedding_param(n)]
    rest = [p for n, p in lm.named_parameters() if not is_embedding_param(n)]
    return [{"params": embed, "name": "embeddings"}, {"params": rest, "name": "rest"}]


def lr_factors(config: TrainConfig) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """LambdaLR factors (embeddings group, rest group) per optimizer step (reference §5)."""
    s = config.schedule
    phase1, ramp = s.embed_only_steps, s.unfreeze_ramp_steps

    def decay(step: int) -> float:
        start = phase1 + ramp
        if s.min_lr_ratio >= 1 or step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, s.max_steps - start))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def embeddings(step: int) -> float:
        if step < phase1:
            return 1.0 + s.embed_lr_boost * (1.0 - step / phase1)
        return decay(step)

    def rest(step: int) -> float:
        if step < phase1:
            return 0.0
        if step < phase1 + ramp:
            return (step - phase1 + 1) / ramp * decay(step)
        return decay(step)

    return embeddings, rest


def zero_pad_row_grads(lm: StageLM) -> None:
    """PAD rows get no gradient (upstream's padding_idx), so AdamW keeps them exactly zero."""
    pad = lm.config.pad_token
    for emb in lm.embeddings:
        emb.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([pad], device=g.device), 0.0))


def base_fingerprints(base: Base) -> tuple[str, str | None]:
    """codec_fingerprint of the base's codec and of its context codec (None without one)."""
    return codec_fingerprint(base.codec), None if base.context_codec is None else codec_fingerprint(base.context_codec)


def check_resumable(state: dict, config: TrainConfig, codes_fingerprint: str,
                    context_fingerprint: str | None = None) -> None:
    """Refuse to continue a checkpoint with a config or codec that would train something else."""
    check_resume_compatible(state["config"], config, RESUME_KEYS, Path(config.run_dir))
    fresh = config.base.fresh
    for field_name, saved, now, source in (
            ("codec", state["codec_fingerprint"], codes_fingerprint, config.base.expert or (fresh and fresh.codec)),
            ("context codec", state.get("context_codec_fingerprint"), context_fingerprint,
             config.base.expert or (fresh and fresh.context_codec))):
        if saved != now:
            raise TrainingConfigError(
                f"{config.run_dir}: cannot resume: the {field_name} ({source}) encodes differently from the one this "
                "run was trained with (or one of the two runs has none). Point the config at that codec again (a "
                "codec whose decoder alone was retrained is fine).")


# -- the trainer -------------------------------------------------------------------------------

CLICK_SHIFT_SECONDS = 0.25  # validation: how far `val_loss_click_shifted` moves the click


class Trainer:
    """One training run: owns the accelerator, the model, the optimizer and the data position."""

    def __init__(self, config: TrainConfig, base: Base, train_data, valid_data, accelerator) -> None:
        self.config, self.base, self.accelerator = config, base, accelerator
        self.train_data, self.valid_data = train_data, valid_data
        self.lm = base.lm
        cfg = self.lm.config
        if config.loss.chord_weight != 1.0 and not cfg.chord_classes:
            raise TrainingConfigError(f"loss.chord_weight is {config.loss.chord_weight:g} but this LM has no chord "
                                      "stream; set it to 1, or give the LM one (base.fresh.chord_stream or "
                                      "base.add_chord_stream)")
        self.layout = TokenLayout.for_config(cfg)
        self.use_text = cfg.cross_attention and base.text is not None
        self.codes_fingerprint, self.context_fingerprint = base_fingerprints(base)
        zero_pad_row_grads(self.lm)
        self.heads = auxiliary_heads(config.loss, cfg.dim, config.seed)
        self.head_weights = head_weights(config.loss)
        groups = param_groups(self.lm)
        if self.heads is not None:
            groups[1]["params"] += list(self.heads.parameters())  # trained with the rest
        o = config.optim
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, list(lr_factors(config)))
        self.step = 0  # optimizer steps done
        self.position = 0  # global training samples consumed (all processes)
        self.history: list[dict] = []
        self.elapsed = 0.0  # training seconds over all sessions
        self.model, self.optimizer = accelerator.prepare(self.lm, self.optimizer)
        if self.use_text:
            base.text.to(accelerator.device)
        if self.heads is not None:
            self.heads.to(accelerator.device)
        self.valid_batches = self._validation_batches()

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.accelerator.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "position": self.position, "history": self.history, "elapsed": self.elapsed,
                "rng": rng_state(), "codec_fingerprint": self.codes_fingerprint,
                "context_codec_fingerprint": self.context_fingerprint,
                "config": self.config.model_dump(mode="json"),
                **({"heads": self.heads.state_dict()} if self.heads is not None else {})}

    def load_state(self, state: dict) -> None:
        check_resumable(state, self.config, self.codes_fingerprint, self.context_fingerprint)
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        if self.heads is not None:
            if "heads" not in state and "harmony_head" in state:  # written before the beat head existed
                state = dict(state, heads={f"harmony.{k}": v for k, v in state["harmony_head"].items()})
            self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position, self.history = state["step"], state["position"], state["history"]
        self.elapsed = state["elapsed"]
        set_rng_state(state["rng"])

    def checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        path = save_checkpoint(self.config.run_dir, self.step, self.state(), self.config.keep_checkpoints)
        atomic_write_text(Path(self.config.run_dir) / "history.json", json.dumps(self.history, indent=1))
        return path

    # -- batches ----------------------------------------------------------------------------
    def _seed(self, micro: int, salt: int) -> int:
        """A seed for the draws of (step, micro-batch, process, purpose): a pure function of the
        position in the run, so resuming needs no generator state."""
        entropy = [self.config.seed, self.step, micro, self.accelerator.process_index, salt]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def _generator(self, micro: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(micro, salt))

    def _micro_batch(self, micro: int) -> dict:
        from .token_cache import collate_token_pairs

        B, world = self.config.batch_size, self.accelerator.num_processes
        start = self.position + (micro * world + self.accelerator.process_index) * B
        return collate_token_pairs(pairs_at(self.train_data, list(range(start, start + B))))

    def text_memory(self, descriptions: list[str], train: bool, micro: int = 0):
        """(memory, mask) for the LM's cross-attention, or (None, None) when it has no text."""
        if not self.use_text:
            return None, None
        texts = list(descriptions)
        words = 0.0
        if train:
            drop = torch.rand(len(texts), generator=self._generator(micro, 1)) < self.config.dropout.text
            texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
            words = self.config.dropout.words
        rng = random.Random(self._seed(micro, 2))
        hidden, mask = self.base.text.encode(texts, word_dropout=words, rng=rng)
        lm = self.accelerator.unwrap_model(self.model)
        return lm.project_text(hidden, mask), mask

    def conditioning(self, batch: dict, train: bool, micro: int = 0, drop_all_context: bool = False):
        """(contexts, drop_context [B] or None, drop_history [B] or None) for one micro-batch.

        Training draws the condition dropout for CFG, and the two alignment aids of the demo
        recipe (`dropout.history`, `dropout.self_context`, both 0 in STAGE's): each draw is a
        pure function of (step, micro-batch, process, purpose), like every other draw here.
        """
        device = self.accelerator.device
        context = [c.to(device) for c in batch["context"]]
        B = len(context)
        if drop_all_context:
            return context, torch.ones(B, dtype=torch.bool, device=device), None
        if not train:
            return context, None, None
        dropout = self.config.dropout
        drop = torch.rand(B, generator=self._generator(micro, 0)) < dropout.context
        history = None  # off (STAGE's recipe): no draw, and no copy of the targets in training_batch
        if dropout.history:
            history = (torch.rand(B, generator=self._generator(micro, 3)) < dropout.history).to(device)
        if dropout.self_context:
            # with a context codec, the copy is the target stem through that codec
            target = batch.get("target_as_context")
            target = (batch["target"] if target is None else target).to(device)
            copy = torch.rand(B, generator=self._generator(micro, 4)) < dropout.self_context
            context = [target[i, :, : c.shape[-1]] if copy[i] else c for i, c in enumerate(context)]
        return context, drop.to(device), history

    def loss(self, batch: dict, train: bool, micro: int = 0, drop_all_context: bool = False) -> torch.Tensor:
        """The LM's loss (STAGE's cross-entropy) on one micro-batch."""
        return self.losses(batch, train, micro, drop_all_context)["lm"]

    def losses(self, batch: dict, train: bool, micro: int = 0, drop_all_context: bool = False,
               heads: bool = False) -> dict[str, torch.Tensor]:
        """{"lm": cross-entropy, and one term per auxiliary head (`training/auxiliary.py`) in
        training or when `heads` is asked for. With `drop_all_context` the heads score their rows
        as if the context were heard: what validation compares the heard context against."""
        context, drop, history = self.conditioning(batch, train, micro, drop_all_context)
        target = batch["target"].to(self.accelerator.device)
        if self.lm.config.chord_classes:
            context, target, history = self.with_chords(batch, context, target, history, train, micro)
        tb = self.layout.training_batch(context, target, drop_context=drop, drop_history=history)
        memory, mask = self.text_memory(batch["description"], train, micro)
        want_hidden = self.heads is not None and (train or heads)
        with self.accelerator.autocast():
            out = self.model(tb.codes, tb.attention_mask, memory, mask, positions=tb.positions,
                             return_hidden=want_hidden)
        logits, hidden = out if want_hidden else (out, None)
        chord_weight = self.config.loss.chord_weight if train and self.lm.config.chord_classes else 1.0
        terms = {"lm": self.layout.loss(logits, tb, self.frame_weights(batch) if train else None, chord_weight)}
        if hidden is not None:
            kinds = [i.context_kind for i in batch["info"]]
            dropped = drop.tolist() if drop is not None and not drop_all_context else None
            for name, head in self.heads.items():
                terms[name] = head_loss(name, head, hidden, tb.context_len, batch, scored_rows(name, kinds, dropped))
        return terms

    def with_chords(self, batch: dict, context: list[torch.Tensor], target: torch.Tensor,
                    history: torch.Tensor | None, train: bool, micro: int):
        """An LM with a chord stream: the target's chord row from the pairs' chord classes, the
        contexts' PAD, and the history dropout per stream ([B, K]: `dropout.history` hides the
        audio streams, `dropout.chord_history` the chord stream; None when neither is drawn)."""
        classes = batch.get("target_chord_class")
        if classes is None:
            raise TrainingConfigError("an LM with a chord stream needs the pairs' chord classes, which this dataset "
                                      "does not provide; train from the token cache (data.cache) with each song's "
                                      "metadata.json beside it (data.root)")
        cfg, device = self.lm.config, target.device
        target = with_chord_row(target, cfg, classes.to(device))
        context = [with_chord_row(c, cfg) for c in context]
        rate = self.config.dropout.chord_history
        if not train or (history is None and not rate):
            return context, target, history
        B = target.shape[0]
        audio = history if history is not None else torch.zeros(B, dtype=torch.bool, device=device)
        chord = torch.zeros(B, dtype=torch.bool, device=device)
        if rate:
            chord = (torch.rand(B, generator=self._generator(micro, 5)) < rate).to(device)
        return context, target, torch.stack([chord] + [audio] * cfg.n_q, dim=1)

    def frame_weights(self, batch: dict) -> torch.Tensor | None:
        """[B, T] loss weights of the target frames (`loss.onset_weight`), None for a plain mean."""
        weight = self.config.loss.onset_weight
        if not weight:
            return None
        onsets = batch.get("target_onsets")
        if onsets is None:
            raise TrainingConfigError("loss.onset_weight needs the pairs' onset strengths, which this dataset does "
                                      "not provide; train from the token cache (data.cache) or set onset_weight: 0")
        return 1.0 + weight * onsets.to(self.accelerator.device)

    # -- steps ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its record."""
        accum = self.config.grad_accum
        started = time.perf_counter()
        self.model.train()
        total = 0.0
        head_totals = dict.fromkeys(self.head_weights, 0.0)
        for micro in range(accum):
            batch = self._micro_batch(micro)
            sync = micro == accum - 1
            context = self.accelerator.no_sync(self.model) if not sync else _nullcontext()
            with context:
                terms = self.losses(batch, train=True, micro=micro)
                loss = terms["lm"]
                objective = loss
                for name, weight in self.head_weights.items():
                    objective = objective + weight * terms[name]
                    head_totals[name] += terms[name].item() / accum
                self.accelerator.backward(objective / accum)
            total += loss.item() / accum
        if self.heads is not None:
            average_gradients(self.heads, self.accelerator)
        grad_norm = None
        if self.config.optim.grad_clip_norm is not None:
            params = list(self.model.parameters())
            if self.heads is not None:
                params += list(self.heads.parameters())
            grad_norm = float(self.accelerator.clip_grad_norm_(params, self.config.optim.grad_clip_norm))
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += accum * self.accelerator.num_processes * self.config.batch_size
        self.elapsed += time.perf_counter() - started
        loss_t = torch.tensor([total], device=self.accelerator.device)
        mean_loss = float(self.accelerator.reduce(loss_t, reduction="mean"))
        record = {"step": self.step, "loss": round(mean_loss, 5), "lr_embeddings": lrs[0], "lr_rest": lrs[1],
                  "grad_norm": None if grad_norm is None else round(grad_norm, 4)}
        for name, value in head_totals.items():
            value_t = torch.tensor([value], device=self.accelerator.device)
            record[f"{name}_loss"] = round(float(self.accelerator.reduce(value_t, reduction="mean")), 5)
        return record

    def _validation_batches(self) -> dict[str, list[dict]]:
        """The fixed validation pairs, batched per context kind (click / stems)."""
        from .token_cache import collate_token_pairs

        pairs = pairs_at(self.valid_data, list(range(len(self.valid_data))))
        by_kind: dict[str, list] = {}
        for p in pairs:
            by_kind.setdefault(p.info.context_kind, []).append(p)
        B = self.config.batch_size
        return {kind: [collate_token_pairs(ps[i:i + B]) for i in range(0, len(ps), B)] for kind, ps in by_kind.items()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation losses: all pairs, per context kind, with the context dropped, and (click
        pairs) with the click late by CLICK_SHIFT_SECONDS: an expert that follows the click's
        timing loses there; one that only hears "a click is playing" does not."""
        self.model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        shift = max(1, round(CLICK_SHIFT_SECONDS * self.valid_data.frame_rate))

        def add(keys: tuple[str, ...], batch: dict, **kwargs) -> None:
            n = batch["target"].shape[0]
            loss = self.loss(batch, train=False, **kwargs).item()
            for k in keys:
                sums[k] = sums.get(k, 0.0) + loss * n
                counts[k] = counts.get(k, 0) + n

        def add_heads(kind: str, batch: dict) -> None:
            # each head on its pairs with their context, then with it replaced by PAD: how much of
            # the label the hidden state takes from what it hears ("val_harmony" on stems pairs,
            # "val_beat_click" on clicks, ...)
            names = [name for name in self.heads if kind in HEADS[name].kinds]
            if not names:
                return
            n = batch["target"].shape[0]
            for heard, suffix in ((True, ""), (False, "_no_context")):
                terms = self.losses(batch, train=False, drop_all_context=not heard, heads=True)
                for name in names:
                    key = f"val_{name}" + ("" if kind == "stems" else f"_{kind}") + suffix
                    sums[key] = sums.get(key, 0.0) + terms[name].item() * n
                    counts[key] = counts.get(key, 0) + n

        def add_chords(batch: dict) -> None:
            # what the chord stream names from the context alone (its past and the audio's hidden)
            n = batch["target"].shape[0]
            for heard, key in ((True, "val_chord_accuracy"), (False, "val_chord_accuracy_no_context")):
                sums[key] = sums.get(key, 0.0) + self.chord_accuracy(batch, heard) * n
                counts[key] = counts.get(key, 0) + n

        for kind, batches in self.valid_batches.items():
            for batch in batches:
                if kind == "stems" and self.lm.config.chord_classes:
                    add_chords(batch)
                add(("val_loss", f"val_loss_{kind}"), batch)
                add(("val_loss_no_context",), batch, drop_all_context=True)
                if kind == "click":
                    late = dict(batch, context=[torch.roll(c, shift, dims=-1) for c in batch["context"]])
                    add(("val_loss_click_shifted",), late)
                if self.heads is not None:
                    add_heads(kind, batch)
        self.model.train()
        return {k: round(sums[k] / counts[k], 5) for k in sums}

    @torch.no_grad()
    def chord_accuracy(self, batch: dict, heard: bool) -> float:
        """The chord stream's top-1 accuracy over the target frames with every stream's past
        hidden: from the context (`heard`) or from nothing (the context PAD)."""
        device = self.accelerator.device
        context, target, _ = self.with_chords(batch, [c.to(device) for c in batch["context"]],
                                              batch["target"].to(device), None, train=False, micro=0)
        B = target.shape[0]
        tb = self.layout.training_batch(context, target, drop_context=torch.full((B,), not heard, device=device),
                                        drop_history=torch.ones(B, dtype=torch.bool, device=device))
        memory, mask = self.text_memory(batch["description"], False)
        with self.accelerator.autocast():
            logits = self.model(tb.codes, tb.attention_mask, memory, mask, positions=tb.positions)
        aligned, scored = self.layout.target_logits(logits, tb)
        guess = aligned[:, 0, :, : self.lm.config.chord_classes].argmax(dim=-1)
        right = (guess == tb.targets[:, 0]) & scored[:, 0]
        return float(right.sum()) / max(1, int(scored[:, 0].sum()))


def average_gradients(module: torch.nn.Module, accelerator) -> None:
    """Average a module's gradients over processes: the auxiliary heads are not inside the model
    Accelerate wraps, so DDP does not sync them."""
    if accelerator.num_processes == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- the entry point ---------------------------------------------------------------------------

@dataclass
class TrainResult:
    output: Path | None  # the exported expert (None when the session stopped early)
    step: int
    history: list[dict]
    seconds: float
    metrics: dict


def training_precision(config: TrainConfig) -> str:
    """The `mixed_precision` Accelerate gets: "auto" resolved, and a warning when bf16 was asked
    for on a CPU where it is slower than float32 (`machine.bf16_training_ratio`)."""
    from ..machine import bf16_training_ratio, cpu_model

    asked = config.mixed_precision
    on_gpu = torch.cuda.is_available() and not config.cpu
    if on_gpu:
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if asked == "auto" else asked
    if asked not in ("bf16", "auto"):
        return asked
    width = config.base.fresh.dim if config.base.fresh is not None else 1024
    ratio = bf16_training_ratio(width)
    if asked == "auto":
        chosen = "bf16" if ratio < 0.9 else "no"
        log.info("mixed_precision auto: %s (bf16 / float32 time of a training-shaped product on %s: %.2f)",
                 chosen, cpu_model(), ratio)
        return chosen
    if ratio > 1.2:
        log.warning("mixed_precision: bf16 is %.1fx slower than float32 on this CPU (%s; a linear layer's forward "
                    "and backward at width %d). Set mixed_precision: auto (or 'no') in the training config.",
                    ratio, cpu_model(), width)
    return asked


def train(config: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None,
          callback: StepCallback | None = None, export: bool = True, command: str | None = None) -> TrainResult:
    """Train (or continue) the expert described by `config`; export it when max_steps is reached.

    A run dir that already holds checkpoints is never restarted over: pass `resume=True` to
    continue it. Ctrl-C checkpoints the last completed step before stopping. `stop_after`
    ends this session after that many steps (with a checkpoint), as an interruption would;
    `callback(step, record)` is called after every step.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingConfigError("mixed_precision: fp16 needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=training_precision(config))
    run_dir = Path(config.run_dir)
    found = latest_checkpoint(run_dir)
    if found is not None and not resume:
        raise StageStackError(f"{run_dir} already holds checkpoints ({found.name}); pass --resume to continue "
                              "that run, or set a new run_dir to start another")
    if found is None and resume:
        raise StageStackError(f"nothing to resume: {run_dir} holds no checkpoints ({run_dir / 'checkpoints'}/"
                              "step-*.pt). Check run_dir in the config, or leave out --resume to start the run")

    torch.manual_seed(config.seed)
    base = load_base(config)
    state = None
    if found is not None:  # check before any pre-tokenization work
        state = load_checkpoint(found, "cpu")
        check_resumable(state, config, *base_fingerprints(base))
    base.codec.to(accelerator.device)  # pre-tokenization runs on the training device
    if base.context_codec is not None:
        base.context_codec.to(accelerator.device)
    train_data, valid_data = build_datasets(config, base.codec, accelerator.is_main_process,
                                            accelerator.wait_for_everyone, progress=progress,
                                            context_codec=base.context_codec,
                                            chord_stream=bool(base.lm.config.chord_classes))
    trainer = Trainer(config, base, train_data, valid_data, accelerator)
    if state is not None:
        trainer.load_state(state)
        log.info("resumed %s at step %d (sample %d)", run_dir, trainer.step, trainer.position)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=1))

    started, session_steps = time.time(), 0
    bar = tqdm(total=config.schedule.max_steps, initial=trainer.step, desc=f"train {config.instrument}",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    window: list[float] = []
    # A Ctrl-C waits for the step it falls in (optimizer update, counters, history, validation,
    # checkpoint) to finish, so the checkpoint it leads to holds a whole number of steps and
    # `--resume` continues exactly; a second Ctrl-C stops at once, without a checkpoint.
    at_boundary = True  # the trainer's state is that of a whole number of steps
    try:
        with interrupts_between_steps(progress and accelerator.is_main_process) as interrupted:
            while trainer.step < config.schedule.max_steps:
                at_boundary = False
                faults.point("train:step")
                record = trainer.train_step()
                faults.point("train:stepped")
                session_steps += 1
                window.append(record["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                step = trainer.step
                if step % config.log_every == 0:
                    record["train_loss"] = round(sum(window) / len(window), 5)
                    window.clear()
                    trainer.history.append(record)
                    log.info("step %d %s", step, record)
                if step % config.eval_every == 0 or step == config.schedule.max_steps:
                    metrics = trainer.validate()
                    trainer.history.append({"step": step, **metrics})
                    line = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    bar.write(line) if progress and accelerator.is_main_process else log.info(line)
                at_boundary = True
                if callback is not None:
                    callback(step, record)
                stopping = stop_after is not None and session_steps >= stop_after
                if step % config.checkpoint_every == 0 or step == config.schedule.max_steps or stopping:
                    trainer.checkpoint()
                    faults.point("train:checkpointed")
                if interrupted():
                    raise KeyboardInterrupt
                if stopping:
                    break
    except KeyboardInterrupt:
        bar.close()
        if at_boundary:
            trainer.checkpoint()  # the last completed step; `--resume` continues from it
        else:
            last = latest_checkpoint(run_dir)
            log.warning("stopped in the middle of step %d: no checkpoint of it is written; --resume continues "
                        "from %s", trainer.step + 1, last.name if last else "the start")
        raise
    bar.close()
    seconds = time.time() - started

    if trainer.step < config.schedule.max_steps or not export:
        return TrainResult(None, trainer.step, trainer.history, seconds, {})
    output = None
    metrics = {}
    if accelerator.is_main_process:
        output, metrics = export_run(config, trainer, base, seconds, command)
    accelerator.wait_for_everyone()
    return TrainResult(output, trainer.step, trainer.history, seconds, metrics)


def export_run(config: TrainConfig, trainer: Trainer, base: Base, seconds: float,
               command: str | None = None) -> tuple[Path, dict]:
    from .export import export_expert, training_summary

    lm = trainer.accelerator.unwrap_model(trainer.model)
    metrics = training_summary(trainer.history)
    d = config.data
    training = {
        "recipe": "stage-stack STAGE fine-tuning (reference §5)",
        "steps": trainer.step,
        "samples": trainer.position,
        "processes": trainer.accelerator.num_processes,
        "device": str(trainer.accelerator.device),
        "wall_seconds": round(trainer.elapsed, 1),
        "lm_parameters": sum(p.numel() for p in lm.parameters()),
        # The window generation uses for long pieces (stage_stack.longform.expert_window_seconds).
        "max_context_seconds": d.context_seconds[1],
        "max_target_seconds": d.segment_seconds,
        "metrics": metrics,
        "codec": base.codec_info,
        **({"context_codec": base.context_codec_info} if base.context_codec is not None else {}),
        "base_file": base.source,
        "data": {"source": str(d.root) + (f" (synthetic band, seed {d.synth.seed})" if d.synth else ""),
                 "train_songs": len(trainer.train_data.songs), "valid_songs": len(trainer.valid_data.songs),
                 "target_stem": d.target_stem},
        "config": config.model_dump(mode="json"),
        "command": command or "stage-stack train " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    }
    path = export_expert(config, lm, base.codec, base.metadata, training, base.text,
                         context_codec=base.context_codec)
    return path, metrics
