"""Export a trained LM as an expert file (format v1) with its model card in the metadata.

The card is Markdown, written twice: into the file's `model_card` metadata (so it travels with
the weights) and beside the file as `<name>.md` (so it can be read on GitHub). It states the
license, the base model, the codec and its metrics, the training data and recipe, the losses,
and the command that reproduces the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..expert import FORMAT_VERSION, DTYPES, ExpertMetadata, WeightsRef, save_expert
from ..models.codec import Codec
from ..models.stage_lm import StageLM
from .auxiliary import HEADS
from .config import TrainConfig


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


HEAD_METRICS = tuple(f"val_{name}" for name in HEADS)  # what validation records per auxiliary head


def model_card(config: TrainConfig, metadata: ExpertMetadata, training: dict) -> str:
    """The Markdown model card of an exported expert."""
    lm = metadata.lm_cfg
    codec = metadata.codec_cfg
    n_params = training.get("lm_parameters", 0)
    data = training.get("data", {})
    metrics = training.get("metrics", {})
    codec_info = training.get("codec", {})
    lines = [
        f"# {config.instrument} expert ({Path(config.export.output).name})",
        "",
        metadata.description or f"A STAGE expert that generates a {config.instrument} stem conditioned on a context.",
        "",
        "| | |",
        "|---|---|",
        f"| license | {metadata.license} |",
        f"| base model | {metadata.base_model} |",
        f"| LM | StageLM dim {lm.dim}, {lm.n_layers} layers, {lm.n_heads} heads, FFN {lm.ffn_dim}, "
        f"{n_params / 1e6:.2f} M parameters, stored as {config.export.dtype} |",
        f"| text conditioning | {'T5 cross-attention' if lm.cross_attention else 'none (context only)'} |",
        f"| codec | {codec_info.get('id', 'embedded')}: EnCodec {codec.sample_rate} Hz, {codec.frame_rate} frames/s, "
        f"{codec.n_q} codebooks of {codec.card} |",
        *([] if metadata.context_codec_cfg is None else [
            f"| context codec | {training.get('context_codec', {}).get('id', 'embedded')}: the context is heard "
            f"through this second codec ({metadata.context_codec_cfg.n_q} codebooks of "
            f"{metadata.context_codec_cfg.card}) |"]),
        *([] if not lm.chord_classes else [
            f"| chord stream | {lm.chord_classes} classes (stage_stack/chords.py): a first stream names each "
            "frame's chord one step before its codes; never decoded (not in STAGE's recipe) |"]),
        *([] if not metadata.sampling else [
            "| sampling | " + ", ".join(f"{k} {v}" for k, v in metadata.sampling.items())
            + " (the Arranger's default for this expert; the reference's for what is not named) |"]),
        f"| format | stage-stack expert v{FORMAT_VERSION} |",
        "",
        "## Training data",
        "",
        f"- songs: {data.get('train_songs', '?')} training, {data.get('valid_songs', '?')} validation "
        f"({data.get('source', '')})",
        f"- target stem: `{config.data.target_stem}`; contexts: "
        + (f"a random non-empty subset of the audible stems of {_joined(config.data.context_stems)} (not in STAGE's "
           f"recipe: the Arranger gives this expert those instruments' layers only, its metadata's `hears`)"
           if config.data.context_stems else "a random non-empty subset of the other audible stems")
        + (f" (all of them with p = {config.data.all_stems_prob}, not in STAGE's recipe)"
           if config.data.all_stems_prob else "")
        + f", or with p = {config.data.click_prob} a click track on the song's beats (accented downbeats)",
        f"- target {config.data.segment_seconds} s, context {config.data.context_seconds[0]}-"
        f"{config.data.context_seconds[1]} s aligned to the target's start",
        f"- augmentation: {config.data.variants} encoded variants per song (variant 0 as written, the others a "
        f"speed change in {list(config.data.speed)} and/or pitch shift in {list(config.data.pitch)} semitones)",
        "",
        "## Training",
        "",
        f"- {training.get('steps', '?')} optimizer steps x batch {config.batch_size} x accumulation {config.grad_accum} "
        f"x {training.get('processes', 1)} process(es); {training.get('wall_seconds', 0) / 60:.1f} min on "
        f"{training.get('device', '?')}",
        f"- AdamW lr {config.optim.lr}, betas {list(config.optim.betas)}, weight decay {config.optim.weight_decay}, "
        f"grad clip {config.optim.grad_clip_norm}",
        f"- phase 1: {config.schedule.embed_only_steps} steps training only the embeddings (SEP included) and the "
        f"text projection; phase 2: everything, ramped over {config.schedule.unfreeze_ramp_steps} steps"
        + (f", cosine decay to {config.schedule.min_lr_ratio} x lr" if config.schedule.min_lr_ratio < 1 else ""),
        f"- condition dropout for CFG: context {config.dropout.context}, text {config.dropout.text}",
        *([f"- alignment aids, not in STAGE's recipe: the target's own past hidden from the input in "
           f"{config.dropout.history:.0%} of the pairs, the target itself as context in "
           f"{config.dropout.self_context:.0%} (those copies make `train_loss` lower than `val_loss`)"]
          if config.dropout.history or config.dropout.self_context else []),
        *([f"- chord stream: taught each target frame's chord from the songs' metadata.json; its past chords "
           f"hidden in {config.dropout.chord_history:.0%} of the pairs (drawn apart from the audio's), and "
           "`val_chord_accuracy` is what it names with every past hidden, from the context (`_no_context`: "
           "from nothing)"] if lm.chord_classes else []),
        *_loss_lines(config),
        "",
        "## Metrics",
        "",
        "Cross-entropy in nats per token, mean over codebooks, on the validation pairs (`val_loss_no_context` "
        "drops every context: its gap to `val_loss` is what the context is worth; `val_loss_click_shifted` "
        "plays the click contexts 0.25 s late: its gap to `val_loss_click` is what the click's timing is worth):",
        "",
    ]
    for key in ("train_loss", "val_loss", "val_loss_click", "val_loss_click_shifted", "val_loss_stems",
                "val_loss_no_context"):
        if key in metrics:
            lines.append(f"- {key}: {_fmt(metrics[key])}")
    chords = [key for key in metrics if key.startswith("val_chord_accuracy")]
    if chords:
        lines += ["", "The chord stream's top-1 accuracy on the validation stem pairs with every past hidden (from "
                  "the context; `_no_context`: from nothing):", ""]
        lines += [f"- {key}: {_fmt(metrics[key])}" for key in sorted(chords)]
    heads = [key for key in metrics if key.startswith(HEAD_METRICS)]
    if heads:
        lines += ["", "The auxiliary heads' losses on the validation pairs (training only, not in this file; "
                  "`_no_context` replaces the context by PAD: the gap is how much of the label the LM takes "
                  "from what it hears):", ""]
        lines += [f"- {key}: {_fmt(metrics[key])}" for key in sorted(heads)]
    if codec_info.get("metrics"):
        lines += ["", "Codec round trip on held-out songs (SI-SNR dB / mel distance):", ""]
        for kind, m in codec_info["metrics"].items():
            lines.append(f"- {kind}: {m['si_snr_db']:.2f} dB / {m['mel_distance']:.3f}")
    lines += ["", "## Reproduce", "", "```", training.get("command", "stage-stack train CONFIG.yaml"), "```", ""]
    if config.export.notes:
        lines += [config.export.notes.strip(), ""]
    return "\n".join(lines)


def _loss_lines(config: TrainConfig) -> list[str]:
    """The card's lines for the loss terms that are not STAGE's plain cross-entropy."""
    loss = config.loss
    lines = []
    if loss.onset_weight:
        lines.append(f"- onset-weighted loss, not in STAGE's recipe: a target frame weighs 1 + {loss.onset_weight} "
                     "x its stem's onset strength")
    if loss.harmony_weight:
        lines.append(f"- auxiliary chord objective, not in STAGE's recipe (weight {loss.harmony_weight}): a "
                     "training-only head names the 12 pitch classes of the song's chord at each target frame "
                     "from the hidden state that predicts the frame, on pairs whose context is kept stems")
    if loss.beat_weight:
        lines.append(f"- auxiliary beat objective, not in STAGE's recipe (weight {loss.beat_weight}): a "
                     "training-only head names where each target frame falls in its beat (4 bins) from the "
                     "hidden state that predicts the frame, on pairs whose context is kept stems or a click")
    if loss.chord_weight != 1.0:
        lines.append(f"- the chord stream's cross-entropy counted {loss.chord_weight:g} times in the loss, not in "
                     "STAGE's recipe")
    return lines


def _joined(stems) -> str:
    return " + ".join(f"`{stem}`" for stem in stems)


def expert_metadata_for(config: TrainConfig, lm: StageLM, codec: Codec, base: ExpertMetadata | None,
                        training: dict, context_codec: Codec | None = None) -> ExpertMetadata:
    """Metadata of the exported expert: the base expert's codec/text references, or an embedded codec."""
    cfg = lm.config
    fields: dict[str, Any] = dict(
        codec=base.codec if base is not None else WeightsRef(embedded=True),
        text_encoder=base.text_encoder if base is not None else None,
        text_encoder_id=base.text_encoder_id if base is not None else None,
        base_model=(f"the {base.instrument} expert {training.get('base_file', '')} (its base: {base.base_model})"
                    if base is not None else "none: a fresh StageLM (random init) trained from scratch"),
        license=config.export.license,
        description=config.export.description,
        default_prompt=config.export.default_prompt,
        hears=None if config.data.context_stems is None else list(config.data.context_stems),
        sampling=config.export.sampling,
        training=training,
        context_codec_config=None if context_codec is None else context_codec.config.to_dict(),
    )
    metadata = ExpertMetadata.for_models(config.instrument, cfg, codec.config, **fields)
    return metadata.model_copy(update={"model_card": model_card(config, metadata, training)})


class _StateDict:
    """Adapter: save_expert reads `text_encoder.state_dict()`; T5's tied `shared.weight` must go."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def export_expert(config: TrainConfig, lm: StageLM, codec: Codec, base: ExpertMetadata | None, training: dict,
                  text=None, output: str | Path | None = None, context_codec: Codec | None = None) -> Path:
    """Write the expert file (atomically) and its model card `<output>.md`; returns the file's path."""
    output = Path(output or config.export.output)
    metadata = expert_metadata_for(config, lm, codec, base, training, context_codec)
    to_save = copy.deepcopy(lm).to("cpu", DTYPES[config.export.dtype])
    to_save.reset_special_rows()  # the PAD rows are zero already; this keeps them exactly zero after a cast
    text_module = None
    if metadata.text_encoder is not None and metadata.text_encoder.embedded:
        from ..models.text import encoder_state_dict

        if text is None:
            raise ValueError("the base expert embeds its text encoder: pass `text` to export_expert")
        text_module = _StateDict(encoder_state_dict(text))
    path = save_expert(output, metadata, to_save, codec.cpu(), text_module,
                       None if context_codec is None else context_codec.cpu())
    output.with_suffix(".md").write_text(metadata.model_card)
    return path


def training_summary(history: list[dict]) -> dict[str, float]:
    """The last logged train loss and the last validation losses (the LM's and the auxiliary
    heads'), for the card."""
    out: dict[str, float] = {}
    for record in history:
        if "train_loss" in record:
            out["train_loss"] = record["train_loss"]
        for key, value in record.items():
            if key.startswith(("val_loss", "val_chord_accuracy", *HEAD_METRICS)):
                out[key] = value
    return {k: round(float(v), 4) for k, v in out.items()}
