"""Training configs, read from YAML: `TrainConfig` (an expert) and `CodecTrainConfig` (a codec).

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error rather
than a silently ignored setting. `load_config(path, TrainConfig)` turns any problem into one
`TrainingConfigError` that names the file, the field (dotted path), what was given and the
expected form. Relative paths inside a config are relative to the directory the command runs
in (the repository root for the shipped `configs/*.yaml`).

The fields in `RESUME_KEYS` decide what a run *is*; resuming a run with different values
there is refused (`check_resume_compatible`), while step counts, intervals and the export
section may change between sessions (for example to train longer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import TrainingConfigError
from ..generation import SamplingSettings
from ..models.codec import CodecConfig

Precision = Literal["no", "fp16", "bf16", "auto"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- data ------------------------------------------------------------------------------------

class SynthSpec(_Section):
    """A synthetic-band dataset that is written to its folder when the folder does not exist yet
    (deterministic by seed, so every machine trains on the same songs)."""

    n_songs: int = Field(gt=0)
    seed: int = 0
    duration: float = Field(30.0, gt=0)
    sample_rate: int = Field(16000, gt=0)
    bpm_range: tuple[float, float] | None = None

    def ensure(self, root: str | os.PathLike) -> Path:
        """Write the songs into `root` unless it exists; a half-written folder never appears.

        Two runs that need the same folder (a codec and an expert training started together)
        take turns on `.ROOT.lock` beside it: the second waits and then finds the folder written.
        """
        import shutil
        import tempfile

        from ..locks import exclusive
        from .synth import write_dataset

        root = Path(root)
        if root.exists():
            return root
        root.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(root.parent / f".{root.name}.lock", f"the synthetic dataset {root}", wait=True):
            if root.exists():  # written by the run we waited for
                return root
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
            try:
                write_dataset(tmp, self.n_songs, seed=self.seed, duration=self.duration,
                              sample_rate=self.sample_rate, bpm_range=self.bpm_range)
                tmp.rename(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return root


# -- expert training ---------------------------------------------------------------------------

class FreshModel(_Section):
    """A new small LM (random init, context conditioning only: text conditioning needs the T5
    encoder and projection of an imported base expert). Its codec comes from a codec file
    written by `stage-stack train-codec`, or from an expert file that embeds one."""

    codec: Path
    dim: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    ffn_dim: int = Field(1024, gt=0)
    init_seed: int = 0
    # StageLMConfig.positions: "aligned" gives target frame t the position of context frame t
    positions: Literal["stage", "aligned"] = "stage"
    # A second codec file (from `stage-stack train-codec`) that encodes the contexts only: the
    # expert hears through it and plays through `codec` (StageLMConfig.context_card). None: one
    # codec, as upstream. It must share `codec`'s sample rate, frame rate and codebook count.
    context_codec: Path | None = None
    # A chord stream (StageLMConfig.chord_classes, stage_stack.chords): the LM generates each
    # frame's chord before its audio codes, trained on the songs' metadata.json chords. Not in
    # STAGE's recipe.
    chord_stream: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "FreshModel":
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        return self


class BaseSpec(_Section):
    """Where training starts: exactly one of an expert file (e.g. an imported MusicGen) or a fresh LM."""

    expert: Path | None = None
    fresh: FreshModel | None = None
    # With `expert`: a codec file (or an expert file embedding one) that replaces the expert's
    # codec. It must give the same codes (`codec_fingerprint`: a decoder retrained with the
    # encoder frozen), so the LM's vocabulary is unchanged; only how its stems sound changes.
    codec: Path | None = None
    # With `expert`: give its LM a chord stream (FreshModel.chord_stream). The expert's streams
    # move one place up (their delays grow by one step); the chord stream's table and head start
    # fresh (seeded by `seed`).
    add_chord_stream: bool = False
    # With `expert` (one codec): a codec file it learns to hear its contexts through (as
    # FreshModel.context_codec), with fresh embedding rows for that codec's codes; it plays
    # through its own codec as before.
    add_context_codec: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "BaseSpec":
        if (self.expert is None) == (self.fresh is None):
            raise ValueError("set exactly one of 'expert' (a base expert file) or 'fresh' (a new small LM)")
        if self.add_context_codec is not None and self.expert is None:
            raise ValueError("add_context_codec gives a base expert's LM a context codec; a fresh LM names one "
                             "with base.fresh.context_codec")
        if self.add_chord_stream and self.expert is None:
            raise ValueError("add_chord_stream grows a base expert's LM; a fresh LM asks for one with "
                             "base.fresh.chord_stream: true")
        if self.codec is not None and self.expert is None:
            raise ValueError("codec replaces a base expert's codec; a fresh LM names its own (base.fresh.codec)")
        return self


class DataConfig(_Section):
    """STAGE pairs for one target stem (reference §5), sampled from a pre-tokenized cache.

    The songs under `root` are encoded once with the expert's codec into
    `cache/<fingerprint>/` (`token_cache.pretokenize`; the fingerprint covers the codec's
    weights and the augmentation settings, so a retrained codec never reads stale codes). The
    cache holds every stem and context mix, so experts for different stems share it.
    Augmentation happens there: variant 0 is the song as written, variants 1.. a speed and/or
    pitch change drawn from `speed` / `pitch`.
    """

    root: Path  # MoisesDB-style folder (e.g. the synthetic band)
    cache: Path  # parent folder of the token caches
    target_stem: str = Field(min_length=1)
    valid_root: Path | None = None  # held-out songs; default: the last `n_valid` songs of `root`
    n_valid: int = Field(4, ge=0)  # used when valid_root is not set
    synth: SynthSpec | None = None  # write `root` with the synthetic band if it is missing
    valid_synth: SynthSpec | None = None  # the same for `valid_root`
    variants: int = Field(4, gt=0)  # encoded versions of each training song (1 = no augmentation)
    identity_prob: float = Field(0.25, ge=0, le=1)  # chance a pair uses the unaugmented variant
    speed: tuple[float, float] = (0.8, 1.2)  # time ratio range of the augmented variants
    pitch: tuple[int, int] = (-4, 4)  # semitone range of the augmented variants
    max_mixes_per_target: int = Field(7, gt=0)
    segment_seconds: float = Field(10.0, gt=0)  # target length
    context_seconds: tuple[float, float] = (5.0, 10.0)
    full_context_prob: float = Field(0.05, ge=0, le=1)
    click_prob: float = Field(0.5, ge=0, le=1)
    # Not in STAGE's recipe: the chance that a training pair's stem context is every audible
    # other stem (the densest mix) instead of upstream's size-uniform draw; validation keeps
    # upstream's draw. 0 = upstream.
    all_stems_prob: float = Field(0.0, ge=0, le=1)
    # Not in STAGE's recipe: the only stems a stem context may hold, in training and validation
    # alike (an expert meant to hear chosen layers, as `Layer.hears` gives it); None = all others.
    context_stems: tuple[str, ...] | None = None
    valid_samples: int = Field(32, gt=0)  # fixed validation pairs

    @field_validator("context_seconds", "speed")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected [low, high] with 0 < low <= high, got {list(v)}")
        return v

    @field_validator("pitch")
    @classmethod
    def _pitch(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] > v[1]:
            raise ValueError(f"expected [low, high] semitones with low <= high, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _context_fits(self) -> "DataConfig":
        if self.context_seconds[1] > self.segment_seconds:
            raise ValueError(f"context_seconds max ({self.context_seconds[1]}) exceeds segment_seconds "
                             f"({self.segment_seconds})")
        if self.context_stems is not None and (not self.context_stems or self.target_stem in self.context_stems):
            raise ValueError(f"context_stems must name at least one stem other than target_stem "
                             f"'{self.target_stem}', got {list(self.context_stems)}")
        if self.valid_root is None and self.n_valid == 0:
            raise ValueError("no validation data: set 'valid_root' or 'n_valid' > 0")
        return self


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0)  # peak LR of the whole model (phase 2)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip_norm: float | None = Field(1.0, gt=0)  # None: no clipping

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class ScheduleConfig(_Section):
    """The paper's two phases (reference §5, "context-token warm-up").

    Phase 1 (`embed_only_steps`): only the embedding tables (SEP row included) and the text
    projection learn, at `lr * (1 + embed_lr_boost * (1 - step / embed_only_steps))`; the rest
    of the model has LR 0. Phase 2: everything learns; the rest of the model ramps linearly
    from 0 to `lr` over `unfreeze_ramp_steps` (0 = at once, as upstream).
    """

    max_steps: int = Field(gt=0)  # optimizer steps
    embed_only_steps: int = Field(1000, ge=0)
    embed_lr_boost: float = Field(1.5, ge=0)
    unfreeze_ramp_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(1.0, gt=0, le=1)  # < 1: cosine decay after the ramp, to lr * ratio at max_steps


class DropoutConfig(_Section):
    """Condition dropout for classifier-free guidance (reference §1 and §3)."""

    context: float = Field(0.1, ge=0, le=1)  # whole context row -> PAD
    text: float = Field(0.5, ge=0, le=1)  # description -> null condition
    words: float = Field(0.3, ge=0, le=1)  # each word of a kept description
    # Whole target row -> PAD in the LM's input (its labels are kept): those rows must be
    # predicted from the context alone. Not in STAGE's recipe; see configs/history/demo-drums-align.yaml.
    history: float = Field(0.0, ge=0, le=1)
    # Whole context row -> the target's own first frames (an aligned copy, at most the target's
    # length). Not in STAGE's recipe.
    self_context: float = Field(0.0, ge=0, le=1)
    # An LM with a chord stream: the chance that a row's past chord tokens -> PAD in the input
    # (labels kept), so that it names each frame's chord from what it hears, not from the chord
    # before. `history` then hides the audio streams only: those rows play from their chords.
    chord_history: float = Field(0.0, ge=0, le=1)


class LossConfig(_Section):
    """How target frames are weighted in the training loss (validation losses are never weighted)."""

    # A target frame weighs 1 + onset_weight x its stem's onset strength there (the rise of the
    # stem's per-frame peak, scaled to [0, 1] per pair); 0 is STAGE's plain mean. Not in STAGE's
    # recipe: it puts more of the gradient on the frames whose timing the context decides.
    onset_weight: float = Field(0.0, ge=0)
    # An auxiliary objective, not in STAGE's recipe: a linear head on the hidden state that
    # predicts a target frame's first codebook also predicts the pitch classes of the song's chord
    # at that frame (binary cross-entropy over 12, from data.root's metadata.json chords), weighted
    # by harmony_weight, on pairs whose context is kept stems (a click or a dropped context does
    # not carry the harmony). It pushes the LM to fetch the harmony of the moment from what it
    # hears. The head is training-only: it is checkpointed, never exported. 0 = off.
    harmony_weight: float = Field(0.0, ge=0)
    # The same for the beat (`training/auxiliary.py`): the head names where each target frame
    # falls within its beat (4 bins, cross-entropy, from the songs' beat grid) on pairs whose
    # context is kept stems or a click: the drums must take the beat from a mix they hear.
    beat_weight: float = Field(0.0, ge=0)
    # An LM with a chord stream (base.fresh.chord_stream, base.add_chord_stream): the chord
    # stream's cross-entropy counts this many times in the training loss (1: one stream among
    # n_q + 1). Not in STAGE's recipe: the keys play the chord they name, and naming it is what
    # they miss (benchmarks/README.md), so more of the gradient goes to hearing the chord.
    chord_weight: float = Field(1.0, ge=0)


class ExportConfig(_Section):
    output: Path  # the expert file written at the end (again by `stage-stack train --resume` on a finished run)
    license: str = "MIT"
    description: str = ""
    default_prompt: str = ""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # LM weights in the file
    notes: str = ""  # extra text appended to the model card
    # The sampling the Arranger uses for this expert when a layer gives none (generation.
    # SamplingParams fields, e.g. {temperature: 0.5}); say in `notes` what measured it. None: the
    # reference's defaults.
    sampling: SamplingSettings | None = None


class TrainConfig(_Section):
    instrument: str = Field(min_length=1)
    run_dir: Path  # checkpoints, logs and metrics
    seed: int = 0
    base: BaseSpec
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig
    dropout: DropoutConfig = DropoutConfig()
    loss: LossConfig = LossConfig()
    export: ExportConfig
    batch_size: int = Field(8, gt=0)  # per process and micro-step
    grad_accum: int = Field(1, gt=0)
    # "auto": bf16 on a GPU that has it; on the CPU bf16 only where a probe finds it faster than
    # float32 (`machine.bf16_training_ratio`: on some CPUs it is 13x slower).
    mixed_precision: Precision = "no"
    cpu: bool = False  # force the CPU even when a GPU is present
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    eval_every: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    torch_threads: int | None = Field(None, gt=0)  # CPU threads for torch (None: torch's default)


# Fields that define a run: changing them and resuming would silently train something else.
# `base.fresh.codec` is not among them: a codec file whose decoder was retrained (same codes) may
# replace it; train.py compares the codec's code fingerprint instead.
RESUME_KEYS = ("instrument", "seed", "base.expert", "base.fresh.dim", "base.fresh.n_layers", "base.fresh.n_heads",
               "base.fresh.ffn_dim", "base.fresh.init_seed", "base.fresh.chord_stream", "base.add_chord_stream",
               "base.add_context_codec", "data", "optim", "dropout", "batch_size", "grad_accum",
               "schedule.embed_only_steps", "schedule.embed_lr_boost", "schedule.unfreeze_ramp_steps",
               "schedule.min_lr_ratio", "mixed_precision", "loss")


# -- codec training ----------------------------------------------------------------------------

class CodecDataConfig(_Section):
    root: Path  # MoisesDB-style folder of training songs
    valid_root: Path  # held-out songs for the metrics
    synth: SynthSpec | None = None  # write `root` with the synthetic band if it is missing
    valid_synth: SynthSpec | None = None
    segment_seconds: float = Field(1.0, gt=0)
    batch_size: int = Field(16, gt=0)
    mix_prob: float = Field(0.35, ge=0, le=1)  # a sum of 2+ stems (contexts are mixes)
    click_prob: float = Field(0.1, ge=0, le=1)  # a click track (drum contexts are clicks)
    silence_threshold: float = Field(0.01, ge=0)
    # The stems a clip (and a mix) is drawn from; None = every stem. One stem trains a decoder for
    # one instrument's waveform on codes it shares with the other experts (`train_encoder: false`).
    stems: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _probs(self) -> "CodecDataConfig":
        if self.mix_prob + self.click_prob > 1:
            raise ValueError(f"mix_prob + click_prob must be <= 1, got {self.mix_prob} + {self.click_prob}")
        if self.stems is not None and not self.stems:
            raise ValueError("stems must name at least one stem (or be left out for every stem)")
        return self


class CodecLossConfig(_Section):
    l1: float = Field(1.0, ge=0)  # waveform L1
    stft: float = Field(1.0, ge=0)  # multi-resolution STFT (spectral convergence + log magnitude)
    mel: float = Field(1.0, ge=0)  # multi-scale log-mel L1
    commitment: float = Field(1.0, ge=0)
    # Teach the first codebook onsets and pitch class (training/codec_features.py); 0 = off.
    onset: float = Field(0.0, ge=0)
    chroma: float = Field(0.0, ge=0)
    # "absolute": the onset strength as computed (a click reaches ~8, a synth note ~1, so drums
    # and clicks dominate the loss); "clip": standardized per clip, so the soft onsets of a mix
    # without drums weigh as much as hits (what a drums expert must hear in a mix).
    onset_scale: Literal["absolute", "clip"] = "absolute"
    stft_sizes: list[int] = [128, 256, 512, 1024]
    mel_sizes: list[int] = [512, 1024, 2048]
    n_mels: int = Field(64, gt=0)


class QuantizerTrainConfig(_Section):
    ema_decay: float = Field(0.99, gt=0, lt=1)
    dead_code_threshold: float = Field(0.5, ge=0)  # EMA usage count below which a code is re-seeded
    kmeans_iters: int = Field(10, ge=0)
    init_batches: int = Field(4, gt=0)  # batches of latents the k-means initialisation sees


class CodecEvalConfig(_Section):
    n_songs: int = Field(4, gt=0)
    seconds: float = Field(8.0, gt=0)


class CodecTrainConfig(_Section):
    id: str = "stage-stack/demo-codec"
    run_dir: Path
    output: Path  # the codec file (stage_stack.expert.save_codec format)
    seed: int = 0
    codec: dict[str, Any]  # CodecConfig fields
    # Start from the weights of a codec file. With train_encoder false, the encoder and the
    # codebooks stay frozen and only the decoder learns: the codes of every input stay exactly
    # the same, so experts and token caches made with `init_from` remain valid.
    init_from: Path | None = None
    train_encoder: bool = True
    data: CodecDataConfig
    loss: CodecLossConfig = CodecLossConfig()
    quantizer: QuantizerTrainConfig = QuantizerTrainConfig()
    eval: CodecEvalConfig = CodecEvalConfig()
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.8, 0.99)
    grad_clip_norm: float | None = Field(1.0, gt=0)
    max_steps: int = Field(gt=0)
    warmup_steps: int = Field(50, ge=0)
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    eval_every: int = Field(500, gt=0)
    log_every: int = Field(10, gt=0)
    cpu: bool = False
    torch_threads: int | None = Field(None, gt=0)  # CPU threads for torch (None: torch's default)

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: dict) -> dict:
        CodecConfig.from_dict(v)  # ValueError names the unknown field or bad value
        return v

    @property
    def codec_config(self) -> CodecConfig:
        return CodecConfig.from_dict(self.codec)

    @model_validator(mode="after")
    def _frozen_needs_init(self) -> "CodecTrainConfig":
        if not self.train_encoder and self.init_from is None:
            raise ValueError("train_encoder: false keeps the encoder as it is: set 'init_from' to a trained codec")
        return self


CODEC_RESUME_KEYS = ("seed", "codec", "init_from", "train_encoder", "data", "loss", "quantizer", "lr", "betas",
                     "grad_clip_norm", "warmup_steps")


# -- loading -----------------------------------------------------------------------------------

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _describe_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "missing":
            lines.append(f"  field '{where}': required but missing")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  field '{where}': unknown field (check the spelling; see the config docs)")
        else:
            lines.append(f"  field '{where}': {err['msg']} (got {err['input']!r})")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, kind: type[ConfigT]) -> ConfigT:
    """Read and validate a YAML config; TrainingConfigError names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrainingConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{path}: expected a mapping of fields at the top level, got "
                                  f"{type(data).__name__}; see configs/ for examples")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise TrainingConfigError(f"{path}: invalid {kind.__name__}:\n{_describe_errors(e)}") from None


def _lookup(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _first_difference(key: str, before: Any, after: Any) -> tuple[str, Any, Any] | None:
    """The dotted path of the first leaf that differs, with both values (None if equal)."""
    if isinstance(before, dict) and isinstance(after, dict):
        for sub in sorted(set(before) | set(after)):
            found = _first_difference(f"{key}.{sub}", before.get(sub), after.get(sub))
            if found:
                return found
        return None
    return None if before == after else (key, before, after)


def check_resume_compatible(saved: dict, current: BaseModel, keys: tuple[str, ...], run_dir: Path) -> None:
    """Refuse to resume a run whose defining fields changed; name the first changed field."""
    now = current.model_dump(mode="json")
    try:  # a run saved before a field existed was trained with its default
        saved = type(current).model_validate(saved).model_dump(mode="json")
    except ValidationError:
        pass
    for key in keys:
        found = _first_difference(key, _lookup(saved, key), _lookup(now, key))
        if found:
            field, before, after = found
            raise TrainingConfigError(
                f"{run_dir}: cannot resume: config field '{field}' is {after!r} but the run was started with "
                f"{before!r}. Restore that value to continue the run, or set a new run_dir to start a new one.")
