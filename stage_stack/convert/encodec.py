"""EnCodec checkpoints in other namings -> transformers' `EncodecModel` state dict (what `Codec.model` holds).

Three sources share the SEANet naming of the original `encodec` repo:

- STAGE's bundled codec (`encodec_model.*` in a STAGE Lightning checkpoint), weight norm through
  `torch.nn.utils.parametrizations.weight_norm`: `...parametrizations.weight.original0/1`;
- the original `encodec` repo and audiocraft, weight norm through the older
  `torch.nn.utils.weight_norm`: `...weight_g` / `...weight_v`;
- audiocraft's `compression_state_dict.bin` (MusicGen's 32 kHz codec), a `torch.save`d dict with the
  state under `'best_state'` and the hydra config as a YAML string under `'xp.cfg'`.

Key map (source -> transformers):

    encoder.model.N.conv.conv.*            -> encoder.layers.N.conv.*
    decoder.model.N.convtr.convtr.*        -> decoder.layers.N.conv.*
    ....block.M.conv.conv.* / shortcut...  -> ....block.M.conv.* / shortcut.conv.*
    ....lstm.*                             -> unchanged
    *.weight_g / *.weight_v                -> *.parametrizations.weight.original0 / original1
    quantizer.vq.layers.i._codebook.*      -> quantizer.layers.i.codebook.*

Keys already in transformers' naming pass through unchanged, so the map is idempotent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointKeyError, StageStackError
from ..torchload import load_weights
from ..models.codec import Codec, CodecConfig

_KEY_RULES = [
    (re.compile(r"^(encoder|decoder)\.model\.(\d+)\."), r"\1.layers.\2."),
    (re.compile(r"\.conv\.conv\.|\.convtr\.convtr\."), ".conv."),
    (re.compile(r"\.weight_g$"), ".parametrizations.weight.original0"),
    (re.compile(r"\.weight_v$"), ".parametrizations.weight.original1"),
    (re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\."), r"quantizer.layers.\1.codebook."),
]


def encodec_key_to_hf(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


def encodec_state_dict_to_hf(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename an EnCodec state dict (legacy `weight_g/_v` or parametrization names) to transformers' names.

    Only keys starting with `prefix` are taken, with the prefix stripped, so a whole STAGE checkpoint
    can be passed with `prefix="encodec_model."`. Unknown keys are kept (renamed where a rule applies)
    so that `load_codec_state` reports them as unexpected instead of silently dropping them.
    """
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        new_key = encodec_key_to_hf(key[len(prefix):])
        if new_key in out:
            raise CheckpointKeyError(f"EnCodec state dict (prefix {prefix!r})",
                                     unexpected=[f"{key} (a second tensor for {new_key}: both legacy and "
                                                 "parametrization weight-norm names are present)"])
        out[new_key] = tensor
    return out


def _weight_v(sd: dict, module: str) -> torch.Tensor:
    return sd[f"{module}.parametrizations.weight.original1"]


def _indices(sd: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in sd if (m := regex.match(key))})


def infer_codec_config(state_dict: dict[str, torch.Tensor], *, sample_rate: int,
                       source: str = "EnCodec state dict", **overrides) -> CodecConfig:
    """Read a `CodecConfig` off the tensor shapes of an EnCodec state dict (any naming above).

    Inferred: channels, n_filters, kernel_size, dimension, last_kernel_size, ratios (each downsampling
    conv has kernel = 2 * stride), n_residual_layers, residual_kernel_size, compress, lstm_layers,
    true_skip (shortcut convs present or not), n_q, card, codebook_dim. The weights cannot tell the
    sample rate, padding mode, causality, dilation base or trim ratio: pass those as `sample_rate`
    and `overrides` (the defaults are MusicGen's / STAGE's: reflect, non-causal).
    """
    sd = encodec_state_dict_to_hf(state_dict)
    convs = _indices(sd, r"encoder\.layers\.(\d+)\.conv\.parametrizations\.weight\.original1$")
    blocks = _indices(sd, r"encoder\.layers\.(\d+)\.block\.")
    codebooks = _indices(sd, r"quantizer\.layers\.(\d+)\.codebook\.embed$")
    found = {
        "encoder.model.N.conv.conv.weight_v (input, downsampling and output convs)": len(convs) >= 3,
        "encoder.model.N.block.M.conv.conv.weight_v (residual blocks)": bool(blocks),
        "quantizer.vq.layers.i._codebook.embed": bool(codebooks),
    }
    if not all(found.values()):
        raise CheckpointKeyError(f"{source} (inferring the codec config)",
                                 missing=[name for name, ok in found.items() if not ok])
    first, *downsampling, last = convs
    first_v, last_v = _weight_v(sd, f"encoder.layers.{first}.conv"), _weight_v(sd, f"encoder.layers.{last}.conv")
    block_v = _weight_v(sd, f"encoder.layers.{blocks[0]}.block.1.conv")  # [dim // compress, dim, k]
    embed = sd[f"quantizer.layers.{codebooks[0]}.codebook.embed"]  # [card, codebook_dim]
    ratios = [_weight_v(sd, f"encoder.layers.{i}.conv").shape[-1] // 2 for i in downsampling]
    dimension = last_v.shape[0]
    inferred = dict(
        sample_rate=sample_rate,
        channels=first_v.shape[1],
        n_filters=first_v.shape[0],
        kernel_size=first_v.shape[-1],
        dimension=dimension,
        last_kernel_size=last_v.shape[-1],
        ratios=tuple(reversed(ratios)),  # the encoder downsamples by the decoder's ratios reversed
        n_residual_layers=len(blocks) // len(ratios),
        residual_kernel_size=block_v.shape[-1],
        compress=block_v.shape[1] // block_v.shape[0],
        lstm_layers=len(_indices(sd, r"encoder\.layers\.\d+\.lstm\.weight_ih_l(\d+)$")),
        true_skip=not any(".shortcut." in key for key in sd),
        n_q=len(codebooks),
        card=embed.shape[0],
        codebook_dim=None if embed.shape[1] == dimension else embed.shape[1],
    )
    inferred.update(overrides)
    return CodecConfig(**inferred)


def load_codec_state(codec: Codec, hf_state_dict: dict[str, torch.Tensor], source: str) -> Codec:
    """Load transformers-named weights into `codec`; name every missing, unexpected or mis-shaped key."""
    expected = codec.model.state_dict()
    missing = sorted(set(expected) - set(hf_state_dict))
    unexpected = sorted(set(hf_state_dict) - set(expected))
    mis_shaped = [(key, tuple(hf_state_dict[key].shape), tuple(expected[key].shape))
                  for key in sorted(set(expected) & set(hf_state_dict))
                  if hf_state_dict[key].shape != expected[key].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError(source, missing, unexpected, mis_shaped)
    codec.model.load_state_dict(hf_state_dict, strict=True)
    return codec


def _resolve(value, root: dict):
    """Resolve the `${a.b}` interpolations that `OmegaConf.to_yaml` leaves in the saved config."""
    while isinstance(value, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", value)):
        value = root
        for part in m.group(1).split("."):
            value = value[part]
    return value


def _lookup(cfg: dict, path: str, default=None):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = _resolve(node[part], cfg)
    return node


def load_audiocraft_compression(path: str | os.PathLike, **overrides) -> tuple[CodecConfig, dict[str, torch.Tensor]]:
    """Read audiocraft's `compression_state_dict.bin` -> (CodecConfig, transformers-named state dict).

    Shapes give the architecture (`infer_codec_config`); `xp.cfg` gives what shapes cannot (sample
    rate, pad_mode, causal, dilation base, trim ratio). Note that audiocraft's MusicGen codec is
    configured with pad_mode "constant" while STAGE runs the same weights with "reflect": pass
    `pad_mode="reflect"` to reproduce STAGE's tokens.
    """
    import yaml

    path = Path(path)
    package = load_weights(path, "audiocraft's compression_state_dict.bin (a torch checkpoint)")
    if not isinstance(package, dict):
        raise StageStackError(f"{path}: expected a dict (audiocraft's compression_state_dict.bin), "
                              f"got {type(package).__name__}")
    if "pretrained" in package and "best_state" not in package:
        raise StageStackError(f"{path} holds no weights, only a reference to the pretrained codec "
                              f"{package['pretrained']!r}. Use that codec's own compression_state_dict.bin.")
    state = package.get("best_state", package)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint rather than an exported one
    if not isinstance(state, dict):
        raise StageStackError(f"{path}: 'best_state' should be a state dict, got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    xp_cfg = package.get("xp.cfg") or {}
    cfg = yaml.safe_load(xp_cfg) if isinstance(xp_cfg, str) else dict(xp_cfg)
    if _lookup(cfg, "encodec.renormalize", False):
        raise StageStackError(f"{path}: xp.cfg has encodec.renormalize=true, which this codec wrapper does not "
                              "implement (MusicGen's codec has it false).")
    from_cfg = {
        "pad_mode": _lookup(cfg, "seanet.pad_mode"),
        "causal": _lookup(cfg, "seanet.causal"),
        "dilation_base": _lookup(cfg, "seanet.dilation_base"),
        "trim_right_ratio": _lookup(cfg, "seanet.decoder.trim_right_ratio"),
    }
    settings = {k: v for k, v in from_cfg.items() if v is not None}
    settings.update(overrides)
    sample_rate = settings.pop("sample_rate", None) or _lookup(cfg, "sample_rate")
    if sample_rate is None:
        raise StageStackError(f"{path}: xp.cfg does not give the sample rate; "
                              "pass sample_rate=... (32000 for MusicGen).")
    hf_state = encodec_state_dict_to_hf(tensors)
    return infer_codec_config(hf_state, sample_rate=int(sample_rate), source=str(path), **settings), hf_state
