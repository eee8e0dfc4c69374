"""An expert's chord stream (`StageLMConfig.chord_classes`): the vocabulary, where the chord
tokens sit in the token layout, generation that draws only chords there and decodes the audio
streams alone, and training (labels, dropout per stream, a base expert grown one, resume, export)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stage_stack.chords import CHORD_CLASSES, NO_CHORD, chord_class, chord_name, chord_pitch_classes, transpose
from stage_stack.errors import StageStackError
from stage_stack.expert import load_expert, save_codec
from stage_stack.generation import SamplingParams, generate
from stage_stack.layout import TokenLayout, audio_codes, with_chord_row
from stage_stack.models.stage_lm import StageLM, StageLMConfig, init_weights
from stage_stack.pipeline import render_stem
from stage_stack.testing import TINY_CODEC, make_tiny_expert, tiny_codec
from stage_stack.training.config import TrainConfig
from stage_stack.training.data import ChordSpan
from stage_stack.training.token_cache import chord_class_frames
from stage_stack.training.train import add_chord_stream, train
from test_train import losses, make_config, shared  # noqa: F401  (the module fixture)

CODEC64 = dataclasses.replace(TINY_CODEC, card=64)  # room for the 49 chord classes
LM = StageLMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, card=64, n_q=2, cross_attention=False,
                   chord_classes=CHORD_CLASSES)


def test_chord_classes_name_root_and_triad():
    assert chord_class(0, [0, 4, 7]) == 0 and chord_name(0) == "C"
    assert chord_class(9, [9, 0, 4]) == 37 and chord_name(37) == "Am"
    assert chord_class(11, [11, 2, 5]) == 46 and chord_name(46) == "Bdim"
    assert chord_class(0, [0, 4, 8]) == 3 and chord_name(3) == "Caug"
    assert chord_class(7, [7, 11, 2, 5]) == chord_class(7, [7, 11, 2])  # G7 is named by its triad
    assert chord_class(2, [2, 5, 9, 0]) == chord_class(2, [2, 5, 9])  # Dm7 too
    assert chord_class(11, [11, 2, 5, 9]) == 46  # Bm7b5: diminished triad
    assert chord_class(7, [7, 0, 2]) == 28  # Gsus4: no third, kept as major on its root
    assert transpose(37, 3) == 1 and chord_name(1) == "Cm" and transpose(NO_CHORD, 5) == NO_CHORD
    assert chord_pitch_classes(37) == (9, 0, 4) and chord_pitch_classes(NO_CHORD) == ()
    assert chord_name(NO_CHORD) == "N" and CHORD_CLASSES == 49
    with pytest.raises(ValueError, match="0..48"):
        chord_name(49)


def test_chord_class_frames_follow_the_variants_speed_and_pitch():
    chords = [ChordSpan(name="C", root=0, pitch_classes=[0, 4, 7], start=0.0, end=2.0, bar=0),
              ChordSpan(name="Am", root=9, pitch_classes=[9, 0, 4], start=2.0, end=4.0, bar=1)]
    # 10 frames/s; the variant is twice as long and 2 semitones up; frames 25.. of it
    classes = chord_class_frames(chords, 25, 60, 10.0, 2.0, 2)
    assert classes.dtype == np.int64 and classes.shape == (60,)
    assert chord_name(int(classes[0])) == "D" and chord_name(int(classes[14])) == "D"
    assert chord_name(int(classes[15])) == "Bm"  # the change at song 2 s = variant frame 40
    assert (classes[55:] == NO_CHORD).all() and (classes[:55] != NO_CHORD).all()


def test_the_config_counts_the_chord_stream_and_refuses_a_vocabulary_too_small():
    assert LM.streams == 3 and dataclasses.replace(LM, chord_classes=0).streams == 2
    assert len(StageLM(LM).embeddings) == 3 and len(StageLM(LM).heads) == 3
    with pytest.raises(ValueError, match="chord_classes \\(49\\) must not exceed card \\(16\\)"):
        dataclasses.replace(LM, card=16)
    with pytest.raises(ValueError, match="chord_classes must be 0"):
        dataclasses.replace(LM, chord_classes=-1)


def test_a_frames_chord_comes_one_step_before_its_first_codebook_and_the_context_has_none():
    layout = TokenLayout.for_config(LM)
    context = torch.randint(0, 64, (2, 2, 5))
    target = torch.randint(0, 64, (2, 2, 4))
    classes = torch.tensor([[3, 3, 7, 7], [NO_CHORD, 0, 0, 1]])
    tb = layout.training_batch([with_chord_row(c, LM) for c in context], with_chord_row(target, LM, classes))
    C = 5
    for j in range(3):
        assert torch.equal(tb.codes[:, 0, C + 2 + j], classes[:, j])  # the chord of frame j
        assert torch.equal(tb.codes[:, 1, C + 3 + j], target[:, 0, j])  # then its first codebook
    # the context's chord slots are PAD and masked; its audio slots are valid
    assert (tb.codes[:, 0, 1 : C + 1] == LM.pad_token).all()
    assert not tb.final_mask[:, 0, 1 : C + 1].any() and tb.final_mask[:, 1, 2 : C + 2].all()
    # history dropped per stream: the audio hidden, the chords kept, the labels unchanged
    hide = torch.tensor([[False, True, True], [False, False, False]])
    hidden = layout.training_batch([with_chord_row(c, LM) for c in context], with_chord_row(target, LM, classes),
                                   drop_history=hide)
    for q in (1, 2):  # stream q holds target frames from step C + 2 + q
        assert (hidden.codes[0, q, C + 2 + q :] == LM.pad_token).all()
    assert torch.equal(hidden.codes[0, 0], tb.codes[0, 0])
    assert torch.equal(hidden.codes[1], tb.codes[1]) and torch.equal(hidden.targets, tb.targets)
    assert torch.equal(audio_codes(with_chord_row(target, LM, classes), LM), target)
    with pytest.raises(ValueError, match="3 streams"):
        audio_codes(target, LM)
    with pytest.raises(ValueError, match="without a chord stream"):
        with_chord_row(target, dataclasses.replace(LM, chord_classes=0), classes)


def test_generation_draws_only_chords_in_the_chord_stream_and_decodes_the_audio_streams(tmp_path):
    lm = init_weights(StageLM(LM), seed=0).eval()
    with torch.no_grad():  # push the chord head toward codes that are not chords
        lm.heads[0].weight[CHORD_CLASSES:] += 0.5 * lm.heads[0].weight[:1].sign()
    context = with_chord_row(torch.randint(0, 64, (1, 2, 10)), LM)
    out = generate(lm, context, 30, num_samples=3, seed=0, params=SamplingParams(top_k=0))
    assert out.shape == (3, 3, 30)
    assert (out[:, 0] < CHORD_CLASSES).all() and out[:, 0].unique().numel() > 3
    assert (out[:, 1:] < 64).all()

    expert = load_expert(make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64))
    codec = expert.codec
    audio = 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    result = render_stem(expert, audio, 16000, 1.0, candidates=2, seed=0)
    assert result.codes.shape[:2] == (2, 3) and (result.codes[:, 0] < CHORD_CLASSES).all()
    assert result.audio.shape == (2, 16000)
    # what was decoded is the audio streams: the same codes through the codec give the same audio
    again = codec.decode(audio_codes(result.codes, LM))[:, 0, :16000].float().numpy()
    assert np.allclose(again, result.audio, atol=1e-5)


def test_long_form_windows_continue_from_the_chords_they_generated(tmp_path, monkeypatch):
    import stage_stack.pipeline as pipeline
    from stage_stack.longform import plan_windows

    expert = load_expert(make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64))
    prompts = []

    def recording(lm, context, n_frames, **kwargs):
        prompts.append(kwargs.get("prompt"))
        assert context.shape[1] == LM.streams and (context[:, 0] == LM.pad_token).all()  # contexts carry no chord
        return generate(lm, context, n_frames, **kwargs)

    monkeypatch.setattr(pipeline, "generate", recording)
    plan = plan_windows(3.0, 16000, expert.codec.config.hop_length, 1.0, 1.0)
    audio = 0.1 * np.random.default_rng(1).standard_normal(3 * 16000).astype(np.float32)
    result = render_stem(expert, audio, 16000, 3.0, candidates=2, seed=0, plan=plan)
    assert len(plan.windows) >= 3 and prompts[0] is None
    for window, prompt in zip(plan.windows[1:], prompts[1:]):
        # each later window starts from the earlier one's tokens, its chords included
        assert prompt.shape[1] == LM.streams and window.prompt_frames > 0
        expected = result.codes[:, :, window.start_frame : window.start_frame + window.prompt_frames]
        assert torch.equal(prompt.cpu(), expected) and (prompt[:, 0] < CHORD_CLASSES).all()


def test_a_base_expert_grows_a_chord_stream_with_its_streams_moved_up():
    plain = init_weights(StageLM(dataclasses.replace(LM, chord_classes=0)), seed=1)
    grown = add_chord_stream(plain, seed=0)
    assert grown.config.chord_classes == CHORD_CLASSES and grown.config.streams == 3
    for k in range(2):
        assert torch.equal(grown.embeddings[k + 1].weight, plain.embeddings[k].weight)
        assert torch.equal(grown.heads[k + 1].weight, plain.heads[k].weight)
    assert torch.equal(grown.blocks[0].ffn.fc1.weight, plain.blocks[0].ffn.fc1.weight)
    assert torch.count_nonzero(grown.embeddings[0].weight[LM.pad_token]) == 0
    with pytest.raises(StageStackError, match="already has a chord stream.*remove base.add_chord_stream"):
        add_chord_stream(grown, seed=0)


def _chord_config(shared, run, **overrides):
    config = make_config(shared, run, data={"target_stem": "keys"},
                         dropout={"history": 0.5, "chord_history": 0.5}, **overrides).model_dump(mode="json")
    config["base"]["fresh"].update(codec=str(shared["root"] / "codec64.safetensors"), chord_stream=True)
    config["export"]["sampling"] = {"temperature": 0.5}
    return TrainConfig.model_validate(config)


@pytest.fixture(scope="module")
def chord_shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("chords")
    save_codec(root / "codec64.safetensors", tiny_codec(CODEC64), id="tiny64")
    return {"root": root}


def test_a_chord_run_resumes_exactly_reports_what_it_names_and_exports_its_stream(chord_shared, tmp_path):
    straight = train(_chord_config(chord_shared, tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        def stop(step, record):
            if step == 3:
                raise KeyboardInterrupt
        train(_chord_config(chord_shared, tmp_path / "b"), progress=False, callback=stop)
    resumed = train(_chord_config(chord_shared, tmp_path / "b"), resume=True, progress=False)
    assert losses(resumed.history) == losses(straight.history) and len(losses(straight.history)) == 8
    val = [r for r in straight.history if "val_chord_accuracy" in r]
    assert val and all(0 <= r["val_chord_accuracy"] <= 1 and 0 <= r["val_chord_accuracy_no_context"] <= 1
                       for r in val)
    expert = load_expert(straight.output)
    assert expert.lm.config.chord_classes == CHORD_CLASSES and len(expert.lm.heads) == 3
    assert expert.metadata.training["config"]["dropout"]["chord_history"] == 0.5
    card = expert.metadata.model_card
    assert "| chord stream | 49 classes" in card and "| sampling | temperature 0.5 (the Arranger's default" in card
    assert expert.metadata.sampling_params().temperature == 0.5
    assert f"- val_chord_accuracy: {val[-1]['val_chord_accuracy']:.4f}" in card


def test_a_chord_stream_needs_a_codec_with_room_for_the_chords(shared, tmp_path):  # noqa: F811
    config = make_config(shared, tmp_path / "small", data={"target_stem": "keys"}).model_dump(mode="json")
    config["base"]["fresh"]["chord_stream"] = True
    with pytest.raises(ValueError, match="chord_classes \\(49\\) must not exceed card \\(16\\)"):
        train(TrainConfig.model_validate(config), progress=False)


def test_add_chord_stream_is_for_a_base_expert():
    base = make_config({"root": Path("/nowhere")}, Path("/nowhere/run")).model_dump(mode="json")
    with pytest.raises(ValueError, match="add_chord_stream grows a base expert's LM.*base.fresh.chord_stream"):
        TrainConfig.model_validate({**base, "base": {"fresh": {"codec": "c.safetensors"}, "add_chord_stream": True}})


def test_a_base_expert_grows_fresh_embedding_rows_for_a_context_codec():
    from stage_stack.training.train import add_context_rows

    plain = init_weights(StageLM(LM), seed=1)
    grown = add_context_rows(plain, 32, seed=0)
    assert grown.config.context_card == 32 and grown.config.context_offset == LM.input_card
    for old, new in zip(plain.embeddings, grown.embeddings):
        assert new.weight.shape[0] == LM.input_card + 32
        assert torch.equal(new.weight[: LM.input_card], old.weight)
        assert new.weight[LM.input_card :].std() > 0.01  # fresh rows for the context codec's codes
    assert torch.equal(grown.heads[1].weight, plain.heads[1].weight)
    # the same target, heard through the new rows: only the context's embeddings differ
    layout = TokenLayout.for_config(grown.config)
    context = with_chord_row(torch.randint(0, 32, (1, 2, 6)), grown.config)
    tb = layout.training_batch(context, with_chord_row(torch.randint(0, 64, (1, 2, 5)), grown.config,
                                                       torch.zeros(1, 5, dtype=torch.long)))
    assert (tb.codes[0, 1, 2:8] >= LM.input_card).all()


def test_add_context_codec_is_for_a_base_expert():
    base = make_config({"root": Path("/nowhere")}, Path("/nowhere/run")).model_dump(mode="json")
    with pytest.raises(ValueError, match="add_context_codec gives a base expert's LM.*base.fresh.context_codec"):
        TrainConfig.model_validate({**base, "base": {"fresh": {"codec": "c.safetensors"},
                                                      "add_context_codec": "ctx.safetensors"}})


def test_given_tokens_are_kept_and_the_rest_is_sampled():
    lm = init_weights(StageLM(LM), seed=0).eval()
    context = with_chord_row(torch.randint(0, 64, (1, 2, 8)), LM)
    given = torch.full((1, 3, 12), -1, dtype=torch.long)
    given[0, 0] = torch.tensor([0, 0, 0, 0, 37, 37, 37, 37, 5, 5, 5, NO_CHORD])  # a chord progression
    out = generate(lm, context, 12, num_samples=2, seed=0, given=given)
    assert torch.equal(out[:, 0], given[0, 0].expand(2, -1))  # the chords as given, in every sample
    free = generate(lm, context, 12, num_samples=2, seed=0)
    assert not torch.equal(free[:, 0], out[:, 0]) and (out[:, 1:] >= 0).all()
    with pytest.raises(ValueError, match="given has shape \\(1, 3, 5\\), expected \\(1, 3, 12\\)"):
        generate(lm, context, 12, given=given[..., :5])


def test_the_arranger_layers_a_chord_expert_over_another_and_saves_it(tmp_path):
    from stage_stack import Arranger

    keys = make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64)
    drums = make_tiny_expert(tmp_path / "drums.safetensors", "drums")
    song = Arranger({"drums": drums, "keys": keys}, device_map="cpu", dtype="fp32").arrange(
        ["drums", "keys"], context=None, bpm=120, duration=2.0, seed=0)
    assert song.stems["keys"].shape == song.stems["drums"].shape and np.abs(song.stems["keys"]).max() > 0
    song.save(tmp_path / "song")
    assert (tmp_path / "song" / "stems" / "keys.wav").is_file()


def test_chords_drawn_at_their_own_temperature():
    from stage_stack.generation import draw_chords
    lm = init_weights(StageLM(LM), seed=0).eval()
    context = with_chord_row(torch.randint(0, 64, (1, 2, 8)), LM)
    params = SamplingParams(temperature=0.8, top_k=0, chord_temperature=0)
    out, steps = generate(lm, context, 12, num_samples=3, seed=0, params=params, return_steps=True)
    chord_logits = steps[:12, :, 0]  # stream 0 has no delay: step i draws frame i's chord
    assert (torch.isfinite(chord_logits).sum(-1) == 1).all()  # only the likeliest chord is left
    assert torch.equal(out[:, 0], chord_logits.argmax(-1).T)
    audio = steps[:, :, 1:]
    assert (torch.isfinite(audio).sum(-1) > 1).all()  # the audio is still sampled
    # a chord temperature t under a temperature T: the sampler's division by T leaves them divided by t
    logits = torch.tensor([[1.0, 2.0, 3.0] + [0.5] * 61])
    draw_chords(logits, 3, SamplingParams(temperature=0.5, chord_temperature=0.25))
    assert torch.equal(logits[0, :3], torch.tensor([2.0, 4.0, 6.0])) and torch.isinf(logits[0, 3:]).all()
    unchanged = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    draw_chords(unchanged, 3, SamplingParams(temperature=0.5))
    assert torch.equal(unchanged[0, :3], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="chord_temperature must be >= 0"):
        SamplingParams(chord_temperature=-1)


def test_the_chord_weight_counts_the_chord_streams_loss_more_and_needs_a_chord_stream(shared, tmp_path):  # noqa: F811
    layout = TokenLayout.for_config(LM)
    torch.manual_seed(0)
    context = [with_chord_row(torch.randint(0, 64, (2, 5)), LM) for _ in range(2)]
    target = with_chord_row(torch.randint(0, 64, (2, 2, 4)), LM, torch.tensor([[3, 3, 7, 7], [0, 0, 1, 1]]))
    tb = layout.training_batch(context, target)
    logits = torch.randn(2, 3, tb.codes.shape[-1], LM.card)
    per_stream = [layout.loss(logits, tb, first_stream_weight=w) for w in (0.0, 1.0, 4.0)]
    chord = 3 * (per_stream[1] - per_stream[0])  # the chord stream's own cross-entropy
    assert torch.allclose(per_stream[2], per_stream[0] + 4 * chord / 3)
    config = make_config(shared, tmp_path / "plain", loss={"chord_weight": 4})
    with pytest.raises(StageStackError, match="loss.chord_weight is 4 but this LM has no chord stream"):
        train(config, progress=False)
