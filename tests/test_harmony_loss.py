"""`loss.harmony_weight`: chord labels per target frame, the training-only chord head, and its
place in checkpoints, resume, validation and export (on the tiny pipeline of test_train.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage_stack.errors import StageStackError
from stage_stack.expert import load_expert
from stage_stack.training.checkpoint import latest_checkpoint, load_checkpoint
from stage_stack.training.data import ChordSpan
from stage_stack.training.token_cache import chord_frames
from stage_stack.training.train import Base, Trainer, build_datasets, train
from stage_stack.testing import tiny_codec
from test_train import losses, make_config, shared  # noqa: F401  (the module fixture)


def test_chord_frames_follow_the_variants_speed_and_pitch():
    chords = [ChordSpan(name="C", root=0, pitch_classes=[0, 4, 7], start=0.0, end=2.0, bar=0),
              ChordSpan(name="F", root=5, pitch_classes=[5, 9, 0], start=2.0, end=4.0, bar=1)]
    # 10 frames/s; the variant is twice as long and 2 semitones up; frames 25.. of it
    labels, known = chord_frames(chords, 25, 60, 10.0, 2.0, 2)
    assert labels.shape == (60, 12) and known.shape == (60,)
    def pcs(i):
        return set(np.flatnonzero(labels[i]).tolist())
    assert pcs(0) == {2, 6, 9}  # variant 2.55 s = song 1.275 s: C, moved up to D
    assert pcs(14) == {2, 6, 9} and pcs(15) == {7, 11, 2}  # the change at song 2 s = variant 4 s = frame 40
    assert known[:55].all() and not known[55:].any()  # variant 8 s = song 4 s: the last chord ends
    assert not labels[55:].any()
    plain, _ = chord_frames(chords, 0, 40, 10.0, 1.0, 0)
    assert set(np.flatnonzero(plain[19]).tolist()) == {0, 4, 7} and set(np.flatnonzero(plain[20]).tolist()) == {0, 5, 9}


def _trainer(shared, tmp_path, weight):  # noqa: F811
    from accelerate import Accelerator

    from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights

    lm = init_weights(StageLM(StageLMConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, card=16, n_q=2)), seed=0)
    config = make_config(shared, tmp_path / f"w{weight}", loss={"harmony_weight": weight}, data={"click_prob": 0.5})
    codec = tiny_codec()
    train_data, valid_data = build_datasets(config, codec)
    return Trainer(config, Base(lm, codec, None, None), train_data, valid_data, Accelerator(cpu=True))


def test_the_harmony_loss_is_the_chord_heads_cross_entropy_on_heard_stems_rows(shared, tmp_path):  # noqa: F811
    trainer = _trainer(shared, tmp_path, 0.5)
    batch = trainer._micro_batch(0)
    kinds = [i.context_kind for i in batch["info"]]
    assert batch["target_chords"].shape == (*batch["target"][:, 0].shape, 12)
    assert "stems" in kinds
    # the synthetic band's chords: 3 or 4 pitch classes wherever a chord is annotated
    counts = batch["target_chords"].sum(-1)[batch["target_chords_known"]]
    assert set(counts.unique().tolist()) <= {3.0, 4.0}

    with torch.no_grad():
        terms = trainer.losses(batch, train=False, harmony=True)
        context, _, _ = trainer.conditioning(batch, train=False)
        tb = trainer.layout.training_batch(context, batch["target"].to(torch.long))
        logits, hidden = trainer.lm(tb.codes, tb.attention_mask, None, None, positions=tb.positions,
                                    return_hidden=True)
        assert torch.equal(logits, trainer.lm(tb.codes, tb.attention_mask, None, None, positions=tb.positions))
        C, T = tb.context_len, batch["target"].shape[-1]
        rows = torch.tensor([k == "stems" for k in kinds])
        h = hidden[rows, C + 1 : C + 1 + T]  # the steps that predict each frame's first codebook
        keep = batch["target_chords_known"][rows]
        expected = F.binary_cross_entropy_with_logits(trainer.harmony_head(h[keep]),
                                                      batch["target_chords"][rows][keep])
        plain = trainer.loss(batch, train=False)
    assert float(terms["harmony"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["lm"]) == pytest.approx(float(plain), rel=1e-6)
    assert "harmony" not in trainer.losses(batch, train=False)  # validation's LM loss alone by default

    # clicks carry no harmony: a batch of click pairs scores nothing, yet keeps the graph
    clicks = dict(batch, info=[type(i)(**{**i.__dict__, "context_kind": "click"}) for i in batch["info"]])
    none = trainer.losses(clicks, train=False, harmony=True)["harmony"]
    assert none.item() == 0.0 and none.requires_grad

    # the head trains: its gradient is non-zero and reaches the LM through the hidden state
    trainer.lm.zero_grad()
    trainer.losses(batch, train=True)["harmony"].backward()
    assert trainer.harmony_head.weight.grad.abs().sum() > 0
    assert trainer.lm.blocks[0].ffn.fc1.weight.grad.abs().sum() > 0

    off = _trainer(shared, tmp_path, 0.0)
    assert off.harmony_head is None and "harmony" not in off.losses(batch, train=True)


def test_a_harmony_run_resumes_exactly_reports_its_losses_and_exports_no_head(shared, tmp_path):  # noqa: F811
    def config(run):
        return make_config(shared, tmp_path / run, loss={"harmony_weight": 1.0})

    straight = train(config("a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        def stop(step, record):
            if step == 3:
                raise KeyboardInterrupt
        train(config("b"), progress=False, callback=stop)
    resumed = train(config("b"), resume=True, progress=False)
    assert losses(resumed.history) == losses(straight.history)
    harmony = [r["harmony_loss"] for r in straight.history if "harmony_loss" in r]
    # a step whose pairs are all clicks or dropped contexts scores 0 (nothing to hear a chord in)
    assert len(harmony) == 8 and all(0 <= h < 2 for h in harmony) and sum(h > 0 for h in harmony) >= 6
    assert harmony == [r["harmony_loss"] for r in resumed.history if "harmony_loss" in r]
    val = [r for r in straight.history if "val_harmony" in r]
    assert val and all(r["val_harmony"] > 0 and r["val_harmony_no_context"] > 0 for r in val)
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    for name, tensor in a["harmony_head"].items():
        assert torch.equal(tensor, b["harmony_head"][name]), name
    # the export is the LM alone: no head tensors, and it loads and runs as any expert
    expert = load_expert(straight.output)
    assert set(expert.lm.state_dict()) == set(a["model"])
    assert json.dumps(expert.metadata.training["config"]["loss"]) == json.dumps(
        {"onset_weight": 0.0, "harmony_weight": 1.0})


def test_songs_without_chords_are_refused_before_training(shared, tmp_path):  # noqa: F811
    import shutil

    songs = tmp_path / "songs"
    train(make_config(shared, tmp_path / "warm"), progress=False, export=False, stop_after=1)
    shutil.copytree(shared["root"] / "songs", songs)
    first = sorted(p for p in songs.iterdir() if p.is_dir())[0]
    meta = json.loads((first / "metadata.json").read_text())
    meta["chords"] = []
    (first / "metadata.json").write_text(json.dumps(meta))
    config = make_config(shared, tmp_path / "run", loss={"harmony_weight": 1.0},
                         data={"root": str(songs), "synth": None})
    with pytest.raises(StageStackError, match=rf"{first.name}.*metadata.json has no 'chords'.*harmony_weight: 0"):
        train(config, progress=False, export=False)
    assert latest_checkpoint(tmp_path / "run") is None
