"""Time-aligned positions (`StageLMConfig.positions = "aligned"`) against STAGE's.

Aligned: the step holding target frame t of codebook 0 gets the position of the step holding
real context frame t, in training and generation batches, with left padding, CFG rows and
long-form prompts; "stage" is unchanged (the parity tests pin it to upstream).
"""

from __future__ import annotations

import pytest
import torch

from stage_stack.expert import ExpertMetadata, load_expert, save_expert
from stage_stack.generation import SamplingParams, generate
from stage_stack.layout import TokenLayout
from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights, positions_from_mask
from stage_stack.testing import tiny_codec

ALIGNED = StageLMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, card=16, n_q=3, cross_attention=False,
                        positions="aligned")


def _step_of_frame(q: int, frame: int) -> int:
    return frame + q + 1  # layout.interleave: frames[q, n] sits at step n + q + 1


def test_aligned_target_frame_takes_its_context_frame_position():
    layout = TokenLayout.for_config(ALIGNED)
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 16, (3, n), generator=g) for n in (7, 4)]  # row 1 is left-padded by 3
    target = torch.randint(0, 16, (2, 3, 5), generator=g)
    tb = layout.training_batch(contexts, target)
    C = tb.context_len
    for row, n in enumerate((7, 4)):
        pad = C - n
        for t in range(min(n, 5)):
            ctx_pos = tb.positions[row, _step_of_frame(0, pad + t)]
            tgt_pos = tb.positions[row, _step_of_frame(0, C + 1 + t)]
            assert int(ctx_pos) == t and int(tgt_pos) == t
    # Up to the SEP step the positions are STAGE's.
    stage = positions_from_mask(tb.attention_mask)
    assert torch.equal(tb.positions[:, : C + 2], stage[:, : C + 2])
    assert not torch.equal(tb.positions, stage)


def test_stage_layout_positions_are_upstreams():
    layout = TokenLayout.for_card(16, 3)
    tb = layout.training_batch([torch.randint(0, 16, (3, 6)), torch.randint(0, 16, (3, 2))],
                               torch.randint(0, 16, (2, 3, 4)))
    assert torch.equal(tb.positions, positions_from_mask(tb.attention_mask))


@pytest.mark.parametrize("prompt_frames", [0, 3])
def test_generation_batch_aligns_conditional_and_unconditional_rows(prompt_frames):
    layout = TokenLayout.for_config(ALIGNED)
    context = torch.randint(0, 16, (1, 3, 6))
    prompt = torch.randint(0, 16, (1, 3, prompt_frames)) if prompt_frames else None
    gb = layout.generation_batch(context, 8, prompt=prompt, cfg=True)
    C = gb.context_len
    for t in range(6):
        step = _step_of_frame(0, C + 1 + t)
        assert int(gb.positions[0, step]) == t  # conditional row: context frame t is at position t
        assert int(gb.positions[0, _step_of_frame(0, t)]) == t
        assert int(gb.positions[1, step]) == t  # the PAD-context row uses the same target positions


def test_aligned_lm_needs_positions_from_the_layout():
    lm = init_weights(StageLM(ALIGNED), seed=0).eval()
    tb = TokenLayout.for_config(ALIGNED).training_batch(torch.randint(0, 16, (1, 3, 5)), torch.randint(0, 16, (1, 3, 4)))
    with pytest.raises(ValueError, match="pass positions="):
        lm(tb.codes, tb.attention_mask)
    assert lm(tb.codes, tb.attention_mask, positions=tb.positions).shape == (1, 3, tb.codes.shape[-1], 16)


def test_positions_config_is_validated_and_old_configs_default_to_stage():
    with pytest.raises(ValueError, match="positions must be one of"):
        StageLMConfig(positions="rotary")
    old = ALIGNED.to_dict()
    del old["positions"]  # an expert file written before the field existed
    assert StageLMConfig.from_dict(old).positions == "stage"


def test_aligned_kv_cache_equals_full_recompute_with_a_prompt():
    lm = init_weights(StageLM(ALIGNED), seed=1).eval()
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(20)
    g = torch.Generator().manual_seed(3)
    ctx = [torch.randint(0, 16, (3, n), generator=g) for n in (9, 6)]
    prompt = torch.randint(0, 16, (2, 3, 4), generator=g)
    greedy = SamplingParams(greedy=True)
    cached = generate(lm, ctx, 10, prompt=prompt, params=greedy)
    full = generate(lm, ctx, 10, prompt=prompt, params=greedy, use_cache=False)
    assert torch.equal(cached, full) and torch.equal(cached[..., :4], prompt)


def test_aligned_positions_change_the_logits():
    """The field is not a label: the same weights read a sequence differently."""
    stage_cfg = StageLMConfig(**{**ALIGNED.to_dict(), "positions": "stage"})
    aligned = init_weights(StageLM(ALIGNED), seed=2).eval()
    stage = StageLM(stage_cfg).eval()
    stage.load_state_dict(aligned.state_dict())
    context, target = torch.randint(0, 16, (1, 3, 6)), torch.randint(0, 16, (1, 3, 5))
    a = TokenLayout.for_config(ALIGNED).training_batch(context, target)
    s = TokenLayout.for_config(stage_cfg).training_batch(context, target)
    la = aligned(a.codes, a.attention_mask, positions=a.positions)
    ls = stage(s.codes, s.attention_mask, positions=s.positions)
    C = a.context_len
    assert torch.allclose(la[..., : C + 2, :], ls[..., : C + 2, :], atol=1e-6)
    assert (la[..., C + 2 :, :] - ls[..., C + 2 :, :]).abs().max() > 1e-3


def test_expert_file_round_trips_the_positions_mode(tmp_path):
    codec = tiny_codec()
    cfg = StageLMConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, card=codec.config.card, n_q=codec.config.n_q,
                        cross_attention=False, positions="aligned")
    lm = init_weights(StageLM(cfg), seed=0)
    meta = ExpertMetadata.for_models("drums", cfg, codec.config)
    path = save_expert(tmp_path / "e.safetensors", meta, lm, codec=codec)
    assert load_expert(path).lm.config.positions == "aligned"
