"""Numerical parity with the upstream STAGE code (fixture README steps 1-6).

Every size comes from the fixture itself, so any directory with the same file layout works.
Set STAGE_PARITY_FIXTURES to one or more directories separated by os.pathsep; the default is
../shared/fixtures/stage_ref_small beside the checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stage_stack.convert.stage import convert_stage_checkpoint
from stage_stack.expert import load_expert
from stage_stack.generation import SamplingParams, generate
from stage_stack.layout import TokenLayout
from stage_stack.models.stage_lm import positions_from_mask

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "fixtures" / "stage_ref_small"
LOGIT_TOL = 1e-4


def fixture_dirs() -> list[Path]:
    raw = os.environ.get("STAGE_PARITY_FIXTURES")
    dirs = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [DEFAULT]
    return [d if d.is_absolute() else (REPO / d).resolve() for d in dirs]


EXISTING = [d for d in fixture_dirs() if (d / "io.safetensors").is_file()]
pytestmark = pytest.mark.skipif(not EXISTING, reason=f"no STAGE parity fixture directory found in {fixture_dirs()}")


class Fixture:
    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.io = load_file(str(root / "io.safetensors"))
        self.config = json.loads((root / "config.json").read_text())
        ckpt = next(root.glob("lightning_*.safetensors"))
        path = convert_stage_checkpoint(ckpt, workdir / "expert.safetensors", instrument="fixture", embed_codec=True)
        self.expert = load_expert(path)
        self.lm = self.expert.lm
        self.layout = TokenLayout.for_card(self.lm.config.card, self.lm.config.n_q)


@pytest.fixture(scope="module", params=EXISTING, ids=lambda p: p.name)
def fx(request, tmp_path_factory) -> Fixture:
    return Fixture(request.param, tmp_path_factory.mktemp(request.param.name))


def test_converted_sizes_match_fixture_config(fx: Fixture):
    cfg, ref = fx.lm.config, fx.config["lm_config"]
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.card, cfg.n_q) == (
        ref["dim"], ref["n_layers"], ref["n_heads"], ref["card"], ref["n_q"])
    assert cfg.cross_attention == ref["cross_attend"]
    assert cfg.sep_token == ref["sep_token"] and cfg.pad_token == ref["padding_token"]


def test_training_layout_and_positions(fx: Fixture):  # step 4 (training half)
    io = fx.io
    batch = fx.layout.training_batch(io["train/context_codes_padded"], io["train/target_codes"])
    assert torch.equal(batch.codes, io["train/prompt"])
    assert torch.equal(batch.final_mask, io["train/final_mask"])
    assert torch.equal(batch.attention_mask, io["train/attention_mask"])
    assert torch.equal(positions_from_mask(batch.attention_mask), io["train/positions"])


def test_text_projection_and_mask(fx: Fixture):
    io = fx.io
    memory = fx.lm.project_text(io["train/t5_hidden"], io["train/xattn_mask"])
    assert (memory - io["train/xattn_data"]).abs().max() <= 1e-5
    fed, fed_mask = fx.lm.prepare_memory(memory, io["train/xattn_mask"], memory.shape[0], "cpu", memory.dtype)
    assert torch.equal(fed_mask, io["train/xattn_mask_as_fed"])
    assert (fed - io["train/xattn_data_as_fed"]).abs().max() <= 1e-5


@torch.no_grad()
def test_lm_logits_and_loss(fx: Fixture):  # steps 2 and 3
    io = fx.io
    batch = fx.layout.training_batch(io["train/context_codes_padded"], io["train/target_codes"])
    memory = fx.lm.project_text(io["train/t5_hidden"], io["train/xattn_mask"])
    logits = fx.lm(batch.codes, batch.attention_mask, memory, io["train/xattn_mask"])
    valid = io["train/attention_mask"][:, None, :, None].expand_as(logits)
    err = (logits - io["train/logits"]).abs()[valid].max().item()
    assert err <= LOGIT_TOL, f"valid-step logits differ by {err}"

    aligned, scored = fx.layout.target_logits(logits, batch)
    assert torch.equal(scored, io["train/logits_deinterleaved_mask"])
    ref_mask = io["train/logits_deinterleaved_mask"][..., None].expand_as(aligned)
    assert (aligned - io["train/logits_deinterleaved"]).abs()[ref_mask].max() <= LOGIT_TOL
    loss = fx.layout.loss(logits, batch)
    assert abs(loss.item() - io["train/loss"].item()) <= 1e-4


def test_generation_layout(fx: Fixture):  # step 4 (generation half)
    io = fx.io
    n_gen = io["gen/out_codes"].shape[-1]
    batch = fx.layout.generation_batch(io["gen/context_codes_padded"], n_gen)
    assert torch.equal(batch.codes, io["gen/initial_sequence"])
    assert torch.equal(batch.final_mask, io["gen/final_mask"])
    assert torch.equal(batch.attention_mask, io["gen/attention_mask"])
    assert batch.start_offset == io["gen/start_offset"].item()


@torch.no_grad()
def test_teacher_forced_step_logits_with_kv_cache(fx: Fixture):  # step 5, per-step logits
    io = fx.io
    n_gen = io["gen/out_codes"].shape[-1]
    batch = fx.layout.generation_batch(io["gen/context_codes_padded"], n_gen)
    rows = io["gen/final_sequence"].shape[0]
    generated = torch.cat([io["gen/final_sequence"]] * 2)
    seq = torch.where(batch.codes == -1, generated, batch.codes)  # generated slots, both halves
    memory, memory_mask = io["gen/xattn_data"], io["gen/xattn_mask"]
    cache = fx.lm.new_cache(seq.shape[0], seq.shape[-1])
    positions = positions_from_mask(batch.attention_mask)
    start, S = batch.start_offset, seq.shape[-1]
    assert S - start == io["gen/step_cond_logits_last"].shape[0]
    prev = 0
    for i, offset in enumerate(range(start, S)):
        out = fx.lm(seq[..., prev:offset], batch.attention_mask[:, :offset], memory, memory_mask,
                    cache=cache, positions=positions[:, prev:offset], last_only=True)[:, :, -1]
        prev = offset
        assert (out[:rows] - io["gen/step_cond_logits_last"][i]).abs().max() <= LOGIT_TOL
        assert (out[rows:] - io["gen/step_uncond_logits_last"][i]).abs().max() <= LOGIT_TOL
        cfg = out[rows:] + 3.0 * (out[:rows] - out[rows:])
        assert (cfg - io["gen/step_cfg_logits_last"][i]).abs().max() <= 3 * LOGIT_TOL


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "full-recompute"])
def test_free_running_greedy_generation(fx: Fixture, use_cache: bool):  # step 5, free running
    io = fx.io
    rows = io["gen/final_sequence"].shape[0]
    n_gen = io["gen/out_codes"].shape[-1]
    text = (io["gen/xattn_data"][:rows], io["gen/xattn_mask"][:rows])
    out, steps = generate(fx.lm, io["gen/context_codes_padded"], n_gen, text_memory=text,
                          params=SamplingParams(greedy=True), use_cache=use_cache, return_steps=True)
    assert torch.equal(out, io["gen/out_codes"])
    assert (steps - io["gen/step_cfg_logits_last"]).abs().max() <= 3 * LOGIT_TOL


@torch.no_grad()
def test_encodec_mapping(fx: Fixture):  # step 6
    io, codec = fx.io, fx.expert.codec
    audio = io["encodec/audio_in"]
    assert (codec.latent(audio) - io["encodec/encoder_out"]).abs().max() <= 1e-4
    assert torch.equal(codec.encode(audio), io["encodec/codes"])
    decoded = codec.decode(io["encodec/codes"])
    assert (decoded - io["encodec/audio_out"]).abs().max() <= 1e-4
