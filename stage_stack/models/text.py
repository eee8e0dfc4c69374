"""Optional text conditioning: a frozen T5 encoder and its tokenizer (reference §1, "Text conditioning").

    texts --word dropout (training only)--> T5 tokenizer (pad to longest, EOS appended)
          --T5EncoderModel in float32, autocast off--> hidden [B, L, d_model], mask [B, L]

An empty description ("") gets an all-False mask row: T5 still runs on its lone "</s>", but the
row is masked away and `StageLM.prepare_memory` turns it into the null condition. The trainable
projection to the LM width is `StageLM.text_proj`, not part of this module.

Weights on disk use transformers' `T5EncoderModel` names without `shared.weight`: that tensor is
the same as `encoder.embed_tokens.weight` (upstream drops it too, reference §6) and safetensors
will not store one tensor under two names. Loading also accepts a Hugging Face `model.safetensors`
(which keeps `shared.weight` instead) and full T5 checkpoints (their decoder is ignored).

Where an expert's text encoder comes from (`load_text_conditioner`). `slug` is the id with "/"
replaced by "--" (e.g. "t5-base", "google-t5--t5-base"); the first directory that exists wins:

    1. <expert's folder>/<slug>/
    2. each of `search_dirs`/<slug>/
    3. stage_stack.paths.text_encoder_dir()/<slug>/   ($STAGE_STACK_HOME/text_encoders/<slug>)

That directory holds config.json and the tokenizer (tokenizer.json, or spiece.model, which needs
the protobuf package to read). Embedded weights are the expert's `text_encoder.*` tensors.
Referenced weights are the file `text_encoder.filename`, looked up in the expert's folder (where
`stage-stack convert` writes it), then that directory, then text_encoder_dir(), and verified
against `text_encoder.sha256`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ..errors import ExpertFormatError, IntegrityError

if TYPE_CHECKING:
    from ..expert import Expert, ExpertMetadata

WORD_DROPOUT = 0.3  # the reference's training-time word dropout; generation uses 0
EMBEDDING = "encoder.embed_tokens.weight"
TIED_EMBEDDING = "shared.weight"  # transformers' tied alias of EMBEDDING
FULL_T5_ONLY = ("decoder.", "lm_head.")  # parts of a T5ForConditionalGeneration checkpoint we skip
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def drop_words(text: str, p: float, rng: random.Random) -> str:
    """Drop each space-separated word independently with probability `p` (upstream's rule).

    A text whose words are all dropped becomes "", which then counts as an empty description.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"word dropout must be a probability in [0, 1], got {p}")
    return " ".join(word for word in text.split(" ") if rng.random() >= p)


def encoder_state_dict(encoder: "T5EncoderModel | TextConditioner") -> dict[str, torch.Tensor]:
    """The T5 encoder's tensors as stored in expert files: every tensor once, no `shared.weight`."""
    if isinstance(encoder, TextConditioner):
        encoder = encoder.encoder
    return {k: v for k, v in encoder.state_dict().items() if k != TIED_EMBEDDING}


class TextConditioner(nn.Module):
    """A frozen T5 encoder and its tokenizer: texts -> (hidden [B, L, d_model] float32, mask [B, L] bool)."""

    def __init__(self, encoder: T5EncoderModel, tokenizer: T5Tokenizer) -> None:
        super().__init__()
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the T5 tokenizer needs an EOS token ('</s>') and a pad token ('<pad>')")
        self.encoder = encoder.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @property
    def config(self) -> T5Config:
        return self.encoder.config

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return self.encoder.encoder.embed_tokens.weight.device

    def train(self, mode: bool = True) -> "TextConditioner":
        # The encoder is frozen: a parent's .train() must not switch on T5's dropout.
        super().train(mode)
        self.encoder.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        # Reference §1 runs T5 in float32. When a parent module is cast (.to(torch.bfloat16),
        # .half()), move the encoder to the new device but keep its dtype.
        target = fn(torch.zeros(1))
        if target.dtype != torch.float32:
            return super()._apply(lambda t: t.to(target.device), recurse)
        return super()._apply(fn, recurse)

    # -- text -> tensors ----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, L] long, token_mask [B, L] bool): EOS appended, right-padded to the longest.

        The EOS is appended here rather than by the tokenizer's post-processor, so the layout
        does not depend on how a tokenizer file was configured. Long texts are not truncated.
        """
        pieces = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = [ids + [self.tokenizer.eos_token_id] for ids in pieces]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        token_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            token_mask[i, : len(row)] = True
        return input_ids, token_mask

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str | None], word_dropout: float = 0.0, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 hidden states [B, L, d_model] (float32) and mask [B, L] (bool) on the encoder's device.

        None counts as "". `word_dropout` (training only; the reference uses WORD_DROPOUT) drops
        words with draws from `rng`; pass a seeded random.Random to make it reproducible.
        Rows that are "" (after dropout) get an all-False mask.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings (one per batch row), got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is empty: pass one string per batch row ('' for no description)")
        texts = ["" if text is None else text for text in texts]
        if word_dropout:
            rng = rng if rng is not None else random.Random()
            texts = [drop_words(text, word_dropout, rng) for text in texts]

        input_ids, token_mask = self.tokenize(texts)
        device = self.device
        input_ids, token_mask = input_ids.to(device), token_mask.to(device)
        # T5 sees every row's real tokens (at least the EOS), so no row attends to nothing;
        # empty descriptions are masked afterwards, which gives the same memory as upstream.
        with torch.autocast(device_type=device.type, enabled=False):
            hidden = self.encoder(input_ids=input_ids, attention_mask=token_mask.long()).last_hidden_state
        empty = torch.tensor([text == "" for text in texts], device=device)
        return hidden.float(), token_mask & ~empty[:, None]

    # -- directories --------------------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "TextConditioner":
        """Load a local Hugging Face-format T5 directory: config.json, model.safetensors, tokenizer.

        Nothing is downloaded.
        """
        path = Path(path)
        config, tokenizer = load_config_and_tokenizer(path)
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ExpertFormatError(f"{path}: no model.safetensors. Put the T5 weights there in safetensors "
                                    "format (pytorch_model.bin is not read).")
        return cls(load_encoder(config, weights, "", device), tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a directory that `from_pretrained_dir` reads (config, weights, tokenizer)."""
        path = Path(path)
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path


# -- loading ----------------------------------------------------------------------------------

def load_config_and_tokenizer(directory: Path) -> tuple[T5Config, T5Tokenizer]:
    """T5Config and T5Tokenizer from a local directory, with errors that name what is missing."""
    if not (directory / "config.json").is_file():
        raise ExpertFormatError(f"{directory}: no config.json. A text encoder directory is in Hugging Face "
                                "format: config.json, tokenizer.json or spiece.model, model.safetensors.")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ExpertFormatError(f"{directory}: no tokenizer (tokenizer.json or spiece.model). Copy the tokenizer "
                                "files of the same T5 model into this directory.")
    try:
        config = T5Config.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExpertFormatError(f"{directory / 'config.json'}: not a readable T5 config ({e})") from None
    try:
        tokenizer = T5Tokenizer.from_pretrained(directory, local_files_only=True)
    except (ImportError, OSError, ValueError) as e:
        hint = ""
        if not (directory / "tokenizer.json").is_file():
            hint = " Reading spiece.model needs the protobuf package (pip install protobuf); or add tokenizer.json."
        raise ExpertFormatError(f"{directory}: could not read the T5 tokenizer ({e}).{hint}") from None
    if len(tokenizer) > config.vocab_size:
        raise ExpertFormatError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but config.json's "
                                f"vocab_size is {config.vocab_size}; the tokenizer and the weights are from "
                                "different models.")
    return config, tokenizer


def load_encoder(config: T5Config, path: Path, prefix: str, device: str | torch.device) -> T5EncoderModel:
    """A float32 T5EncoderModel on `device` filled from the `prefix`ed tensors of a safetensors file.

    Built on the meta device and filled tensor by tensor, so only one copy of the weights is in
    memory. The embedding may be stored as `encoder.embed_tokens.weight` or `shared.weight`.
    """
    from safetensors import safe_open

    from ..expert import _check_keys, read_header, resolve_device

    _, entries = read_header(path)
    stored = {k[len(prefix):]: k for k in entries if k.startswith(prefix)}
    stored = {name: key for name, key in stored.items() if not name.startswith(FULL_T5_ONLY)}
    if TIED_EMBEDDING in stored:
        alias = stored.pop(TIED_EMBEDDING)
        stored.setdefault(EMBEDDING, alias)

    with torch.device("meta"):
        encoder = T5EncoderModel(config)
    expected = {k: v.shape for k, v in encoder.state_dict().items() if k != TIED_EMBEDDING}
    _check_keys(str(path), {prefix + name: entries[key] for name, key in stored.items()}, prefix, expected)

    device = resolve_device(device)
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(stored[name]).to(device=device, dtype=torch.float32) for name in expected}
    encoder.load_state_dict(state, strict=False, assign=True)
    # One embedding module for both names, as T5 ties them (and `.to()` then moves it once).
    encoder.set_input_embeddings(encoder.encoder.embed_tokens)
    left_on_meta = [name for name, t in encoder.state_dict().items() if t.is_meta]
    if left_on_meta:  # a transformers version with tensors we do not know about
        raise ExpertFormatError(f"{path}: no values for T5 tensors {left_on_meta}")
    return encoder.eval()


def text_encoder_slug(encoder_id: str) -> str:
    return encoder_id.replace("/", "--")


def text_encoder_candidates(
    encoder_id: str, expert_path: Path, search_dirs: Sequence[str | os.PathLike] = ()
) -> list[Path]:
    """Directories searched, in order, for the config and tokenizer of text encoder `encoder_id`."""
    from ..paths import text_encoder_dir

    slug = text_encoder_slug(encoder_id)
    return [expert_path.parent / slug] + [Path(d) / slug for d in search_dirs] + [text_encoder_dir() / slug]


def _find_weights(metadata: "ExpertMetadata", expert_path: Path, directory: Path) -> Path:
    from ..expert import sha256_file
    from ..paths import text_encoder_dir

    ref = metadata.text_encoder
    dirs = list(dict.fromkeys([expert_path.parent, directory, text_encoder_dir()]))
    for d in dirs:
        candidate = d / ref.filename
        if candidate.is_file():
            digest = sha256_file(candidate)
            if digest != ref.sha256:
                raise IntegrityError(f"{candidate}: sha256 is {digest}, but {expert_path.name} expects {ref.sha256} "
                                     f"for text encoder {ref.id or ref.filename}. Replace the file with the one "
                                     "the expert was made with.")
            return candidate
    where = ", ".join(str(d) for d in dirs)
    raise ExpertFormatError(f"{expert_path}: its text encoder weights {ref.filename} (sha256 {ref.sha256[:12]}…) "
                            f"were not found in: {where}. Copy that file (written beside the expert by "
                            f"`stage-stack convert`) into {expert_path.parent}.")


def load_text_conditioner(
    metadata: "ExpertMetadata",
    expert_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    search_dirs: Sequence[str | os.PathLike] = (),
) -> TextConditioner:
    """The text conditioner of an expert whose metadata names a text encoder (see the module doc)."""
    expert_path = Path(expert_path)
    ref = metadata.text_encoder
    if ref is None:
        raise ValueError(f"{expert_path}: the expert has no text encoder")
    encoder_id = metadata.text_encoder_id or ref.id
    if not encoder_id:
        raise ExpertFormatError(f"{expert_path}: field 'text_encoder_id' is missing; set it to the id of the T5 "
                                "model (e.g. \"t5-base\") so its config and tokenizer can be found.")

    candidates = text_encoder_candidates(encoder_id, expert_path, search_dirs)
    directory = next((d for d in candidates if d.is_dir()), None)
    if directory is None:
        needed = "config.json, tokenizer.json or spiece.model" + ("" if ref.embedded else f", {ref.filename}")
        raise ExpertFormatError(
            f"{expert_path}: its text encoder '{encoder_id}' needs a Hugging Face-format directory; looked in: "
            f"{', '.join(str(d) for d in candidates)}. Put a HF-format {encoder_id} directory at {candidates[-1]} "
            f"({needed}), e.g. the files of the Hugging Face repository '{encoder_id}'.")
    config, tokenizer = load_config_and_tokenizer(directory)
    if config.d_model != metadata.lm_cfg.text_dim:
        raise ExpertFormatError(f"{directory}/config.json: d_model is {config.d_model} but {expert_path.name} has "
                                f"lm_config.text_dim {metadata.lm_cfg.text_dim}; this is not the expert's text encoder "
                                f"'{encoder_id}'.")

    if ref.embedded:
        weights, prefix = expert_path, "text_encoder."
    else:
        weights, prefix = _find_weights(metadata, expert_path, directory), ""
    return TextConditioner(load_encoder(config, weights, prefix, device), tokenizer)


@torch.no_grad()
def conditioning_for(expert: "Expert", texts: Sequence[str | None] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`text_memory` for `stage_stack.generation.generate`: (memory [B, L, dim] in the LM dtype, mask [B, L]).

    One text per context row ("" for none). None when `texts` is None or the expert has no text
    encoder loaded; generation then uses the null condition.
    """
    if texts is None or expert.text is None:
        return None
    hidden, mask = expert.text.encode(texts)
    lm = expert.lm
    weight = lm.text_proj.weight
    memory = lm.project_text(hidden.to(device=weight.device, dtype=weight.dtype), mask.to(weight.device))
    return memory.to(lm.final_norm.weight.dtype), mask.to(weight.device)
