"""The training-only auxiliary heads (`loss.harmony_weight`, `loss.beat_weight`): their labels per
target frame, their losses, and their place in checkpoints, resume, validation and export (on
the tiny pipeline of test_train.py)."""

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
from stage_stack.training.token_cache import beat_phase_frames, chord_frames
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


def _trainer(shared, tmp_path, weight, beat=0.0):  # noqa: F811
    from accelerate import Accelerator

    from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights

    lm = init_weights(StageLM(StageLMConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, card=16, n_q=2)), seed=0)
    config = make_config(shared, tmp_path / f"w{weight}-{beat}", loss={"harmony_weight": weight, "beat_weight": beat},
                         data={"click_prob": 0.5})
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
        terms = trainer.losses(batch, train=False, heads=True)
        context, _, _ = trainer.conditioning(batch, train=False)
        tb = trainer.layout.training_batch(context, batch["target"].to(torch.long))
        logits, hidden = trainer.lm(tb.codes, tb.attention_mask, None, None, positions=tb.positions,
                                    return_hidden=True)
        assert torch.equal(logits, trainer.lm(tb.codes, tb.attention_mask, None, None, positions=tb.positions))
        C, T = tb.context_len, batch["target"].shape[-1]
        rows = torch.tensor([k == "stems" for k in kinds])
        h = hidden[rows, C + 1 : C + 1 + T]  # the steps that predict each frame's first codebook
        keep = batch["target_chords_known"][rows]
        expected = F.binary_cross_entropy_with_logits(trainer.heads["harmony"](h[keep]),
                                                      batch["target_chords"][rows][keep])
        plain = trainer.loss(batch, train=False)
    assert float(terms["harmony"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["lm"]) == pytest.approx(float(plain), rel=1e-6)
    assert "harmony" not in trainer.losses(batch, train=False)  # validation's LM loss alone by default

    # clicks carry no harmony: a batch of click pairs scores nothing, yet keeps the graph
    clicks = dict(batch, info=[type(i)(**{**i.__dict__, "context_kind": "click"}) for i in batch["info"]])
    none = trainer.losses(clicks, train=False, heads=True)["harmony"]
    assert none.item() == 0.0 and none.requires_grad

    # the head trains: its gradient is non-zero and reaches the LM through the hidden state
    trainer.lm.zero_grad()
    trainer.losses(batch, train=True)["harmony"].backward()
    assert trainer.heads["harmony"].weight.grad.abs().sum() > 0
    assert trainer.lm.blocks[0].ffn.fc1.weight.grad.abs().sum() > 0

    off = _trainer(shared, tmp_path, 0.0)
    assert off.heads is None and "harmony" not in off.losses(batch, train=True)


def _straight_and_resumed(a, b):
    """Run `a` straight through and `b` stopped after step 3 then resumed; their losses match."""
    straight = train(a, progress=False)
    with pytest.raises(KeyboardInterrupt):
        def stop(step, record):
            if step == 3:
                raise KeyboardInterrupt
        train(b, progress=False, callback=stop)
    resumed = train(b, resume=True, progress=False)
    assert losses(resumed.history) == losses(straight.history)
    return straight, resumed


def test_a_harmony_run_resumes_exactly_reports_its_losses_and_exports_no_head(shared, tmp_path):  # noqa: F811
    def config(run):
        return make_config(shared, tmp_path / run, loss={"harmony_weight": 1.0})

    straight, resumed = _straight_and_resumed(config("a"), config("b"))
    harmony = [r["harmony_loss"] for r in straight.history if "harmony_loss" in r]
    # a step whose pairs are all clicks or dropped contexts scores 0 (nothing to hear a chord in)
    assert len(harmony) == 8 and all(0 <= h < 2 for h in harmony) and sum(h > 0 for h in harmony) >= 6
    assert harmony == [r["harmony_loss"] for r in resumed.history if "harmony_loss" in r]
    val = [r for r in straight.history if "val_harmony" in r]
    assert val and all(r["val_harmony"] > 0 and r["val_harmony_no_context"] > 0 for r in val)
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    for name, tensor in a["heads"].items():
        assert torch.equal(tensor, b["heads"][name]), name
    # the export is the LM alone: no head tensors, and it loads and runs as any expert
    expert = load_expert(straight.output)
    assert set(expert.lm.state_dict()) == set(a["model"])
    assert json.dumps(expert.metadata.training["config"]["loss"]) == json.dumps(
        {"onset_weight": 0.0, "harmony_weight": 1.0, "beat_weight": 0.0, "chord_weight": 1.0})


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


def test_beat_phase_frames_follow_the_variants_speed():
    beats = np.arange(0.0, 4.01, 0.5)  # 120 BPM for 4 s
    # 10 frames/s, the song as is: 5 frames a beat; bin 0 holds the frames within 1/8 beat of one
    plain, known = beat_phase_frames(beats, 0, 45, 10.0, 1.0)
    assert plain[:10].tolist() == [0, 1, 2, 3, 0, 0, 1, 2, 3, 0]
    assert known[:39].all() and not known[40:].any() and not plain[40:].any()  # after the last beat
    # the variant twice as long: 10 frames a beat; frames 5.. of it (song 0.275 s on)
    slow, _ = beat_phase_frames(beats, 5, 12, 10.0, 2.0)
    assert slow.tolist() == [2, 3, 3, 3, 0, 0, 1, 1, 1, 2, 2, 3]  # phases 0.55, 0.65, .. 1.05, ..
    assert not beat_phase_frames(beats + 1.0, 0, 5, 10.0, 1.0)[1].any()  # before the first beat


def test_the_beat_loss_is_the_phase_heads_cross_entropy_on_heard_stems_and_click_rows(shared, tmp_path):  # noqa: F811
    trainer = _trainer(shared, tmp_path, 0.0, beat=0.5)
    assert set(trainer.heads) == {"beat"} and trainer.heads["beat"].out_features == 4
    batch = trainer._micro_batch(0)
    kinds = [i.context_kind for i in batch["info"]]
    assert {"stems", "click"} <= set(kinds)
    phase, known = batch["target_beat_phase"], batch["target_beat_known"]
    assert phase.shape == batch["target"][:, 0].shape and phase.dtype == torch.int64
    assert known.float().mean() > 0.7 and set(phase[known].unique().tolist()) == {0, 1, 2, 3}
    with torch.no_grad():
        terms = trainer.losses(batch, train=False, heads=True)
        context, _, _ = trainer.conditioning(batch, train=False)
        tb = trainer.layout.training_batch(context, batch["target"].to(torch.long))
        _, hidden = trainer.lm(tb.codes, tb.attention_mask, None, None, positions=tb.positions, return_hidden=True)
        C, T = tb.context_len, batch["target"].shape[-1]
        h = hidden[:, C + 1 : C + 1 + T]
        expected = F.cross_entropy(trainer.heads["beat"](h[known]), phase[known])  # every row: both kinds
        only_stems = [k == "stems" for k in kinds]
        stems_rows = torch.tensor(only_stems)[:, None] & known
        stems_only = F.cross_entropy(trainer.heads["beat"](h[stems_rows]), phase[stems_rows])
    assert float(terms["beat"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["beat"]) != pytest.approx(float(stems_only), rel=1e-3)
    assert "harmony" not in terms
    # a context dropped for CFG carries no beat: with every row dropped nothing is scored
    dropped = trainer.heads["beat"]
    from stage_stack.training.auxiliary import head_loss
    none = head_loss("beat", dropped, hidden, C, batch, [False] * len(kinds))
    assert none.item() == 0.0


def test_a_run_with_both_heads_resumes_exactly_and_reads_an_older_harmony_checkpoint(shared, tmp_path):  # noqa: F811
    def config(run, **loss):
        return make_config(shared, tmp_path / run, loss={"harmony_weight": 1.0, "beat_weight": 0.5, **loss})

    straight, resumed = _straight_and_resumed(config("a"), config("b"))
    beat = [r["beat_loss"] for r in straight.history if "beat_loss" in r]
    assert len(beat) == 8 and all(0 < b < 3 for b in beat)  # clicks carry the beat: every step scores
    assert beat == [r["beat_loss"] for r in resumed.history if "beat_loss" in r]
    val = [r for r in straight.history if "val_beat" in r][-1]
    for key in ("val_beat", "val_beat_no_context", "val_beat_click", "val_beat_click_no_context",
                "val_harmony", "val_harmony_no_context"):
        assert 0 < val[key] < 3, key
    assert "val_harmony_click" not in val  # a click names no chord
    state = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    assert set(state["heads"]) == {"harmony.weight", "harmony.bias", "beat.weight", "beat.bias"}

    # a checkpoint written before the beat head existed (one "harmony_head") resumes as before
    from stage_stack.training.checkpoint import save_checkpoint

    harmony_only = config("c", beat_weight=0.0)
    with pytest.raises(KeyboardInterrupt):
        def stop_at_4(step, record):
            if step == 4:
                raise KeyboardInterrupt
        train(harmony_only, progress=False, callback=stop_at_4)
    path = latest_checkpoint(tmp_path / "c")
    old = load_checkpoint(path)
    old["harmony_head"] = {k.split(".", 1)[1]: v for k, v in old.pop("heads").items()}
    save_checkpoint(tmp_path / "c", old["step"], old, keep=5)
    resumed_old = train(harmony_only, resume=True, progress=False)
    straight_old = train(config("d", beat_weight=0.0), progress=False)
    assert losses(resumed_old.history) == losses(straight_old.history)


def test_the_card_names_the_heads_and_their_validation_losses():
    from pathlib import Path

    from stage_stack.expert import read_metadata
    from stage_stack.instruments import WEIGHTS_DIR
    from stage_stack.training.config import TrainConfig, load_config
    from stage_stack.training.export import model_card, training_summary

    repo = Path(__file__).resolve().parents[1]
    metadata = read_metadata(WEIGHTS_DIR / "bass.safetensors")  # stage 4: trained with the chord head
    card = model_card(load_config(repo / "configs" / "demo-bass.yaml", TrainConfig), metadata, metadata.training)
    assert "auxiliary chord objective, not in STAGE's recipe (weight 1.0)" in card
    assert "- val_harmony: 0.1051" in card and "- val_harmony_no_context: 0.3369" in card
    assert card == metadata.model_card == (WEIGHTS_DIR / "bass.md").read_text()  # the shipped card is this card
    stage2 = model_card(load_config(repo / "configs" / "demo-bass-stage2.yaml", TrainConfig), metadata,
                        {**metadata.training, "metrics": {}})
    assert "auxiliary" not in stage2 and "val_harmony" not in stage2
    summary = training_summary([{"step": 1, "train_loss": 2.0}, {"step": 2, "val_loss": 3.0, "val_beat": 1.25,
                                                                 "val_beat_click_no_context": 1.5}])
    assert summary == {"train_loss": 2.0, "val_loss": 3.0, "val_beat": 1.25, "val_beat_click_no_context": 1.5}
