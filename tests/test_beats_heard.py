"""The beat tracker (stage_stack.models.beat_tracker, stage_stack.beat_tracking) and a layer
hearing a click on the beats heard in its mix (`Layer.beats`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stage_stack import Arranger, Layer
from stage_stack.audio import click_track
from stage_stack.beat_tracking import DEFAULT_BEAT_TRACKER, BeatGrid, grid_from_activation, load_beat_tracker, \
    track_beats
from stage_stack.errors import InputError
from stage_stack.models.beat_tracker import BeatTracker, BeatTrackerConfig, load_beat_tracker_file, save_beat_tracker
from stage_stack.testing import make_tiny_expert
from stage_stack.training.beat_train import BeatTrainConfig, beat_targets, train_beat_tracker

SR = 16000


def _beats_activation(bpm: float, first: float, seconds: float, rate: float = 100.0) -> np.ndarray:
    act = np.full(int(seconds * rate), 0.05)
    for t in np.arange(first, seconds, 60.0 / bpm):
        act[int(round(t * rate))] = 1.0
    return act


@pytest.mark.parametrize("bpm,first", [(82.5, 0.3), (120.0, 0.0), (158.5, 0.21)])
def test_a_grid_is_fitted_to_the_activation_tempo_and_phase(bpm, first):
    grid = grid_from_activation(_beats_activation(bpm, first, 10.0), 100.0, 10.0)
    assert abs(grid.bpm - bpm) < 0.01 * bpm
    assert abs(grid.first_beat - first) <= 0.011
    assert np.abs(grid.beats[-1] - np.arange(first, 10.0, 60 / bpm)[-1]) < 0.03  # no drift over 10 s
    with pytest.raises(ValueError, match="too short to hear a tempo"):
        grid_from_activation(np.ones(50), 100.0, 0.5)


def test_the_grid_clicks_as_training_does():
    grid = BeatGrid(period=0.5, first_beat=0.25, duration=4.0)
    assert grid.bpm == 120.0 and np.allclose(grid.beats, np.arange(0.25, 4.0, 0.5))
    beats = grid.beats
    assert np.array_equal(grid.click(SR, 4 * SR), click_track(beats, beats[::4], SR, 4 * SR).astype(np.float32))


def test_targets_mark_each_beat_and_its_neighbours():
    t = beat_targets([0.0, 0.5, 0.995], 110, 100.0)
    assert t[0] == 1.0 and t[1] == 0.5 and t[49] == 0.5 and t[50] == 1.0 and t[51] == 0.5 and t[100] == 1.0
    assert t.sum() == 5.5  # frame 0 and its right neighbour; 49-51; 0.995 s -> frames 99-101


@pytest.fixture(scope="module")
def tiny_tracker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("beats") / "tracker.safetensors"
    train_beat_tracker(BeatTrainConfig(output=path, songs=2, seconds=6.0, steps=2, batch_size=2, window_frames=300),
                       BeatTrackerConfig(channels=8, dilations=(1, 2, 4)), progress=False)
    return path


def test_a_trained_tracker_round_trips_and_tracks(tiny_tracker, tmp_path):
    tracker, training = load_beat_tracker_file(tiny_tracker)
    assert tracker.config == BeatTrackerConfig(channels=8, dilations=(1, 2, 4))
    assert training["config"]["steps"] == 2 and "final_loss" in training
    again = tmp_path / "again.safetensors"
    save_beat_tracker(again, tracker)
    reloaded = load_beat_tracker(again)
    audio = 0.1 * np.random.default_rng(0).standard_normal(5 * SR).astype(np.float32)
    assert np.array_equal(reloaded.activation(audio), tracker.activation(audio))
    assert tracker.activation(audio).shape == (5 * SR // 160 + 1,)
    grid = track_beats(tracker, np.repeat(audio, 2), 2 * SR)  # resampled to the tracker's rate
    assert 70 <= grid.bpm <= 180 and grid.duration == 5.0
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a stage-stack beat tracker.*'something else'"):
        load_beat_tracker(bad)
    with pytest.raises(FileNotFoundError, match="beat tracker file not found"):
        load_beat_tracker(tmp_path / "none.safetensors")


def test_the_bundled_tracker_is_shipped_and_hears_a_song():
    from stage_stack.evaluation import beat_f1, held_out_songs, stems_context

    assert DEFAULT_BEAT_TRACKER.is_file()
    tracker = load_beat_tracker()
    song = held_out_songs(20, 10.0, SR)[7]
    grid = track_beats(tracker, stems_context(song, "drums")[0], SR)
    assert abs(grid.bpm - song.metadata.bpm) < 0.04 * song.metadata.bpm
    assert beat_f1(song.metadata.beats, grid.beats) > 0.8


def test_the_drums_hear_the_mixs_beats_over_pitched_material_only(tiny_tracker, tmp_path):
    experts = {"drums": make_tiny_expert(tmp_path / "drums.safetensors", "drums"),
               "bass": make_tiny_expert(tmp_path / "bass.safetensors", "bass")}
    arranger = Arranger.from_registry(experts=experts, device_map="cpu", dtype="fp32", beat_tracker=tiny_tracker)
    context = 0.1 * np.random.default_rng(1).standard_normal(5 * SR).astype(np.float32)
    song = arranger.arrange(["drums", "bass"], context=context, context_sample_rate=SR, duration=5.0, seed=0)
    drums, bass = song.manifest.layer("drums"), song.manifest.layer("bass")
    assert (drums.beats, drums.beats_requested, drums.click) == ("heard", None, "click")
    assert 70 <= drums.heard_bpm <= 180 and drums.timings.beats_s > 0
    assert (bass.beats, bass.heard_bpm, bass.click) == ("own", None, "none")  # a pitched instrument
    from stage_stack.song import describe
    assert f"heard outside its expert: the beats of its mix as a click ({drums.heard_bpm:g} BPM)" in \
        describe(song.manifest)
    # without a context the drums come first and hear the song's click, as before
    alone = arranger.arrange(["drums"], context=None, bpm=100, duration=5.0, seed=0)
    assert alone.manifest.layer("drums").beats == "own" and alone.manifest.layer("drums").heard_bpm is None
    # the layer's choice wins, and a redo keeps it
    own = arranger.arrange([Layer("drums", beats="own")], context=context, context_sample_rate=SR, duration=5.0,
                           seed=0, out=tmp_path / "own")
    assert (own.manifest.layer("drums").beats, own.manifest.layer("drums").click) == ("own", "none")
    arranger.redo(own, "drums", seed=3)
    assert own.manifest.layer("drums").beats_requested == "own" and own.manifest.layer("drums").take == 2
    with pytest.raises(InputError, match="layer 'drums': beats='heard' replaces the mix.*click mode 'none'"):
        arranger.arrange([Layer("drums", beats="heard", click="mix+click")], context=context,
                         context_sample_rate=SR, bpm=120, duration=5.0)
    with pytest.raises(InputError, match="needs at least 4 s to hear a tempo"):
        arranger.arrange([Layer("drums", beats="heard")], context=context[:SR], context_sample_rate=SR,
                         duration=1.0)
    with pytest.raises(InputError, match="beats must be one of heard, own"):
        Layer("drums", beats="tracked")


def test_train_beats_command_writes_a_tracker_and_names_bad_fields(tmp_path):
    from click.testing import CliRunner

    from stage_stack.cli import cli
    from stage_stack.cli import train as _  # noqa: F401  (registers the commands)

    config = tmp_path / "beats.yaml"
    config.write_text(f"output: {tmp_path / 'out' / 'tracker.safetensors'}\nsongs: 1\nseconds: 6\nsteps: 1\n"
                      "batch_size: 1\nwindow_frames: 200\n")
    result = CliRunner().invoke(cli, ["train-beats", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert load_beat_tracker(tmp_path / "out" / "tracker.safetensors").config == BeatTrackerConfig()
    config.write_text(f"output: {tmp_path / 'x.safetensors'}\nstep: 3\n")
    result = CliRunner().invoke(cli, ["train-beats", str(config)])
    assert result.exit_code == 1 and "beats.yaml: invalid BeatTrainConfig" in result.output
    assert "field 'step': unknown field" in result.output
    config.write_text(f"output: {tmp_path / 'x.safetensors'}\ntempo_range: [160, 80]\n")
    result = CliRunner().invoke(cli, ["train-beats", str(config)])
    assert result.exit_code == 1 and "tempo_range must be (low, high) with 0 < low <= high" in result.output


def test_reproduce_replays_where_the_beats_and_chords_came_from(tiny_tracker, tmp_path):
    import json

    experts = {"drums": make_tiny_expert(tmp_path / "drums.safetensors", "drums")}
    arranger = Arranger.from_registry(experts=experts, device_map="cpu", dtype="fp32", beat_tracker=tiny_tracker)
    context = 0.1 * np.random.default_rng(2).standard_normal(5 * SR).astype(np.float32)
    heard = arranger.arrange(["drums"], context=context, context_sample_rate=SR, duration=5.0, seed=0,
                             out=tmp_path / "heard")
    again = arranger.reproduce(tmp_path / "heard" / "manifest.json", out=tmp_path / "heard-again")
    assert again.manifest.layer("drums").beats == "heard"
    assert np.array_equal(again.stems["drums"], heard.stems["drums"])
    # a manifest written before Layer.beats existed: its drums heard the mix, and are replayed so
    mix = arranger.arrange([Layer("drums", beats="own")], context=context, context_sample_rate=SR, duration=5.0,
                           seed=0, out=tmp_path / "old")
    manifest = tmp_path / "old" / "manifest.json"
    data = json.loads(manifest.read_text())
    for layer in data["layers"]:
        for key in ("beats", "beats_requested", "heard_bpm", "chords", "chords_requested"):
            layer.pop(key)
    manifest.write_text(json.dumps(data))
    replayed = arranger.reproduce(manifest, out=tmp_path / "old-again")
    assert replayed.manifest.layer("drums").beats == "own"
    assert replayed.manifest.layer("drums").click == "none" and heard.manifest.layer("drums").click == "click"
    assert np.array_equal(replayed.stems["drums"], mix.stems["drums"])
