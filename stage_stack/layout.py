"""The STAGE token layout: [context | SEP | target] with MusicGen's delay pattern.

This module is the single owner of the layout (reference §3); training and generation both
build their sequences here.

    frames  [B, K, N]  N = C + 1 + T   (context, one SEP column, target)
    seq[q, s] = frames[q, s - q - 1]   when 0 <= s - q - 1 < N, else PAD
                                       (delays 0..K-1 plus one leading empty step)

Training keeps the first N + 1 steps; generation keeps all N + K. A slot is *valid* when it
holds a real frame that is not PAD inside the context region, so left padding and dropped
contexts are masked out. `attention_mask` (any codebook valid) is both the key-padding mask
and the origin of the per-sample positions.

With a separate context codec (`StageLMConfig.context_card` > 0) the context's codes are
shifted by `context_offset` (= card + 2) in `frames`, into their own embedding rows; PAD stays
PAD, so the masks are unchanged, and the heads still predict target codes only.

With a chord stream (`StageLMConfig.chord_classes` > 0) the LM has K = n_q + 1 streams: stream
0 holds each target frame's chord class (stage_stack.chords), streams 1.. the codec's codes, so
the delay pattern puts a frame's chord one step before its first codebook. The context's chord
row is PAD (masked like left padding): the LM must hear the chord, not read it.
`with_chord_row` and `audio_codes` move codes between the codec's rows and the LM's.

Positions (`TokenLayout.positions`, the LM config's `positions`):

    "stage"    pos[s] = s - first valid step of the row        (upstream STAGE)
    "aligned"  the same through context and SEP; from the first target step on,
               pos[s] = s - (C + 2): the step holding target frame t of codebook 0 gets the
               position of the step holding context frame t (counted from the row's first
               valid context frame), because the context starts where the target window does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models.stage_lm import POSITION_MODES, StageLMConfig, positions_from_mask

UNFILLED = -1  # a generation slot still to be sampled


@dataclass(frozen=True)
class TrainingBatch:
    codes: torch.Tensor  # [B, K, S] interleaved tokens fed to the LM
    final_mask: torch.Tensor  # [B, K, S] per-token validity
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, K, T] target frames
    context_len: int  # C (after left padding)
    positions: torch.Tensor  # [B, S] position ids for the LM


@dataclass(frozen=True)
class GenerationBatch:
    codes: torch.Tensor  # [R, K, S]; rows [0, B) conditional, [B, 2B) unconditional when cfg
    final_mask: torch.Tensor  # [R, K, S]
    attention_mask: torch.Tensor  # [R, S]
    positions: torch.Tensor  # [R, S] position ids for the LM
    start_offset: int  # first step that holds a generated frame
    context_len: int  # C
    prompt_len: int  # frames of the target already given (continuation)
    n_frames: int  # frames to generate, prompt included


@dataclass(frozen=True)
class TokenLayout:
    n_q: int
    pad: int
    sep: int
    positions: str = "stage"  # one of models.stage_lm.POSITION_MODES
    context_offset: int = 0  # added to every non-PAD context code (StageLMConfig.context_offset)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"TokenLayout.positions must be one of {list(POSITION_MODES)}, got {self.positions!r}")

    @classmethod
    def for_card(cls, card: int, n_q: int, positions: str = "stage", context_offset: int = 0) -> "TokenLayout":
        return cls(n_q=n_q, pad=card, sep=card + 1, positions=positions, context_offset=context_offset)

    @classmethod
    def for_config(cls, config: StageLMConfig) -> "TokenLayout":
        return cls.for_card(config.card, config.streams, config.positions, config.context_offset)

    # -- building blocks ----------------------------------------------------------------------
    def left_pad(self, contexts: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """A list of [K, C_i] code tensors -> [B, K, max C_i], left-padded with PAD."""
        if isinstance(contexts, torch.Tensor):
            return contexts
        longest = max(c.shape[-1] for c in contexts)
        return torch.stack([F.pad(c, (longest - c.shape[-1], 0), value=self.pad) for c in contexts])

    def interleave(self, frames: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Apply the delay pattern: [B, K, N] frames -> [B, K, steps] (default N + K)."""
        B, K, N = frames.shape
        steps = N + K if steps is None else steps
        seq = frames.new_full((B, K, N + K), self.pad)
        for q in range(K):
            seq[:, q, q + 1 : q + 1 + N] = frames[:, q]
        return seq[..., :steps]

    def deinterleave(self, seq: torch.Tensor, n_frames: int) -> torch.Tensor:
        """Undo the delay pattern: frame t of codebook q = seq[q, t + q + 1] -> [B, K, n_frames]."""
        return torch.stack([seq[:, q, q + 1 : q + 1 + n_frames] for q in range(seq.shape[1])], dim=1)

    def masks(self, seq: torch.Tensor, n_frames: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """final_mask [B, K, S] and attention_mask [B, S] for an interleaved sequence."""
        B, K, S = seq.shape
        steps = torch.arange(S, device=seq.device)[None, :]
        q = torch.arange(K, device=seq.device)[:, None]
        frame = steps - q - 1
        pattern_valid = (frame >= 0) & (frame < n_frames)  # [K, S]
        in_context = frame < context_len
        final_mask = pattern_valid[None] & ~(in_context[None] & (seq == self.pad))
        return final_mask, final_mask.any(dim=1)

    def position_ids(self, attention_mask: torch.Tensor, context_len: int) -> torch.Tensor:
        """[B, S] positions for a sequence whose context holds `context_len` frames (module doc)."""
        stage = positions_from_mask(attention_mask)
        if self.positions == "stage":
            return stage
        steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
        target_start = context_len + 2  # the step of target frame 0, codebook 0
        return torch.where(steps >= target_start, steps - target_start, stage)

    def frames(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[context | SEP | target] along time (context codes shifted by `context_offset`)."""
        B, K, _ = context.shape
        if self.context_offset:
            context = torch.where(context == self.pad, context, context + self.context_offset)
        sep = context.new_full((B, K, 1), self.sep)
        return torch.cat([context, sep, target], dim=-1)

    # -- training -----------------------------------------------------------------------------
    def training_batch(
        self,
        context: list[torch.Tensor] | torch.Tensor,
        target: torch.Tensor,
        drop_context: torch.Tensor | None = None,
        drop_history: torch.Tensor | None = None,
    ) -> TrainingBatch:
        """Sequence, masks and targets for teacher forcing; `drop_context` [B] bool -> PAD context.

        `drop_history` [B] bool -> PAD in place of those rows' target frames in the *input*
        (still attended, and still the labels): the LM must predict them without its own past.
        [B, K] bool drops chosen streams of each row (a chord stream kept, the audio hidden).
        """
        context = self.left_pad(context).clone()
        if drop_context is not None:
            context[drop_context.to(torch.bool)] = self.pad
        given = target
        if drop_history is not None:
            given = target.clone()
            given[drop_history.to(torch.bool)] = self.pad
        frames = self.frames(context, given)
        N = frames.shape[-1]
        seq = self.interleave(frames, steps=N + 1)
        C = context.shape[-1]
        final_mask, attention_mask = self.masks(seq, N, C)
        return TrainingBatch(seq, final_mask, attention_mask, target, C, self.position_ids(attention_mask, C))

    def target_logits(self, logits: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits aligned with the target frames [B, K, T, card] and which of them are scored.

        The logit at step s predicts step s + 1, so target frame j of codebook q (stored at
        step C + 2 + j + q) is predicted at step C + 1 + j + q; it is scored only when that
        stored step is inside the truncated sequence (codebook q loses its last q frames).
        """
        B, K, S, card = logits.shape
        T = batch.targets.shape[-1]
        C = batch.context_len
        aligned = logits.new_zeros(B, K, T, card)
        scored = torch.zeros(B, K, T, dtype=torch.bool, device=logits.device)
        for q in range(K):
            n = min(T, S - (C + 2 + q))
            if n <= 0:
                continue
            aligned[:, q, :n] = logits[:, q, C + 1 + q : C + 1 + q + n]
            scored[:, q, :n] = batch.final_mask[:, q, C + 2 + q : C + 2 + q + n]
        return aligned, scored

    def loss(self, logits: torch.Tensor, batch: TrainingBatch,
             frame_weights: torch.Tensor | None = None, first_stream_weight: float = 1.0) -> torch.Tensor:
        """Cross-entropy per codebook over scored target frames, then the mean over codebooks.

        `frame_weights` [B, T] (target frames) turn each codebook's mean into a weighted mean.
        `first_stream_weight` counts stream 0's cross-entropy that many times in the sum the
        mean divides by the number of streams (a chord stream's `loss.chord_weight`), so the
        other streams' gradients stay as they were.
        """
        aligned, scored = self.target_logits(logits, batch)
        per_codebook = []
        for q in range(aligned.shape[1]):
            mask = scored[:, q]
            if frame_weights is None:
                per_codebook.append(F.cross_entropy(aligned[:, q][mask].float(), batch.targets[:, q][mask]))
                continue
            ce = F.cross_entropy(aligned[:, q][mask].float(), batch.targets[:, q][mask], reduction="none")
            w = frame_weights.to(ce)[mask]
            per_codebook.append((ce * w).sum() / w.sum())
        if first_stream_weight != 1.0:
            per_codebook[0] = per_codebook[0] * first_stream_weight
        return torch.stack(per_codebook).mean()

    # -- generation ---------------------------------------------------------------------------
    def generation_batch(
        self,
        context: list[torch.Tensor] | torch.Tensor,
        n_frames: int,
        prompt: torch.Tensor | None = None,
        cfg: bool = True,
        given: torch.Tensor | None = None,
    ) -> GenerationBatch:
        """The untruncated layout with UNFILLED slots, doubled with PAD contexts for CFG.

        `prompt` [B, K, P] are target frames already known (the stem's own previous tokens
        when continuing a long piece); they count toward `n_frames`. `given` [B, K, n_frames]
        fixes single tokens anywhere in the target (UNFILLED where the LM samples): a chord
        stream's chords, say, which the audio streams then follow.
        """
        context = self.left_pad(context)
        B, K, C = context.shape
        P = 0 if prompt is None else prompt.shape[-1]
        if P > n_frames:
            raise ValueError(f"prompt has {P} frames but only {n_frames} frames are requested")
        target = context.new_full((B, K, n_frames), UNFILLED)
        if given is not None:
            if given.shape != target.shape:
                raise ValueError(f"given has shape {tuple(given.shape)}, expected {tuple(target.shape)}")
            target = given.to(target).clone()
        if prompt is not None:
            target[..., :P] = prompt
        if cfg:
            context = torch.cat([context, torch.full_like(context, self.pad)])
            target = torch.cat([target, target])
        frames = self.frames(context, target)
        N = frames.shape[-1]
        seq = self.interleave(frames)
        final_mask, attention_mask = self.masks(seq, N, C)
        return GenerationBatch(seq, final_mask, attention_mask, self.position_ids(attention_mask, C), C + 2 + P, C, P,
                               n_frames)

    def generated_frames(self, seq: torch.Tensor, batch: GenerationBatch) -> torch.Tensor:
        """De-interleave and strip context and SEP: [B, K, n_frames] (conditional rows)."""
        frames = self.deinterleave(seq, batch.context_len + 1 + batch.n_frames)
        return frames[..., batch.context_len + 1 :]


def with_chord_row(codes: torch.Tensor, config: StageLMConfig, chords: torch.Tensor | None = None) -> torch.Tensor:
    """Codec codes [..., n_q, F] -> the LM's streams [..., streams, F]: with a chord stream, a
    first row of `chords` [..., F] (PAD when None: a context, which carries no chord token);
    unchanged without one."""
    if not config.chord_classes:
        if chords is not None:
            raise ValueError("chords were given for an LM without a chord stream (chord_classes 0)")
        return codes
    if codes.shape[-2] != config.n_q:
        raise ValueError(f"expected codec codes with {config.n_q} codebooks, got shape {tuple(codes.shape)}")
    row = codes.new_full((*codes.shape[:-2], 1, codes.shape[-1]), config.pad_token) if chords is None \
        else chords.to(codes)[..., None, :]
    return torch.cat([row, codes], dim=-2)


def audio_codes(codes: torch.Tensor, config: StageLMConfig) -> torch.Tensor:
    """The LM's streams [..., streams, F] -> what the codec decodes [..., n_q, F]."""
    if codes.shape[-2] != config.streams:
        raise ValueError(f"expected the LM's {config.streams} streams, got shape {tuple(codes.shape)}")
    return codes[..., 1:, :] if config.chord_classes else codes
