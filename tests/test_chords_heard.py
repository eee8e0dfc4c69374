"""Chords heard in a mix (stage_stack.chord_recognition) and given to an expert's chord stream
(`Layer.chords`, `render_stem(chords=...)`)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile

from stage_stack import Arranger, Layer
from stage_stack.chord_recognition import diatonic_triads, recognize_chords
from stage_stack.chords import CHORD_CLASSES, NO_CHORD, chord_class
from stage_stack.errors import InputError
from stage_stack.expert import load_expert
from stage_stack.models.stage_lm import StageLMConfig
from stage_stack.pipeline import render_stem, window_plan_for
from stage_stack.testing import TINY_CODEC, make_tiny_expert

SR, HOP = 16000, 640
CODEC64 = dataclasses.replace(TINY_CODEC, card=64)
LM = StageLMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, card=64, n_q=2, cross_attention=False,
                   chord_classes=CHORD_CLASSES)


def _tone(midi: int, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f = 440.0 * 2 ** ((midi - 69) / 12)
    return sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3)).astype(np.float32)


def _progression(chords: list[tuple[int, tuple[int, int, int]]], seconds: float = 1.0) -> np.ndarray:
    """A bass root (octave 2) under a triad (octave 4), one chord per `seconds`."""
    parts = []
    for root, triad in chords:
        parts.append(0.5 * _tone(36 + root, seconds) + sum(0.3 * _tone(60 + pc, seconds) for pc in triad))
    return np.concatenate(parts)


def test_a_progression_is_heard_chord_by_chord_and_silence_as_no_chord():
    # C major: C, Am, F, G, then one second of silence
    progression = [(0, (0, 4, 7)), (9, (9, 0, 4)), (5, (5, 9, 0)), (7, (7, 11, 2))]
    audio = np.concatenate([_progression(progression), np.zeros(SR, np.float32)])
    frames = audio.size // HOP
    heard = recognize_chords(audio, SR, HOP, frames)
    assert heard.shape == (frames,) and heard.dtype == np.int64
    per_second = SR // HOP
    expected = [chord_class(root, triad) for root, triad in progression]
    for i, cls in enumerate(expected):  # away from the changes, where the analysis window straddles two
        middle = heard[i * per_second + 8: (i + 1) * per_second - 8]
        assert (middle == cls).mean() >= 0.9, (i, middle)
    assert (heard[4 * per_second + 10:] == NO_CHORD).all()
    assert (recognize_chords(np.zeros(SR, np.float32), SR, HOP, 25) == NO_CHORD).all()
    # every heard chord is a triad of one key
    assert set(heard[heard != NO_CHORD]) <= set(diatonic_triads(0, False))


def test_render_stem_gives_the_chords_to_the_chord_stream(tmp_path):
    expert = load_expert(make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64))
    plan = window_plan_for(expert, 2.0)
    frames = plan.total_frames
    chords = np.full(frames, 12, dtype=np.int64)
    chords[frames // 2:] = -1  # the expert names these
    audio = 0.1 * np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32)
    result = render_stem(expert, audio, SR, 2.0, candidates=2, seed=0, chords=chords, plan=plan)
    assert (result.codes[:, 0, : frames // 2] == 12).all()
    assert not (result.codes[:, 0, frames // 2:] == 12).all() and (result.codes[:, 0] < CHORD_CLASSES).all()
    heard = render_stem(expert, audio, SR, 2.0, seed=0, chords="heard", plan=plan)
    assert expert.sample_rate == SR
    expected = recognize_chords(audio, SR, expert.codec.config.hop_length, frames)
    assert np.array_equal(heard.codes[0, 0].numpy(), expected) and len(set(expected)) > 1
    assert heard.timings.chords_s > 0
    with pytest.raises(ValueError, match=f"chords has shape \\(3,\\), expected \\({frames},\\)"):
        render_stem(expert, audio, SR, 2.0, chords=np.zeros(3, np.int64), plan=plan)
    with pytest.raises(ValueError, match="chord classes are 0..48"):
        render_stem(expert, audio, SR, 2.0, chords=np.full(frames, 60), plan=plan)
    with pytest.raises(ValueError, match="needs a context"):
        render_stem(expert, None, SR, 2.0, chords="heard", plan=plan)
    plain = load_expert(make_tiny_expert(tmp_path / "bass.safetensors", "bass"))
    with pytest.raises(ValueError, match="'bass' expert has no chord stream"):
        render_stem(plain, audio, SR, 2.0, chords=chords)


def test_the_arranger_hears_chords_in_pitched_material_only(tmp_path):
    keys = make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64)
    experts = {"drums": make_tiny_expert(tmp_path / "drums.safetensors", "drums"),
               "bass": make_tiny_expert(tmp_path / "bass.safetensors", "bass"), "keys": keys}
    arranger = Arranger.from_registry(experts=experts, device_map="cpu", dtype="fp32")
    # over the drums alone (the registry marks them unpitched) the keys name their own chords
    song = arranger.arrange(["drums", "keys"], context=None, bpm=120, duration=1.0, seed=0)
    record = song.manifest.layer("keys")
    assert (record.chords, record.chords_requested) == ("own", None)
    assert song.manifest.layer("drums").chords is None  # no chord stream
    # over a pitched layer, or over the song's context audio, they are given the chords heard there
    song = arranger.arrange(["drums", "bass", "keys"], context=None, bpm=120, duration=1.0, seed=0)
    assert song.manifest.layer("keys").chords == "heard"
    context = _progression([(0, (0, 4, 7)), (7, (7, 11, 2))], 0.5)
    song = arranger.arrange(["keys"], context=context, context_sample_rate=SR, duration=1.0, seed=0, out=tmp_path / "s")
    assert song.manifest.layer("keys").chords == "heard"
    from stage_stack.song import describe
    assert "heard outside its expert: the chords of its mix" in describe(song.manifest)
    # the layer's own choice wins, is recorded, and a redo keeps it
    song = arranger.arrange([Layer("keys", chords="own")], context=context, context_sample_rate=SR, duration=1.0,
                            seed=0, out=tmp_path / "own")
    assert (song.manifest.layer("keys").chords, song.manifest.layer("keys").chords_requested) == ("own", "own")
    arranger.redo(song, "keys", seed=5)
    assert song.manifest.layer("keys").chords_requested == "own" and song.manifest.layer("keys").take == 2
    # refusals name the layer and the fix
    with pytest.raises(InputError, match="layer 'bass': chords='heard' is for an expert with a chord stream.*"
                                         "leave chords unset"):
        arranger.arrange([Layer("bass", chords="heard")], context=context, context_sample_rate=SR, duration=1.0)
    with pytest.raises(InputError, match="layer 'keys': chords='heard' needs a mix.*the click alone"):
        arranger.arrange([Layer("keys", chords="heard")], context=None, bpm=120, duration=1.0)
    with pytest.raises(InputError, match="chords must be one of heard, own"):
        Layer("keys", chords="mine")


def test_the_evaluation_scores_the_chords_the_arranger_gives_and_says_which(tmp_path):
    from stage_stack.evaluation import EvalSettings, EvaluationError, evaluate

    keys = make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64)
    quick = dict(n_tempos=1, duration=7.0)
    report = evaluate([keys], settings=EvalSettings(**quick))
    heard = report.task("keys")
    assert heard.chords == "heard" and "| keys | drums+bass+lead (chords heard) | 1 |" in report.table()
    own = evaluate([keys], settings=EvalSettings(chords="own", **quick)).task("keys")
    assert own.chords == "own" and own.summary()["chords"] == "own"
    assert own.songs[0].generated != heard.songs[0].generated  # same seed, other chords
    with pytest.raises(EvaluationError, match="chords must be one of heard, own"):
        EvalSettings(chords="mine")


def test_the_cli_passes_chords_and_beats_per_layer(tmp_path):
    from click.testing import CliRunner

    from stage_stack.cli import arrange as _  # noqa: F401  (registers the commands)
    from stage_stack.cli import cli

    keys = make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64)
    drums = make_tiny_expert(tmp_path / "drums.safetensors", "drums")
    context = tmp_path / "mix.wav"
    soundfile.write(context, _progression([(0, (0, 4, 7)), (7, (7, 11, 2))], 0.5), SR)
    experts = [f"--expert=keys={keys}", f"--expert=drums={drums}"]
    out = tmp_path / "song"
    result = CliRunner().invoke(cli, ["arrange", "--add", "drums,keys", "-c", str(context), "-o", str(out), "-q",
                                      "--chords", "keys=own", "--beats", "drums=own", *experts])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads((out / "manifest.json").read_text())["layers"]}
    assert (layers["keys"]["chords"], layers["keys"]["chords_requested"]) == ("own", "own")
    assert (layers["drums"]["beats"], layers["drums"]["beats_requested"]) == ("own", "own")
    result = CliRunner().invoke(cli, ["arrange", "--add", "drums", "-c", str(context), "-o", str(tmp_path / "b"),
                                      "-q", "--chords", "keys=heard", *experts])
    assert result.exit_code != 0 and "--chords names layer(s) keys that are not arranged" in result.output


def test_reproduce_replays_a_chord_expert_made_before_layer_chords_with_its_own_chords(tmp_path):
    keys = make_tiny_expert(tmp_path / "keys.safetensors", "keys", lm_config=LM, codec_config=CODEC64)
    arranger = Arranger({"keys": keys}, device_map="cpu", dtype="fp32")
    context = _progression([(0, (0, 4, 7)), (7, (7, 11, 2))], 0.5)
    made = arranger.arrange([Layer("keys", chords="own")], context=context, context_sample_rate=SR, duration=1.0,
                            seed=0, out=tmp_path / "old")
    manifest = tmp_path / "old" / "manifest.json"
    data = json.loads(manifest.read_text())
    for key in ("chords", "chords_requested", "beats", "beats_requested", "heard_bpm"):
        data["layers"][0].pop(key)
    manifest.write_text(json.dumps(data))
    again = arranger.reproduce(manifest, out=tmp_path / "again")
    assert again.manifest.layer("keys").chords == "own"  # today's default over a context would be "heard"
    assert np.array_equal(again.stems["keys"], made.stems["keys"])
