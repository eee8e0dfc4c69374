"""Import official STAGE checkpoints (`stage-drums.safetensors`, `stage-bass.safetensors`).

Upstream saves the whole `LightningMusicgen` (reference §6): `lm.decoder.*` (x-transformers
names), `condition_provider.embedders.description.{output_proj,t5}.*` and `encodec_model.*`
(original-encodec names). Every size is read from the tensor shapes, so the same code converts
the real 611-key files and small fixtures. x-transformers fixes the head width at 64, which is
the one number the shapes cannot tell; pass `head_dim` if a checkpoint differs.

x-transformers lays blocks out as a flat list: with cross-attention every model layer i is
entries 3i (self-attention), 3i+1 (cross-attention), 3i+2 (feed-forward); without it 2i, 2i+1.
Each entry holds its pre-norm at `.0.0` and the sublayer at `.1`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..atomic import temp_path
from ..errors import CheckpointKeyError
from ..expert import (ExpertMetadata, WeightsRef, atomic_save_safetensors,
                      read_header, save_codec, save_expert, sha256_file)
from ..models.codec import Codec
from ..models.stage_lm import StageLM, StageLMConfig

LM = "lm.decoder."
OUTPUT_PROJ = "condition_provider.embedders.description.output_proj."
T5 = "condition_provider.embedders.description.t5."
ENCODEC = "encodec_model."
STAGE_HEAD_DIM = 64


def _layer_kinds(shapes: dict[str, tuple]) -> dict[int, str]:
    """x-transformers entry index -> 'attn' or 'ff', read from which weights it has."""
    kinds: dict[int, str] = {}
    for key in shapes:
        m = re.match(rf"{re.escape(LM)}attn_layers\.layers\.(\d+)\.1\.(to_q|ff)\.", key)
        if m:
            kinds[int(m.group(1))] = "attn" if m.group(2) == "to_q" else "ff"
    return dict(sorted(kinds.items()))


def infer_lm_config(shapes: dict[str, tuple], source: str, head_dim: int = STAGE_HEAD_DIM) -> StageLMConfig:
    """StageLMConfig from the shapes of an upstream checkpoint (keys with the `lm.decoder.` prefix)."""
    emb = [k for k in shapes if re.fullmatch(rf"{re.escape(LM)}token_emb\.emb\.\d+\.weight", k)]
    heads = [k for k in shapes if re.fullmatch(rf"{re.escape(LM)}to_logits\.linears\.\d+\.weight", k)]
    if not emb or not heads:
        raise CheckpointKeyError(source, missing=[f"{LM}token_emb.emb.0.weight"] * (not emb)
                                 + [f"{LM}to_logits.linears.0.weight"] * (not heads))
    input_card, dim = shapes[f"{LM}token_emb.emb.0.weight"]
    card = shapes[f"{LM}to_logits.linears.0.weight"][0]
    kinds = list(_layer_kinds(shapes).values())
    cross = kinds[:3] == ["attn", "attn", "ff"]
    period = 3 if cross else 2
    if len(kinds) % period:
        raise CheckpointKeyError(source, missing=[f"{LM}attn_layers.layers.{len(kinds)}.1.* "
                                                  f"(found {len(kinds)} entries, not a multiple of {period})"])
    ffn_key = f"{LM}attn_layers.layers.{period - 1}.1.ff.0.0.weight"
    ffn_dim = shapes[ffn_key][0] if ffn_key in shapes else 4 * dim
    text_dim = shapes.get(f"{OUTPUT_PROJ}weight", (dim, 768))[1]
    if input_card != card + 2:
        raise CheckpointKeyError(source, mis_shaped=[(f"{LM}token_emb.emb.0.weight", shapes[f"{LM}token_emb.emb.0.weight"],
                                                      (card + 2, dim))])
    return StageLMConfig(dim=dim, n_layers=len(kinds) // period, n_heads=dim // head_dim, ffn_dim=ffn_dim,
                         card=card, n_q=len(emb), cross_attention=cross, text_dim=text_dim)


def lm_key_map(config: StageLMConfig) -> dict[str, list[str]]:
    """Our StageLM key -> the upstream key(s) it is made from (concatenated in order)."""
    period = 3 if config.cross_attention else 2
    keys: dict[str, list[str]] = {}
    for k in range(config.n_q):
        keys[f"embeddings.{k}.weight"] = [f"{LM}token_emb.emb.{k}.weight"]
        keys[f"heads.{k}.weight"] = [f"{LM}to_logits.linears.{k}.weight"]
    for i in range(config.n_layers):
        a, f = period * i, period * i + period - 1
        up = f"{LM}attn_layers.layers."
        keys[f"blocks.{i}.self_norm.weight"] = [f"{up}{a}.0.0.weight"]
        keys[f"blocks.{i}.self_norm.bias"] = [f"{up}{a}.0.0.bias"]
        keys[f"blocks.{i}.self_attn.qkv.weight"] = [f"{up}{a}.1.to_{p}.weight" for p in "qkv"]
        keys[f"blocks.{i}.self_attn.out.weight"] = [f"{up}{a}.1.to_out.weight"]
        if config.cross_attention:
            c = a + 1
            keys[f"blocks.{i}.cross_norm.weight"] = [f"{up}{c}.0.0.weight"]
            keys[f"blocks.{i}.cross_norm.bias"] = [f"{up}{c}.0.0.bias"]
            keys[f"blocks.{i}.cross_attn.q.weight"] = [f"{up}{c}.1.to_q.weight"]
            keys[f"blocks.{i}.cross_attn.kv.weight"] = [f"{up}{c}.1.to_k.weight", f"{up}{c}.1.to_v.weight"]
            keys[f"blocks.{i}.cross_attn.out.weight"] = [f"{up}{c}.1.to_out.weight"]
        keys[f"blocks.{i}.ffn_norm.weight"] = [f"{up}{f}.0.0.weight"]
        keys[f"blocks.{i}.ffn_norm.bias"] = [f"{up}{f}.0.0.bias"]
        keys[f"blocks.{i}.ffn.fc1.weight"] = [f"{up}{f}.1.ff.0.0.weight"]
        keys[f"blocks.{i}.ffn.fc2.weight"] = [f"{up}{f}.1.ff.2.weight"]
    keys["final_norm.weight"] = [f"{LM}attn_layers.final_norm.weight"]
    keys["final_norm.bias"] = [f"{LM}attn_layers.final_norm.bias"]
    if config.cross_attention:
        keys["text_proj.weight"] = [f"{OUTPUT_PROJ}weight"]
        keys["text_proj.bias"] = [f"{OUTPUT_PROJ}bias"]
    return keys


def check_lm_keys(shapes: dict[str, tuple], config: StageLMConfig, source: str) -> dict[str, list[str]]:
    """Validate the upstream LM keys against the inferred config; names every problem at once."""
    key_map = lm_key_map(config)
    expected_ours = {k: tuple(v.shape) for k, v in _meta_lm(config).state_dict().items()}
    expected_up: dict[str, tuple] = {}
    for ours, ups in key_map.items():
        rows = expected_ours[ours][0] // len(ups)
        for up in ups:
            expected_up[up] = (rows, *expected_ours[ours][1:])
    present = {k: tuple(s) for k, s in shapes.items() if k.startswith((LM, OUTPUT_PROJ))}
    missing = sorted(k for k in expected_up if k not in present)
    unexpected = sorted(k for k in present if k not in expected_up)
    mis_shaped = [(k, present[k], expected_up[k]) for k in sorted(expected_up) if k in present and present[k] != expected_up[k]]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError(source, missing, unexpected, mis_shaped)
    return key_map


def _meta_lm(config: StageLMConfig) -> StageLM:
    with torch.device("meta"):
        return StageLM(config)


def convert_lm_state_dict(tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                          head_dim: int = STAGE_HEAD_DIM) -> tuple[StageLMConfig, dict[str, torch.Tensor]]:
    """Upstream `lm.decoder.*` (+ output_proj) tensors -> (config, StageLM state dict)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    config = infer_lm_config(shapes, source, head_dim)
    key_map = check_lm_keys(shapes, config, source)
    return config, {ours: torch.cat([tensors[u] for u in ups]) for ours, ups in key_map.items()}


def convert_stage_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    instrument: str,
    *,
    head_dim: int = STAGE_HEAD_DIM,
    embed_codec: bool | None = None,
    license: str = "CC-BY-NC-4.0",
    base_model: str = "facebook/musicgen-small",
    description: str = "",
    default_prompt: str = "",
) -> Path:
    """Convert an upstream STAGE `LightningMusicgen` safetensors file into an expert file.

    The codec is embedded when `embed_codec` is true; by default it is embedded only when small
    (< 5M parameters) and otherwise written once beside the expert (`<codec>-<sha12>.safetensors`)
    and referenced by sha256. T5 weights, when present, go to a referenced file the same way.
    Nothing is written unless every key checks out.
    """
    from safetensors.torch import load_file

    from .encodec import encodec_state_dict_to_hf, infer_codec_config, load_codec_state

    src, out = Path(src), Path(out)
    read_header(src)  # clear error on a truncated or non-safetensors file
    tensors = load_file(str(src))
    source = str(src)
    known = (LM, OUTPUT_PROJ, T5, ENCODEC)
    stray = sorted(k for k in tensors if not k.startswith(known))
    if stray:
        raise CheckpointKeyError(source, unexpected=stray)
    if not any(k.startswith(ENCODEC) for k in tensors):
        raise CheckpointKeyError(source, missing=[f"{ENCODEC}* (the EnCodec weights)"])

    config, lm_state = convert_lm_state_dict({k: v for k, v in tensors.items() if k.startswith((LM, OUTPUT_PROJ))},
                                             source, head_dim)
    codec_state = encodec_state_dict_to_hf({k: v for k, v in tensors.items() if k.startswith(ENCODEC)}, prefix=ENCODEC)
    codec_config = infer_codec_config(codec_state, sample_rate=32000)
    codec = Codec(codec_config)
    load_codec_state(codec, codec_state, source)
    lm = _meta_lm(config)
    lm.load_state_dict(lm_state, assign=True)

    n_codec = sum(v.numel() for v in codec_state.values())
    embed = embed_codec if embed_codec is not None else n_codec < 5_000_000
    written: list[Path] = []  # side files, removed again if anything later fails
    try:
        codec_ref = WeightsRef(embedded=True)
        if not embed:
            path, digest = _side_file(lambda tmp: save_codec(tmp, codec, id="facebook/encodec_32khz"), out, "encodec_32khz")
            written.append(path)
            codec_ref = WeightsRef(embedded=False, id="facebook/encodec_32khz", filename=path.name, sha256=digest)

        text_ref, text_id = None, None
        t5 = {k[len(T5):]: v for k, v in tensors.items() if k.startswith(T5)}
        if t5 and config.cross_attention:
            path, digest = _side_file(lambda tmp: atomic_save_safetensors(t5, tmp, {"kind": '"text_encoder"'}),
                                      out, "t5-base-encoder")
            written.append(path)
            text_ref, text_id = WeightsRef(embedded=False, id="t5-base", filename=path.name, sha256=digest), "t5-base"

        metadata = ExpertMetadata.for_models(
            instrument,
            config,
            codec_config,
            codec=codec_ref,
            text_encoder=text_ref,
            text_encoder_id=text_id,
            base_model=base_model,
            license=license,
            description=description,
            default_prompt=default_prompt,
            training={"source_format": "stage-lightning", "converted_from": src.name,
                      "max_context_seconds": 10.0, "max_target_seconds": 10.0},
        )
        return save_expert(out, metadata, lm, codec if embed else None)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _side_file(write, out: Path, name: str) -> tuple[Path, str]:
    """Write a shared weight file beside `out`, named by its content hash: (path, sha256)."""
    tmp = write(temp_path(out.parent / f"{out.stem}.{name}", ".tmp.safetensors"))
    digest = sha256_file(tmp)
    final = tmp.with_name(f"{name}-{digest[:12]}.safetensors")
    os.replace(tmp, final)
    return final, digest


def check_stage_key_list(entries: list[dict], head_dim: int = STAGE_HEAD_DIM) -> StageLMConfig:
    """Validate an upstream key list ({key, shape}) without tensors; returns the LM config.

    Used to check the full-size 611-key layout (reference §6) without 2 GB of weights.
    """
    from .encodec import encodec_state_dict_to_hf, infer_codec_config

    shapes = {e["key"]: tuple(e["shape"]) for e in entries}
    source = "key list"
    stray = sorted(k for k in shapes if not k.startswith((LM, OUTPUT_PROJ, T5, ENCODEC)))
    if stray:
        raise CheckpointKeyError(source, unexpected=stray)
    config = infer_lm_config(shapes, source, head_dim)
    check_lm_keys(shapes, config, source)
    codec_meta = {k: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(ENCODEC)}
    codec_state = encodec_state_dict_to_hf(codec_meta, prefix=ENCODEC)
    codec_config = infer_codec_config(codec_state, sample_rate=32000)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Codec(codec_config).model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in codec_state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mis = [(k, got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or mis:
        raise CheckpointKeyError(source, missing, unexpected, mis)
    return config
