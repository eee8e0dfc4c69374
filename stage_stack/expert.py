"""The expert file, format version 1: one `.safetensors` file with its metadata inside.

Tensors:
    lm.*            the StageLM (stage_stack.models.stage_lm names)
    codec.*         the codec (transformers EncodecModel names), only when the codec is embedded
    text_encoder.*  the T5 encoder (transformers T5EncoderModel names), only when embedded

`__metadata__` is string -> string; every value is JSON. `ExpertMetadata` is the one
description of it. Codecs: small codecs (the demo experts' ~1 MB) are embedded; a large shared
codec such as MusicGen's 59M-parameter EnCodec is *referenced* by id + filename + sha256 and
resolved from a codec directory (see `resolve_codec_file`), so experts sharing it do not each
carry it. The same holds for a T5 text encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atomic import atomic_path
from .errors import CheckpointKeyError, DeviceError, ExpertFormatError, IntegrityError
from .generation import SamplingParams, SamplingSettings, sampling_from
from .models.codec import Codec, CodecConfig
from .models.quant import release_freed_memory
from .models.stage_lm import StageLM, StageLMConfig

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# The one list of weight formats an LM can be loaded in (load_expert, Arranger, the CLI's --dtype).
# int8 / int4 are weight-only quantization applied at load time (stage_stack.models.quant):
# bfloat16 activations; the CFG mixing and the sampler run in float32 for every format.
WeightFormat = Literal["fp32", "bf16", "fp16", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
# "auto" is a choice, not a format: load_expert resolves it per device (machine.auto_weight_format).
FormatChoice = Literal["auto"] | WeightFormat
FORMAT_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FORMAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
                 "int4": torch.bfloat16}  # the floating-point parts (activations, norms, embeddings, heads)


class WeightsRef(BaseModel):
    """Where weights that are not inside the expert file come from."""

    model_config = ConfigDict(extra="forbid")
    embedded: bool = False
    id: str | None = None  # e.g. "facebook/encodec_32khz"
    filename: str | None = None  # file name looked up in the codec / text-encoder directories
    sha256: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "WeightsRef":
        if not self.embedded and not (self.filename and self.sha256):
            raise ValueError("a referenced weight file needs both 'filename' and 'sha256' (or set embedded: true)")
        if self.sha256 is not None and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        return self


class SpecialTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pad: int
    sep: int


def context_codec_mismatches(codec: CodecConfig, context: CodecConfig) -> list[tuple[str, Any, Any]]:
    """(field, the context codec's value, the expert codec's value) for each field the two must
    share: the context is cut on the target's frame grid and read one code per codebook."""
    return [(name, getattr(context, name), getattr(codec, name)) for name in ("sample_rate", "frame_rate", "n_q")
            if getattr(context, name) != getattr(codec, name)]


class ExpertMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    instrument: str = Field(min_length=1)
    lm_config: dict[str, Any]
    codec_config: dict[str, Any]
    codec: WeightsRef
    # A second codec that encodes the context only (embedded, tensors `context_codec.*`); None:
    # the context goes through `codec` as upstream. Its codes have their own embedding rows
    # (lm_config.context_card), so it may differ from `codec` in everything but the frame grid.
    context_codec_config: dict[str, Any] | None = None
    sample_rate: int
    frame_rate: int
    special_tokens: SpecialTokens
    text_encoder: WeightsRef | None = None
    text_encoder_id: str | None = None  # e.g. "t5-base" (tokenizer and config come from there)
    base_model: str = "none"
    license: str = "unknown"
    description: str = ""
    default_prompt: str = ""
    # The instruments whose stems the expert was trained to hear (its training's
    # data.context_stems); the Arranger then gives it those earlier layers only (Layer.hears).
    # None: it was trained on mixes of every other stem.
    hears: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    # The sampling this expert was measured best with (generation.SamplingParams fields; its
    # training config's export.sampling): the Arranger uses it for a layer that gives no params.
    # None: the reference's defaults.
    sampling: SamplingSettings | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    model_card: str = ""

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unknown expert format version {v}; this stage-stack reads version {FORMAT_VERSION}. "
                             "Upgrade stage-stack, or re-export the expert with this version")
        return v

    @field_validator("lm_config")
    @classmethod
    def _lm(cls, v: dict) -> dict:
        StageLMConfig.from_dict(v)
        return v

    @field_validator("codec_config", "context_codec_config")
    @classmethod
    def _codec(cls, v: dict | None) -> dict | None:
        if v is not None:
            CodecConfig.from_dict(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ExpertMetadata":
        lm, codec = self.lm_cfg, self.codec_cfg
        checks = [
            ("special_tokens.pad", self.special_tokens.pad, lm.pad_token),
            ("special_tokens.sep", self.special_tokens.sep, lm.sep_token),
            ("sample_rate", self.sample_rate, codec.sample_rate),
            ("frame_rate", self.frame_rate, codec.frame_rate),
            ("lm_config.n_q", lm.n_q, codec.n_q),
        ]
        for name, got, want in checks:
            if got != want:
                raise ValueError(f"{name} is {got} but the LM/codec configs imply {want}")
        if lm.card < codec.card:  # a larger LM vocabulary is harmless (the parity fixture has one)
            raise ValueError(f"lm_config.card is {lm.card}, smaller than codec_config.card {codec.card}: "
                             "the LM could not read every code")
        if self.text_encoder is not None and not lm.cross_attention:
            raise ValueError("text_encoder is set but lm_config.cross_attention is false")
        context = self.context_codec_cfg
        if (context is None) != (lm.context_card == 0):
            raise ValueError(f"lm_config.context_card is {lm.context_card} but context_codec_config is "
                             f"{'missing' if context is None else 'set'}: set both (a separate context codec) or "
                             "neither")
        if context is not None:
            for name, got, want in context_codec_mismatches(codec, context):
                raise ValueError(f"context_codec_config.{name} is {got}, expected {want} (the context is cut on the "
                                 "target's frame grid and read one code per codebook)")
            if lm.context_card < context.card:
                raise ValueError(f"lm_config.context_card is {lm.context_card}, smaller than "
                                 f"context_codec_config.card {context.card}: the LM could not read every context code")
        return self

    @classmethod
    def for_models(cls, instrument: str, lm_config: StageLMConfig, codec_config: CodecConfig,
                   **fields: Any) -> "ExpertMetadata":
        """Metadata for this LM and codec, with the fields they imply (rates, special tokens) filled in.

        `codec` defaults to embedded; every other field (license, base_model, ...) is passed through.
        """
        fields.setdefault("codec", WeightsRef(embedded=True))
        return cls(format_version=FORMAT_VERSION, instrument=instrument, lm_config=lm_config.to_dict(),
                   codec_config=codec_config.to_dict(), sample_rate=codec_config.sample_rate,
                   frame_rate=codec_config.frame_rate,
                   special_tokens=SpecialTokens(pad=lm_config.pad_token, sep=lm_config.sep_token), **fields)

    def sampling_params(self) -> SamplingParams:
        """The expert's own sampling (`sampling`), else the reference's defaults."""
        return sampling_from(self.sampling or {})

    @property
    def lm_cfg(self) -> StageLMConfig:
        return StageLMConfig.from_dict(self.lm_config)

    @property
    def codec_cfg(self) -> CodecConfig:
        return CodecConfig.from_dict(self.codec_config)

    @property
    def context_codec_cfg(self) -> CodecConfig | None:
        return None if self.context_codec_config is None else CodecConfig.from_dict(self.context_codec_config)

    # -- (de)serialisation to safetensors' string -> string header -----------------------------
    def to_header(self) -> dict[str, str]:
        # `hears` and `sampling` are left out when unset, so an expert that does not use them has
        # the header that stage-stack versions without the fields read.
        skip = {name for name in ("hears", "sampling") if getattr(self, name) is None}
        return {k: json.dumps(v) for k, v in self.model_dump(mode="json", exclude=skip).items()}

    @classmethod
    def from_header(cls, header: dict[str, str] | None, source: str) -> "ExpertMetadata":
        if not header or "format_version" not in header:
            raise ExpertFormatError(f"{source}: no stage-stack metadata in the safetensors header "
                                    "(field 'format_version' is missing). Is this an expert file? "
                                    "Convert checkpoints with `stage-stack convert`.")
        try:
            data = {k: json.loads(v) for k, v in header.items()}
        except json.JSONDecodeError as e:
            raise ExpertFormatError(f"{source}: metadata value is not JSON ({e})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ExpertFormatError(f"{source}: invalid expert metadata:\n{_format_validation(e)}") from None


def _format_validation(e: ValidationError) -> str:
    return "\n".join(f"  field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}" for err in e.errors())


# -- files ------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _canonical_header(tmp)
    return Path(path)


def _canonical_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys, in place and at the same length.

    safetensors writes its header from a hash map, so the same weights can give different
    bytes; a stable header makes the sha256 of a shared codec depend on its content only.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= n:
            f.seek(8)
            f.write(canonical + b" " * (n - len(canonical)))


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _check_offsets(header: dict, data_size: int) -> None:
    """What the safetensors format requires of the tensors' `data_offsets` (so that a bad file is
    refused here, with its name, rather than by the loader with a raw SafetensorError): each
    tensor's bytes match its dtype and shape, and together they tile the data buffer exactly,
    without gaps or overlaps."""
    spans = []
    for key, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"tensor {key!r} has an unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise ValueError(f"tensor {key!r}: shape and data_offsets must be non-negative integers")
        want = math.prod(shape) * _DTYPE_BYTES[dtype]
        if not 0 <= begin <= end or end - begin != want:
            raise ValueError(f"tensor {key!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but a {dtype} "
                             f"tensor of shape {list(shape)} needs {want}")
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise ValueError(f"tensor {key!r} (data_offsets [{begin}, {end}]) {what}")
        position = end
    if position > data_size:
        raise ValueError(f"tensor data ends at byte {position} of the data but the file holds {data_size} (truncated)")
    if position < data_size:
        raise ValueError(f"the file holds {data_size - position} bytes after the last tensor")


def read_header(path: str | os.PathLike) -> tuple[dict[str, str] | None, dict[str, tuple[str, list[int]]]]:
    """(metadata, {key: (dtype, shape)}) without loading tensors; clear error on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFormatError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file (truncated?)")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        entries = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
        _check_offsets(header, size - 8 - n)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ExpertFormatError(f"{path}: not a valid safetensors file ({e}). "
                                "Re-download or re-export it.") from None
    return meta, entries


def read_metadata(path: str | os.PathLike) -> ExpertMetadata:
    meta, _ = read_header(path)
    return ExpertMetadata.from_header(meta, str(path))


def save_expert(
    path: str | os.PathLike,
    metadata: ExpertMetadata,
    lm: StageLM,
    codec: Codec | None = None,
    text_encoder: torch.nn.Module | None = None,
    context_codec: Codec | None = None,
) -> Path:
    """Write an expert file atomically. `codec` is required when metadata.codec.embedded, and
    `context_codec` when metadata.context_codec_config is set."""
    from .models.quant import is_quantized

    if is_quantized(lm):
        raise ValueError("this LM was loaded as int8/int4 (quantized at load time); save the float LM it came "
                         "from instead (load the expert with dtype='fp32' or 'bf16')")
    tensors = {f"lm.{k}": v for k, v in lm.state_dict().items()}
    if metadata.codec.embedded:
        if codec is None:
            raise ValueError("metadata.codec.embedded is true: pass the codec to save_expert")
        tensors.update({f"codec.{k}": v for k, v in codec.model.state_dict().items()})
    if (metadata.context_codec_config is None) != (context_codec is None):
        raise ValueError("pass context_codec exactly when metadata.context_codec_config is set")
    if context_codec is not None:
        if context_codec.config.to_dict() != metadata.context_codec_config:
            raise ValueError("metadata.context_codec_config does not describe the context codec being saved")
        tensors.update({f"context_codec.{k}": v for k, v in context_codec.model.state_dict().items()})
    if metadata.text_encoder is not None and metadata.text_encoder.embedded:
        if text_encoder is None:
            raise ValueError("metadata.text_encoder.embedded is true: pass the text encoder to save_expert")
        from .models.text import encoder_state_dict  # drops T5's tied `shared.weight` duplicate

        tensors.update({f"text_encoder.{k}": v for k, v in encoder_state_dict(text_encoder).items()})
    if StageLMConfig.from_dict(metadata.lm_config) != lm.config:
        raise ValueError("metadata.lm_config does not describe the LM being saved")
    return atomic_save_safetensors(tensors, path, metadata.to_header())


def relabel_expert(src: str | os.PathLike, out: str | os.PathLike, instrument: str, *,
                   description: str | None = None, default_prompt: str | None = None) -> Path:
    """Copy an expert file with a new instrument name (and optionally description / default prompt).

    The weights are copied as they are; only the metadata changes, and it is validated like any
    expert's. A codec referenced by filename is looked up beside OUT (or in the codec cache), so
    put OUT beside the codec file or install the codec (`stage_stack.registry.install_codec`).
    """
    from safetensors import safe_open

    src, out = Path(src), Path(out)
    metadata = read_metadata(src)
    update: dict[str, Any] = {"instrument": instrument}
    if description is not None:
        update["description"] = description
    if default_prompt is not None:
        update["default_prompt"] = default_prompt
    relabelled = ExpertMetadata.model_validate({**metadata.model_dump(), **update})
    with safe_open(str(src), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return atomic_save_safetensors(tensors, out, relabelled.to_header())


def save_codec(path: str | os.PathLike, codec: Codec, id: str = "") -> Path:
    """A standalone codec file that experts can reference by filename + sha256."""
    meta = {"kind": json.dumps("codec"), "id": json.dumps(id), "codec_config": json.dumps(codec.config.to_dict())}
    return atomic_save_safetensors(codec.model.state_dict(), path, meta)


# -- devices ----------------------------------------------------------------------------------

def resolve_format(value: str | torch.dtype, device: str | torch.device | None = None) -> str:
    """A weight format name (`WeightFormat`) from a name, an alias (float32, ...) or a torch dtype.

    "auto" stays "auto" without a device, and is the device's format with one
    (`stage_stack.machine.auto_weight_format`).
    """
    if isinstance(value, torch.dtype):
        value = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(value, str(value))
    name = FORMAT_ALIASES.get(value, value) if isinstance(value, str) else value
    if name == "auto":
        if device is None:
            return "auto"
        from .machine import auto_weight_format

        return auto_weight_format(device)
    if name not in WEIGHT_FORMATS:
        raise DeviceError(f"dtype {value!r} is not supported; use one of auto, {', '.join(WEIGHT_FORMATS)} "
                          "(or float32, bfloat16, float16)")
    return name


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported; use one of float32, bfloat16, float16")
        return dtype
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r} is not a valid torch device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r} requested but MPS is not available; use device='cpu'")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


# -- loading ----------------------------------------------------------------------------------

def _check_keys(source: str, entries: dict, prefix: str, expected: dict[str, torch.Size]) -> None:
    present = {k[len(prefix):]: shape for k, (_, shape) in entries.items() if k.startswith(prefix)}
    missing = sorted(prefix + k for k in expected if k not in present)
    unexpected = sorted(prefix + k for k in present if k not in expected)
    mis_shaped = [(prefix + k, present[k], tuple(s)) for k, s in expected.items()
                  if k in present and tuple(present[k]) != tuple(s)]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError(source, missing, unexpected, mis_shaped)


def _fill(module: torch.nn.Module, path: Path, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a meta-device module from the file, tensor by tensor (accelerate's loader)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in module.state_dict():
            value = f.get_tensor(prefix + name)
            target_dtype = dtype if value.is_floating_point() else None
            set_module_tensor_to_device(module, name, device, value=value, dtype=target_dtype)
    module.to(device)  # non-persistent buffers (not in the file) follow the weights


def _fill_quantized(lm: torch.nn.Module, path: Path, prefix: str, device: torch.device, dtype: torch.dtype,
                    fmt: str) -> None:
    """`_fill` for int8 / int4: each block linear's float weight is quantized as it is read."""
    from safetensors import safe_open

    from .models.quant import replace_linears

    names = set(replace_linears(lm, fmt, device=device))
    float_names = [n for n in lm.state_dict() if n.rpartition(".")[0] not in names]
    from accelerate.utils import set_module_tensor_to_device

    with safe_open(str(path), framework="pt") as f:
        for name in float_names:
            value = f.get_tensor(prefix + name)
            set_module_tensor_to_device(lm, name, device, value=value,
                                        dtype=dtype if value.is_floating_point() else None)
        for name in sorted(names):
            lm.get_submodule(name).set_weight(f.get_tensor(prefix + name + ".weight"))
            release_freed_memory()  # per matrix: freed float copies would otherwise pile up
    lm.to(device)


def _load_codec(path: Path, entries: dict, prefix: str, config: CodecConfig, device) -> Codec:
    """A float32 codec from the tensors under `prefix` of the safetensors file `path` (keys checked)."""
    codec = build_empty(lambda: Codec(config), stored_params(entries, prefix))
    _check_keys(str(path), entries, prefix, {k: v.shape for k, v in codec.model.state_dict().items()})
    _fill(codec.model, path, prefix, device, torch.float32)
    return codec.eval()


# Below this many parameters a module is built with real tensors and then filled from the file:
# a meta-device build costs more than it saves there (its first init call imports torch._dynamo,
# 1.3 s of a 4.5 s demo arrangement on 2 cores) while real tensors cost milliseconds and a few MB.
EMPTY_BUILD_MIN_PARAMS = 20_000_000


def stored_params(entries: dict, prefix: str) -> int:
    """Elements of the tensors under `prefix` in a read_header() listing."""
    return sum(math.prod(shape) for key, (_, shape) in entries.items() if key.startswith(prefix))


def build_empty(factory, n_params: int | None = None):
    """`factory()` with its parameters on the meta device (no memory, filled later), or built
    for real when `n_params` says the module is small (EMPTY_BUILD_MIN_PARAMS)."""
    if n_params is not None and n_params < EMPTY_BUILD_MIN_PARAMS:
        return factory()
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def codec_search_dirs(extra: list[str | os.PathLike] = ()) -> list[Path]:
    from .paths import codec_dir

    return [Path(p) for p in extra] + [codec_dir()]


def resolve_codec_file(ref: WeightsRef, expert_path: Path, search: list[str | os.PathLike] = ()) -> Path:
    """Find a referenced codec file beside the expert or in the codec directories; verify sha256."""
    dirs = [expert_path.parent] + codec_search_dirs(search)
    mismatched: list[str] = []  # same-named files with other weights: a later directory may still hold the right one
    for d in dirs:
        for name in (ref.filename, f"{ref.sha256}.safetensors"):
            candidate = d / name
            if candidate.is_file():
                digest = sha256_file(candidate)
                if digest == ref.sha256:
                    return candidate
                mismatched.append(f"{candidate} (sha256 {digest})")
    if mismatched:
        raise IntegrityError(f"{expert_path.name} expects sha256 {ref.sha256} for codec {ref.id or ref.filename}, "
                             f"but found only: {'; '.join(mismatched)}. Replace the file, or install the right one "
                             f"with `stage-stack install-codec PATH/{ref.filename}`.")
    where = ", ".join(str(d) for d in dirs)
    raise ExpertFormatError(f"{expert_path}: its codec {ref.id or ''} ({ref.filename}, sha256 {ref.sha256[:12]}…) "
                            f"was not found in: {where}. Install it with "
                            f"`stage-stack install-codec PATH/{ref.filename}`.")


@dataclass
class Expert:
    """A loaded expert: its metadata, LM, codec and (optional) text conditioner."""

    metadata: ExpertMetadata
    lm: StageLM
    codec: Codec
    path: Path
    sha256: str | None = None
    text: Any = None  # stage_stack.models.text.TextConditioner when the expert uses text
    weight_format: str = "fp32"  # the LM's WeightFormat, as loaded
    context_codec: Codec | None = None  # encodes the context when the expert has its own (metadata)

    @property
    def context_encoder(self) -> Codec:
        """The codec that turns context audio into the codes this expert reads."""
        return self.codec if self.context_codec is None else self.context_codec

    @property
    def instrument(self) -> str:
        return self.metadata.instrument

    @property
    def sample_rate(self) -> int:
        return self.metadata.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.metadata.frame_rate

    @property
    def device(self) -> torch.device:
        return self.lm.final_norm.weight.device


def load_expert(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: FormatChoice | str | torch.dtype = "fp32",
    sha256: str | None = None,
    codec_dirs: list[str | os.PathLike] = (),
    load_text: bool = True,
) -> Expert:
    """Load an expert: LM in weight format `dtype` on `device`; codec (always float32) on the same device.

    `dtype` is a `WeightFormat`: fp32, bf16, fp16, or int8 / int4 (weight-only quantization of
    the block linears at load time, on the CPU; see stage_stack.models.quant); or "auto", the
    measured best for `device` (`stage_stack.machine.auto_weight_format`: int8 on a CPU with
    native bf16, bf16 on a GPU). fp32 is the default here because parity and training need it;
    the Arranger, the CLI and the studio default to "auto". The modules are
    built on the meta device and filled from the file tensor by tensor, so loading needs one
    copy of the weights in memory, not two (a quantized matrix is quantized as it is read).
    """
    path = Path(path)
    device = resolve_device(device)
    fmt = resolve_format(dtype, device)
    dtype = FORMAT_DTYPES[fmt]
    if fmt in ("int8", "int4") and device.type != "cpu":
        raise DeviceError(f"dtype {fmt!r} uses torch's CPU weight-only kernels; load it with device='cpu', "
                          "or use dtype='bf16' on this device")
    digest = None
    if sha256 is not None:
        digest = sha256_file(path) if path.is_file() else None
        if digest != sha256:
            raise IntegrityError(f"{path}: sha256 is {digest}, expected {sha256}. The file is corrupt or a "
                                 "different version; reinstall it with `stage-stack install`.")
    header, entries = read_header(path)
    metadata = ExpertMetadata.from_header(header, str(path))
    known_prefixes = ("lm.", "codec.", "text_encoder.") + (
        ("context_codec.",) if metadata.context_codec_config is not None else ())
    stray = sorted(k for k in entries if not k.startswith(known_prefixes))
    if stray:
        raise CheckpointKeyError(str(path), unexpected=stray)

    lm = build_empty(lambda: StageLM(metadata.lm_cfg), stored_params(entries, "lm."))
    _check_keys(str(path), entries, "lm.", {k: v.shape for k, v in lm.state_dict().items()})
    if fmt in ("int8", "int4"):
        _fill_quantized(lm, path, "lm.", device, dtype, fmt)
    else:
        _fill(lm, path, "lm.", device, dtype)
    lm.eval()

    if metadata.codec.embedded:
        codec = _load_codec(path, entries, "codec.", metadata.codec_cfg, device)
    else:
        codec_path = resolve_codec_file(metadata.codec, path, codec_dirs)
        codec = _load_codec(codec_path, read_header(codec_path)[1], "", metadata.codec_cfg, device)
    context_codec = None
    if metadata.context_codec_cfg is not None:
        context_codec = _load_codec(path, entries, "context_codec.", metadata.context_codec_cfg, device)

    text = None
    if load_text and metadata.text_encoder is not None:
        from .models.text import load_text_conditioner

        text = load_text_conditioner(metadata, path, device)
    # The conversions while reading leave freed heap pages resident (glibc): 78 MB after a
    # MusicGen-small-size bf16 build, a tenth of what a 10 s call may then use.
    release_freed_memory()
    return Expert(metadata, lm, codec, path, digest, text, fmt, context_codec)
