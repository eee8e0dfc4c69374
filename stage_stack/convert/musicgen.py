"""Import MusicGen checkpoints as *base experts*: the starting point for STAGE fine-tuning.

Two source formats hold the same decoder under different names:

- transformers (`facebook/musicgen-small` on the Hub): a folder with `config.json` and
  `model.safetensors` (or a sharded `model.safetensors.index.json`) of a
  `MusicgenForConditionalGeneration`: `decoder.*` (the LM), `enc_to_dec_proj.*` (T5 -> LM width),
  `text_encoder.*` (T5 encoder) and `audio_encoder.*` (EnCodec);
- audiocraft: `state_dict.bin` (`{'best_state': LM state, 'xp.cfg': hydra YAML, ...}`) and
  `compression_state_dict.bin` (the EnCodec), both read with `torch.load(weights_only=True)`.

What makes the result a STAGE base expert (reference §1, "Special tokens and how SEP was added
to MusicGen"): MusicGen's tables have card + 1 rows (the codes and its special token); ours have
card + 2. Rows 0..card-1 are copied, row card (PAD) is zeros, because upstream discards
MusicGen's special-token row, and row card + 1 (SEP) is a new `kaiming_normal_` draw on a
[1, dim] tensor (fan_in = dim, gain sqrt(2)), one per table, from a seeded generator. Nothing
else changes, so the expert reproduces MusicGen's logits for positions 0, 1, 2, ... and a plain
(unpadded, PAD-free) prefix; it is not a usable STAGE expert until fine-tuned.

The codec is written once beside the expert and referenced by sha256 (or embedded with
`embed_codec=True`). T5 weights, when the source has them, go to a referenced file too;
`text_encoder_id` names the T5 model whose config and tokenizer the text loader needs
(see `stage_stack.models.text`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from ..atomic import temp_path
from ..errors import CheckpointKeyError, StageStackError
from ..torchload import load_weights
from ..expert import (ExpertMetadata, WeightsRef, atomic_save_safetensors,
                      build_empty, read_header, save_codec, save_expert, sha256_file)
from ..models.codec import Codec, CodecConfig
from ..models.stage_lm import StageLM, StageLMConfig
from .encodec import encodec_state_dict_to_hf, infer_codec_config, load_audiocraft_compression
from .keymaps import KeyMap, Piece, assemble, check_keys, count, describe_validation_error, expected_shapes

MUSICGEN_LICENSE = "CC-BY-NC-4.0"  # MusicGen's released weights
DEFAULT_BASE_MODEL = "facebook/musicgen-small"
DEFAULT_TEXT_ENCODER = "t5-base"
MUSICGEN_HEAD_DIM = 64  # audiocraft's MusicGen scales keep the head width at 64
T5_TIED_EMBEDDING, T5_EMBEDDING = "shared.weight", "encoder.embed_tokens.weight"


@dataclass
class ImportedExpert:
    """What an import wrote, and anything the user should know about it."""

    expert: Path
    codec_file: Path | None = None  # None when the codec is embedded
    text_encoder_file: Path | None = None  # None when the source has no T5 weights
    notes: list[str] = field(default_factory=list)


# -- the SEP and PAD rows ----------------------------------------------------------------------

def add_special_rows(table: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[card, dim] code rows -> [card + 2, dim]: row card (PAD) zeros, row card + 1 (SEP) new.

    SEP is drawn as upstream draws it: `kaiming_normal_` on a [1, dim] tensor, so fan_in = dim
    and gain = sqrt(2) (leaky_relu with a = 0): std = sqrt(2 / dim).
    """
    sep = torch.empty(1, table.shape[1], dtype=torch.float32)
    torch.nn.init.kaiming_normal_(sep, generator=generator)
    pad = torch.zeros(1, table.shape[1], dtype=table.dtype)
    return torch.cat([table, pad, sep.to(table.dtype)])


# -- the decoder, named two ways ---------------------------------------------------------------

def _norm(key_map: KeyMap, ours: str, theirs: str, dim: int) -> None:
    for p in ("weight", "bias"):
        key_map[f"{ours}.{p}"] = [Piece(f"{theirs}.{p}", (dim,))]


def hf_key_map(config: StageLMConfig) -> KeyMap:
    """StageLM key -> `MusicgenForConditionalGeneration` tensors (embeddings: code rows only)."""
    d, f, card = config.dim, config.ffn_dim, config.card
    dec = HF_DECODER
    key_map: KeyMap = {}
    for k in range(config.n_q):
        key_map[f"embeddings.{k}.weight"] = [Piece(f"{dec}embed_tokens.{k}.weight", (card + 1, d), rows=(0, card))]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"{dec}layers.{i}."
        _norm(key_map, f"{ours}self_norm", f"{theirs}self_attn_layer_norm", d)
        key_map[f"{ours}self_attn.qkv.weight"] = [Piece(f"{theirs}self_attn.{p}_proj.weight", (d, d)) for p in "qkv"]
        key_map[f"{ours}self_attn.out.weight"] = [Piece(f"{theirs}self_attn.out_proj.weight", (d, d))]
        _norm(key_map, f"{ours}cross_norm", f"{theirs}encoder_attn_layer_norm", d)
        key_map[f"{ours}cross_attn.q.weight"] = [Piece(f"{theirs}encoder_attn.q_proj.weight", (d, d))]
        key_map[f"{ours}cross_attn.kv.weight"] = [Piece(f"{theirs}encoder_attn.{p}_proj.weight", (d, d)) for p in "kv"]
        key_map[f"{ours}cross_attn.out.weight"] = [Piece(f"{theirs}encoder_attn.out_proj.weight", (d, d))]
        _norm(key_map, f"{ours}ffn_norm", f"{theirs}final_layer_norm", d)
        key_map[f"{ours}ffn.fc1.weight"] = [Piece(f"{theirs}fc1.weight", (f, d))]
        key_map[f"{ours}ffn.fc2.weight"] = [Piece(f"{theirs}fc2.weight", (d, f))]
    _norm(key_map, "final_norm", f"{dec}layer_norm", d)
    for k in range(config.n_q):
        key_map[f"heads.{k}.weight"] = [Piece(f"decoder.lm_heads.{k}.weight", (card, d))]
    key_map["text_proj.weight"] = [Piece("enc_to_dec_proj.weight", (d, config.text_dim))]
    key_map["text_proj.bias"] = [Piece("enc_to_dec_proj.bias", (d,))]
    return key_map


AUDIOCRAFT_OUTPUT_PROJ = "condition_provider.conditioners.description.output_proj."
AUDIOCRAFT_T5 = "condition_provider.conditioners.description.t5."  # only when T5 was fine-tuned


def audiocraft_key_map(config: StageLMConfig) -> KeyMap:
    """StageLM key -> audiocraft `LMModel` tensors (embeddings: code rows only).

    audiocraft fuses q, k, v into one `in_proj_weight` [3 * dim, dim] for self- and
    cross-attention, in that row order: self-attention keeps it whole (our `qkv`),
    cross-attention is split into q (rows 0..dim-1) and k, v (the rest, our `kv`).
    """
    d, f, card = config.dim, config.ffn_dim, config.card
    key_map: KeyMap = {}
    for k in range(config.n_q):
        key_map[f"embeddings.{k}.weight"] = [Piece(f"emb.{k}.weight", (card + 1, d), rows=(0, card))]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.layers.{i}."
        _norm(key_map, f"{ours}self_norm", f"{theirs}norm1", d)
        key_map[f"{ours}self_attn.qkv.weight"] = [Piece(f"{theirs}self_attn.in_proj_weight", (3 * d, d))]
        key_map[f"{ours}self_attn.out.weight"] = [Piece(f"{theirs}self_attn.out_proj.weight", (d, d))]
        _norm(key_map, f"{ours}cross_norm", f"{theirs}norm_cross", d)
        fused = f"{theirs}cross_attention.in_proj_weight"
        key_map[f"{ours}cross_attn.q.weight"] = [Piece(fused, (3 * d, d), rows=(0, d))]
        key_map[f"{ours}cross_attn.kv.weight"] = [Piece(fused, (3 * d, d), rows=(d, 3 * d))]
        key_map[f"{ours}cross_attn.out.weight"] = [Piece(f"{theirs}cross_attention.out_proj.weight", (d, d))]
        _norm(key_map, f"{ours}ffn_norm", f"{theirs}norm2", d)
        key_map[f"{ours}ffn.fc1.weight"] = [Piece(f"{theirs}linear1.weight", (f, d))]
        key_map[f"{ours}ffn.fc2.weight"] = [Piece(f"{theirs}linear2.weight", (d, f))]
    _norm(key_map, "final_norm", "out_norm", d)
    for k in range(config.n_q):
        key_map[f"heads.{k}.weight"] = [Piece(f"linears.{k}.weight", (card, d))]
    key_map["text_proj.weight"] = [Piece(f"{AUDIOCRAFT_OUTPUT_PROJ}weight", (d, config.text_dim))]
    key_map["text_proj.bias"] = [Piece(f"{AUDIOCRAFT_OUTPUT_PROJ}bias", (d,))]
    return key_map


def _infer_lm_config(source: str, shapes: dict[str, tuple], *, embedding: str, head: str, fc1: str,
                     text_proj: str, embedding_pattern: str, layer_pattern: str, n_heads: int | None) -> StageLMConfig:
    """Sizes from tensor shapes, given the format's names for the first embedding table, head,
    FFN input layer and the text projection, and regexes that number the tables and layers.
    n_heads is the one size shapes cannot tell: from the config, else MusicGen's 64-wide heads."""
    missing = [key for key in (embedding, head, fc1, text_proj) if key not in shapes]
    if missing:
        raise CheckpointKeyError(source, missing=missing)
    dim = shapes[embedding][1]
    config = dict(
        dim=dim,
        n_layers=count(shapes, layer_pattern),
        n_heads=n_heads or max(1, dim // MUSICGEN_HEAD_DIM),
        ffn_dim=shapes[fc1][0],
        card=shapes[head][0],
        n_q=count(shapes, embedding_pattern),
        cross_attention=True,  # MusicGen always conditions on text through cross-attention
        text_dim=shapes[text_proj][1],
    )
    try:
        return StageLMConfig(**config)
    except ValueError as e:
        raise StageStackError(f"{source}: the tensor shapes give an unusable LM configuration {config}: {e}") from None


def _check_config_agrees(source: str, pairs: list[tuple[str, Any, Any]]) -> None:
    """(field, value in the config file, value the tensors give); None means 'not in the file'."""
    wrong = [f"  {name} is {said} but the weights give {got}" for name, said, got in pairs
             if said is not None and said != got]
    if wrong:
        raise StageStackError(f"{source}: the configuration does not match the weights:\n" + "\n".join(wrong)
                              + "\n  The config file belongs to another checkpoint; use the pair that was saved together.")


# -- transformers format -----------------------------------------------------------------------

class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class HFMusicgenDecoderConfig(_Loose):
    """The fields of `MusicgenDecoderConfig` the import needs or must check (transformers' defaults)."""

    hidden_size: PositiveInt = 1024
    num_hidden_layers: PositiveInt = 24
    num_attention_heads: PositiveInt = 16
    ffn_dim: PositiveInt = 4096
    vocab_size: PositiveInt = 2048
    num_codebooks: PositiveInt = 4
    audio_channels: Literal[1] = 1  # stereo MusicGen interleaves two code streams: not a STAGE layout
    activation_function: Literal["gelu"] = "gelu"
    scale_embedding: Literal[False] = False


class HFEncodecConfig(_Loose):
    """The fields of `EncodecConfig` that tensor shapes cannot tell (transformers' defaults)."""

    sampling_rate: PositiveInt = 24000
    audio_channels: Literal[1] = 1
    normalize: Literal[False] = False
    pad_mode: Literal["reflect", "constant", "replicate"] = "reflect"
    use_causal_conv: bool = True
    dilation_growth_rate: int = 2
    trim_right_ratio: float = 1.0


class HFMusicgenConfig(_Loose):
    decoder: HFMusicgenDecoderConfig
    audio_encoder: HFEncodecConfig
    text_encoder: dict[str, Any] = {}


class _ShardIndex(_Loose):
    weight_map: dict[str, str]


def read_hf_config(model_dir: Path) -> HFMusicgenConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise StageStackError(f"{model_dir}: no config.json. The transformers MusicGen format is a folder with "
                              "config.json and model.safetensors (e.g. the files of facebook/musicgen-small).")
    try:
        return HFMusicgenConfig.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise StageStackError(describe_validation_error(str(path), e) + "\n  This importer reads mono MusicGen "
                              "checkpoints (MusicgenForConditionalGeneration: gelu, no embedding scale).") from None


class SafetensorsCheckpoint:
    """A possibly sharded safetensors checkpoint, read one tensor at a time."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                weight_map = _ShardIndex.model_validate_json(index.read_bytes()).weight_map
            except ValidationError as e:
                raise StageStackError(describe_validation_error(str(index), e)) from None
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
        else:
            raise StageStackError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                                  "(pytorch_model.bin is not read). Download the safetensors weights.")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            _, entries = read_header(file)  # clear error for a missing, truncated or non-safetensors file
            for key, (_, shape) in entries.items():
                self.shapes[key], self._file_of[key] = tuple(shape), file
        self._handles = {file: safe_open(str(file), framework="pt") for file in files}

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._file_of[key]].get_tensor(key)


HF_IGNORED = {"decoder.model.decoder.embed_positions.weights"}  # a fixed sinusoid, recomputed by StageLM
HF_DECODER = "decoder.model.decoder."


def plan_hf_lm(shapes: dict[str, tuple], hf_config: HFMusicgenConfig, source: str) -> tuple[StageLMConfig, KeyMap]:
    """LM config and key map for a transformers checkpoint, from shapes alone; checks every LM key
    (all keys but `text_encoder.*` and `audio_encoder.*`)."""
    dec = HF_DECODER
    lm_config = _infer_lm_config(
        source, shapes, embedding=f"{dec}embed_tokens.0.weight", head="decoder.lm_heads.0.weight",
        fc1=f"{dec}layers.0.fc1.weight", text_proj="enc_to_dec_proj.weight",
        embedding_pattern=rf"{re.escape(dec)}embed_tokens\.(\d+)\.weight",
        layer_pattern=rf"{re.escape(dec)}layers\.(\d+)\..+", n_heads=hf_config.decoder.num_attention_heads)
    d = hf_config.decoder
    _check_config_agrees(f"{source}/config.json", [
        ("decoder.hidden_size", d.hidden_size, lm_config.dim),
        ("decoder.num_hidden_layers", d.num_hidden_layers, lm_config.n_layers),
        ("decoder.ffn_dim", d.ffn_dim, lm_config.ffn_dim),
        ("decoder.vocab_size", d.vocab_size, lm_config.card),
        ("decoder.num_codebooks", d.num_codebooks, lm_config.n_q),
    ])
    key_map = hf_key_map(lm_config)
    lm_part = {k: s for k, s in shapes.items()
               if not k.startswith(("text_encoder.", "audio_encoder.")) and k not in HF_IGNORED}
    check_keys(source, lm_part, expected_shapes(key_map))
    return lm_config, key_map


def convert_musicgen_hf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    instrument: str = "base",
    base_model: str = DEFAULT_BASE_MODEL,
    license: str = MUSICGEN_LICENSE,
    embed_codec: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> ImportedExpert:
    """Convert a transformers MusicGen folder (config.json + model.safetensors) into a base expert.

    Everything is checked before anything is written; `seed` seeds the new SEP rows.
    """
    model_dir, out = Path(model_dir), Path(out)
    if model_dir.is_file():  # the weights file itself was given
        model_dir = model_dir.parent
    _refuse_overwrite(out, overwrite)
    hf_config = read_hf_config(model_dir)
    checkpoint = SafetensorsCheckpoint(model_dir)
    source = str(model_dir)
    shapes = checkpoint.shapes
    lm_config, key_map = plan_hf_lm(shapes, hf_config, source)
    lm_state = assemble(key_map, checkpoint.get)

    if not any(k.startswith("audio_encoder.") for k in shapes):
        raise CheckpointKeyError(source, missing=["audio_encoder.* (the EnCodec weights)"])
    codec_state = encodec_state_dict_to_hf({k: checkpoint.get(k) for k in shapes if k.startswith("audio_encoder.")},
                                           prefix="audio_encoder.")
    a = hf_config.audio_encoder
    codec_config = infer_codec_config(codec_state, sample_rate=a.sampling_rate, pad_mode=a.pad_mode,
                                      causal=a.use_causal_conv, dilation_base=a.dilation_growth_rate,
                                      trim_right_ratio=a.trim_right_ratio)
    codec = load_codec(codec_config, codec_state, source)

    t5_state = {k[len("text_encoder."):]: checkpoint.get(k) for k in shapes if k.startswith("text_encoder.")}
    name = hf_config.text_encoder.get("_name_or_path", "")
    # a Hub id names the T5; a local path saved by whoever converted the model does not
    text_id = name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else DEFAULT_TEXT_ENCODER
    result = _write_base_expert(
        out, lm_config, lm_state, codec, t5_state, text_id, [],
        instrument=instrument, base_model=base_model, license=license, embed_codec=embed_codec, seed=seed,
        training={"source_format": "transformers", "converted_from": model_dir.name},
    )
    if t5_state and hf_config.text_encoder:
        result.notes += _write_text_encoder_dir(out.parent / text_id.replace("/", "--"), hf_config.text_encoder,
                                                model_dir)
    return result


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def _write_text_encoder_dir(directory: Path, t5_config: dict, model_dir: Path) -> list[str]:
    """Give the text loader the T5 config (and the tokenizer, when the folder has it) it looks for
    beside the expert: transformers' MusicGen folders carry both. An existing folder is kept."""
    if directory.exists():
        return [f"{directory} already exists and was left as it is; it must hold the T5 config and tokenizer."]
    tokenizer = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    staging = temp_path(directory)  # ours alone (marker + pid): removing it on failure removes nothing else
    staging.mkdir(parents=True)
    try:
        (staging / "config.json").write_text(json.dumps(t5_config, indent=2))
        for file in tokenizer:
            shutil.copy2(file, staging / file.name)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not tokenizer:
        return [f"wrote {directory}/config.json; {model_dir} has no T5 tokenizer: add tokenizer.json or "
                f"spiece.model to {directory} to use text descriptions."]
    return []


# -- audiocraft format -------------------------------------------------------------------------

class AudiocraftTransformerLM(_Loose):
    """`transformer_lm` in audiocraft's xp.cfg: the sizes, and the switches this import assumes."""

    dim: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    num_layers: PositiveInt | None = None
    n_q: PositiveInt | None = None
    card: PositiveInt | None = None
    hidden_scale: float | None = None
    activation: Literal["gelu"] = "gelu"
    norm: Literal["layer_norm"] = "layer_norm"
    norm_first: Literal[True] = True
    positional_embedding: Literal["sin"] = "sin"
    layer_scale: None = None
    qk_layer_norm: Literal[False] = False
    qk_layer_norm_cross: Literal[False] = False
    kv_repeat: Literal[1] = 1
    past_context: None = None


class AudiocraftDelay(_Loose):
    delays: list[int] | None = None


class AudiocraftPattern(_Loose):
    modeling: Literal["delay"] = "delay"  # STAGE's token layout is MusicGen's delay pattern
    delay: AudiocraftDelay = AudiocraftDelay()


class AudiocraftFuser(_Loose):
    cross_attention_pos_emb: Literal[False] = False  # StageLM adds no positions to the text memory


class AudiocraftT5(_Loose):
    name: str = DEFAULT_TEXT_ENCODER


class AudiocraftDescription(_Loose):
    t5: AudiocraftT5 = AudiocraftT5()


class AudiocraftConditioners(_Loose):
    description: AudiocraftDescription = AudiocraftDescription()


class AudiocraftXpConfig(_Loose):
    """The parts of audiocraft's hydra config (`xp.cfg`) the import reads; the rest is ignored."""

    transformer_lm: AudiocraftTransformerLM = AudiocraftTransformerLM()
    codebooks_pattern: AudiocraftPattern = AudiocraftPattern()
    fuser: AudiocraftFuser = AudiocraftFuser()
    conditioners: AudiocraftConditioners = AudiocraftConditioners()


def _resolve_interpolations(node, root: dict):
    """Resolve the `${a.b}` references that `OmegaConf.to_yaml` leaves in a saved config."""
    if isinstance(node, dict):
        return {k: _resolve_interpolations(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_interpolations(v, root) for v in node]
    if isinstance(node, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", node)):
        target = root
        for part in m.group(1).split("."):
            if not isinstance(target, dict) or part not in target:
                return node  # a reference to something not saved: leave it for validation to report
            target = target[part]
        return _resolve_interpolations(target, root)
    return node


def read_audiocraft_lm(path: Path) -> tuple[dict[str, torch.Tensor], AudiocraftXpConfig, bool]:
    """(LM tensors, parsed xp.cfg, whether xp.cfg was present) from audiocraft's state_dict.bin."""
    import yaml

    if not path.is_file():
        raise StageStackError(f"{path}: no such file (expected audiocraft's state_dict.bin)")
    package = load_weights(path, "audiocraft's state_dict.bin (read with torch.load(weights_only=True))")
    if not isinstance(package, dict) or not isinstance(package.get("best_state"), dict):
        found = sorted(map(str, package)) if isinstance(package, dict) else type(package).__name__
        raise StageStackError(f"{path}: expected a dict with the LM weights under 'best_state' (audiocraft's "
                              f"state_dict.bin), found {found}.")
    state = package["best_state"]
    if isinstance(state.get("model"), dict):  # a training checkpoint rather than an exported one
        state = state["model"]
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointKeyError(str(path), unexpected=[f"{k} (not a tensor)" for k in not_tensors])
    # audiocraft itself loads `...mha.in_proj_weight` (nn.MultiheadAttention) into its fused layout
    tensors = {k.replace(".mha.", "."): v for k, v in state.items()}

    raw = package.get("xp.cfg")
    try:
        cfg = yaml.safe_load(raw) if isinstance(raw, str) else (raw or {})
        xp = AudiocraftXpConfig.model_validate(_resolve_interpolations(cfg, cfg) if isinstance(cfg, dict) else cfg)
    except yaml.YAMLError as e:
        raise StageStackError(f"{path}: 'xp.cfg' is not valid YAML ({e})") from None
    except ValidationError as e:
        raise StageStackError(describe_validation_error(f"{path} ['xp.cfg']", e) + "\n  This importer reads "
                              "MusicGen LMs (pre-norm, gelu, sinusoidal positions, delay pattern).") from None
    return tensors, xp, raw is not None


def plan_audiocraft_lm(shapes: dict[str, tuple], xp: AudiocraftXpConfig, source: str) -> tuple[StageLMConfig, KeyMap]:
    """LM config and key map for an audiocraft LM state, from shapes alone; checks every key
    (a fine-tuned T5 under `condition_provider.conditioners.description.t5.` is allowed)."""
    t = xp.transformer_lm
    lm_config = _infer_lm_config(
        source, shapes, embedding="emb.0.weight", head="linears.0.weight",
        fc1="transformer.layers.0.linear1.weight", text_proj=f"{AUDIOCRAFT_OUTPUT_PROJ}weight",
        embedding_pattern=r"emb\.(\d+)\.weight", layer_pattern=r"transformer\.layers\.(\d+)\..+",
        n_heads=t.num_heads)
    _check_config_agrees(f"{source} ['xp.cfg']", [
        ("transformer_lm.dim", t.dim, lm_config.dim),
        ("transformer_lm.num_layers", t.num_layers, lm_config.n_layers),
        ("transformer_lm.n_q", t.n_q, lm_config.n_q),
        ("transformer_lm.card", t.card, lm_config.card),
        ("transformer_lm.hidden_scale * dim", None if t.hidden_scale is None else round(t.hidden_scale * lm_config.dim),
         lm_config.ffn_dim),
        ("codebooks_pattern.delay.delays", xp.codebooks_pattern.delay.delays, list(range(lm_config.n_q))),
    ])
    key_map = audiocraft_key_map(lm_config)
    check_keys(source, {k: s for k, s in shapes.items() if not k.startswith(AUDIOCRAFT_T5)}, expected_shapes(key_map))
    return lm_config, key_map


def convert_musicgen_audiocraft(
    state_dict_bin: str | os.PathLike,
    compression_bin: str | os.PathLike,
    out: str | os.PathLike,
    *,
    instrument: str = "base",
    base_model: str = DEFAULT_BASE_MODEL,
    license: str = MUSICGEN_LICENSE,
    embed_codec: bool = False,
    seed: int = 0,
    pad_mode: str | None = "reflect",
    overwrite: bool = False,
) -> ImportedExpert:
    """Convert audiocraft's `state_dict.bin` + `compression_state_dict.bin` into a base expert.

    `pad_mode` overrides the codec's padding: STAGE runs MusicGen's codec with "reflect"
    (reference §2) while audiocraft's config says "constant"; None keeps xp.cfg's value.
    Everything is checked before anything is written; `seed` seeds the new SEP rows.
    """
    state_dict_bin, compression_bin, out = Path(state_dict_bin), Path(compression_bin), Path(out)
    _refuse_overwrite(out, overwrite)
    tensors, xp, has_cfg = read_audiocraft_lm(state_dict_bin)
    source = str(state_dict_bin)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    lm_config, key_map = plan_audiocraft_lm(shapes, xp, source)
    lm_state = assemble(key_map, tensors.__getitem__)

    overrides = {"pad_mode": pad_mode} if pad_mode is not None else {}
    codec_config, codec_state = load_audiocraft_compression(compression_bin, **overrides)
    codec = load_codec(codec_config, codec_state, str(compression_bin))

    notes = [] if has_cfg else [f"{source} has no 'xp.cfg': assumed {lm_config.n_heads} heads of "
                                f"{MUSICGEN_HEAD_DIM} (MusicGen's head width)."]
    t5_state = {k[len(AUDIOCRAFT_T5):]: v for k, v in tensors.items() if k.startswith(AUDIOCRAFT_T5)}
    return _write_base_expert(
        out, lm_config, lm_state, codec, t5_state, xp.conditioners.description.t5.name, notes,
        instrument=instrument, base_model=base_model, license=license, embed_codec=embed_codec, seed=seed,
        training={"source_format": "audiocraft",
                  "converted_from": f"{state_dict_bin.name} + {compression_bin.name}"},
    )


def load_codec(config: CodecConfig, state: dict[str, torch.Tensor], source: str) -> Codec:
    """A Codec holding `state` (transformers names), checked key by key first.

    Parameters are built on the meta device: every one comes from the checkpoint, so
    transformers' weight init (seconds for EnCodec's weight-norm convolutions) would be wasted.
    Buffers stay real: the conv layers keep their strides and paddings in non-persistent ones.
    """
    codec = build_empty(lambda: Codec(config))
    expected = {k: tuple(v.shape) for k, v in codec.model.state_dict().items()}
    check_keys(source, {k: tuple(v.shape) for k, v in state.items()}, expected)
    codec.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                strict=True, assign=True)
    left_on_meta = sorted(name for name, t in [*codec.named_parameters(), *codec.named_buffers()] if t.is_meta)
    if left_on_meta:  # a transformers version with tensors outside the state dict
        raise StageStackError(f"{source}: no values for codec tensors {left_on_meta}")
    return codec.eval()


# -- writing -----------------------------------------------------------------------------------

def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise StageStackError(f"{out} already exists; choose another output path or pass overwrite=True "
                              "(--force on the command line) to replace it.")


def _codec_id(config: CodecConfig) -> str:
    if config == CodecConfig.musicgen_32khz():
        return "facebook/encodec_32khz"
    return f"encodec_{config.sample_rate // 1000}khz"


def _write_referenced(out: Path, stem: str, write: Callable[[Path], object]) -> tuple[Path, str]:
    """Write a file beside `out` as `<stem>-<sha256[:12]>.safetensors` -> (path, sha256).

    `write(path)` writes it (atomically) under a temporary name first. Naming by content means
    experts that share a codec or T5 share the file, and a different one never overwrites it.
    """
    tmp = temp_path(out.parent / f"{out.stem}.{stem}", ".tmp.safetensors")
    write(tmp)
    digest = sha256_file(tmp)
    final = out.parent / f"{stem}-{digest[:12]}.safetensors"
    os.replace(tmp, final)
    return final, digest


def _t5_tensors(t5_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5EncoderModel names, each tensor once (the text loader's convention: no `shared.weight`)."""
    state = dict(t5_state)
    shared = state.pop(T5_TIED_EMBEDDING, None)
    if shared is not None:
        state.setdefault(T5_EMBEDDING, shared)
    return state


def _write_base_expert(
    out: Path,
    lm_config: StageLMConfig,
    lm_state: dict[str, torch.Tensor],
    codec: Codec,
    t5_state: dict[str, torch.Tensor],
    text_id: str,
    notes: list[str],
    *,
    instrument: str,
    base_model: str,
    license: str,
    embed_codec: bool,
    seed: int,
    training: dict,
) -> ImportedExpert:
    codec_config = codec.config
    if (codec_config.n_q, codec_config.card) != (lm_config.n_q, lm_config.card):
        raise StageStackError(f"the codec has {codec_config.n_q} codebooks of {codec_config.card} codes but the LM "
                              f"models {lm_config.n_q} of {lm_config.card}: the two files are not from the same MusicGen.")
    t5_state = _t5_tensors(t5_state)
    if t5_state and T5_EMBEDDING in t5_state and t5_state[T5_EMBEDDING].shape[1] != lm_config.text_dim:
        raise StageStackError(f"the T5 encoder is {t5_state[T5_EMBEDDING].shape[1]} wide but the LM's text projection "
                              f"expects {lm_config.text_dim}: the T5 weights are not this MusicGen's.")

    generator = torch.Generator().manual_seed(seed)
    for k in range(lm_config.n_q):  # tables in codebook order, one SEP draw each
        lm_state[f"embeddings.{k}.weight"] = add_special_rows(lm_state[f"embeddings.{k}.weight"], generator)
    with torch.device("meta"):
        lm = StageLM(lm_config)
    lm.load_state_dict(lm_state, strict=True, assign=True)

    # Validate the metadata before writing anything; the file references are filled in below.
    try:
        metadata = ExpertMetadata.for_models(
            instrument,
            lm_config,
            codec_config,
            text_encoder_id=text_id,
            base_model=base_model,
            license=license,
            description="MusicGen imported as a STAGE base expert: its SEP rows are new, so fine-tune it "
                        "before generating stems with it.",
            training={**training, "fine_tuned": False,
                      "sep_init": {"method": "kaiming_normal_ on [1, dim] (fan_in, gain sqrt(2))", "seed": seed}},
        )
    except ValidationError as e:
        raise StageStackError(describe_validation_error(f"metadata for {out}", e)) from None

    result = ImportedExpert(expert=out, notes=list(notes))
    if not embed_codec:
        codec_id = _codec_id(codec_config)
        result.codec_file, digest = _write_referenced(out, codec_id.split("/")[-1],
                                                      lambda path: save_codec(path, codec, id=codec_id))
        metadata.codec = WeightsRef(embedded=False, id=codec_id, filename=result.codec_file.name, sha256=digest)
    if t5_state:
        slug = text_id.replace("/", "--")
        header = {"kind": json.dumps("text_encoder"), "id": json.dumps(text_id)}
        result.text_encoder_file, digest = _write_referenced(
            out, f"{slug}-encoder", lambda path: atomic_save_safetensors(t5_state, path, header))
        metadata.text_encoder = WeightsRef(embedded=False, id=text_id, filename=result.text_encoder_file.name,
                                           sha256=digest)
    else:
        result.notes.append(f"the source has no T5 weights: the expert names text encoder '{text_id}' but has no "
                            "weights for it, so it generates without text until T5 weights are added (the "
                            "transformers MusicGen folder includes them).")
    save_expert(out, metadata, lm, codec if embed_codec else None)
    return result
