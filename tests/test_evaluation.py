"""The quality metrics, validated on ground truth, and the evaluation protocol end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

# The `eval` extra; skipped where it is not installed.
pytest.importorskip("librosa")
pytest.importorskip("mir_eval")

from stage_stack.cli import cli  # noqa: E402
from stage_stack.cli import evaluate as _evaluate_command  # noqa: E402,F401  (registers `eval`)
from stage_stack.evaluation import (EVAL_SEED_BASE, DetectedNote, EvalSettings, EvaluationError,  # noqa: E402
                                    beat_f1, chord_tone_count, codec_round_trip, detect_notes, evaluate,
                                    held_out_songs, held_out_tempos, paired_comparison, stem_beat_f1,
                                    stem_chord_tones)
from stage_stack.expert import load_expert  # noqa: E402
from stage_stack.testing import make_tiny_expert  # noqa: E402
from stage_stack.training.data import ChordSpan  # noqa: E402
from stage_stack.training.synth import NoteRenderer, Song, generate_song, random_timbre, song_seed  # noqa: E402

SR = 16000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def songs() -> list[Song]:
    """The protocol's 20 held-out songs (10 s, 16 kHz, as the demo experts hear them)."""
    return held_out_songs(20, 10.0, SR)


# -- held-out data ----------------------------------------------------------------------------

def test_held_out_tempos_cover_the_band_and_are_never_whole_numbers():
    tempos = held_out_tempos(20)
    assert len(tempos) == 20 and tempos == sorted(set(tempos))
    assert tempos[0] == 82.5 and tempos[-1] == 158.5
    assert all(80 < t < 160 and t != int(t) for t in tempos)
    assert all(t != int(t) for t in held_out_tempos(7) + held_out_tempos(33))
    with pytest.raises(ValueError, match=">= 1"):
        held_out_tempos(0)


def test_held_out_seeds_are_disjoint_from_the_demo_training_songs():
    seeds = set()
    for config in sorted((REPO / "configs").glob("demo-*.yaml")):
        data = yaml.safe_load(config.read_text())["data"]
        for key in ("synth", "valid_synth"):
            if key in data:
                seeds |= {song_seed(data[key]["seed"], i) for i in range(data[key]["n_songs"])}
    assert seeds, "the demo configs declare their synthetic songs"
    # Also far beyond the demo's 48 + 6 songs: any dataset of up to 5000 songs with seed 0 or 1.
    seeds |= {song_seed(s, i) for s in (0, 1) for i in range(5000)}
    assert not seeds & set(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 1000))


def test_held_out_songs_are_deterministic_and_use_the_tempos(songs):
    assert [s.metadata.bpm for s in songs] == held_out_tempos(20)
    assert [s.metadata.seed for s in songs] == list(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 20))
    again = generate_song(EVAL_SEED_BASE + 1, 10.0, SR, bpm=86.5)
    np.testing.assert_array_equal(again.stems["bass"], songs[1].stems["bass"])


# -- beat F1 ----------------------------------------------------------------------------------

def test_beat_f1_scores_matches_within_70_ms_after_the_trim():
    beats = np.arange(0.0, 10.0, 0.5)
    assert beat_f1(beats, beats) == 1.0
    assert beat_f1(beats, beats + 0.05) == 1.0  # inside the +-70 ms window
    assert beat_f1(beats, beats + 0.1) == 0.0
    assert beat_f1(beats, beats[::2]) == pytest.approx(2 / 3)  # half tempo: precision 1, recall 1/2
    # Only beats from 5 s on count: wrong beats before the trim cost nothing.
    assert beat_f1(beats, np.concatenate([beats[:10] + 0.25, beats[10:]])) == 1.0
    assert beat_f1(beats, np.concatenate([beats[:10] + 0.25, beats[10:]]), trim_seconds=0) == 0.5
    assert beat_f1(beats, []) == 0.0
    with pytest.raises(ValueError, match="no reference beat"):
        beat_f1(beats, beats, trim_seconds=20)


@pytest.mark.slow
def test_beat_f1_of_the_real_drums_is_high_and_of_misplaced_drums_low(songs):
    real = [stem_beat_f1(s.stems["drums"], SR, s.metadata.beats) for s in songs]
    # Measured 0.88; the misses are tracker errors (a 4/3 tempo on funk kicks, half tempo > 145 BPM).
    assert np.mean(real) >= 0.84
    assert np.median(real) >= 0.95

    def off_beat(song: Song) -> np.ndarray:  # the same drums, half a beat late
        delay = int(round(30.0 / song.metadata.bpm * SR))
        return np.concatenate([np.zeros(delay, np.float32), song.stems["drums"][:-delay]])

    rng = np.random.default_rng(0)

    def random_hits(song: Song) -> np.ndarray:  # the song's drum hits at random times
        out = np.zeros_like(song.stems["drums"])
        kick = song.stems["drums"][: int(0.1 * SR)]
        for start in rng.integers(0, out.size - kick.size, size=len(song.drum_hits) // 2):
            out[start: start + kick.size] += kick
        return out

    shifted = [stem_beat_f1(off_beat(s), SR, s.metadata.beats) for s in songs[::2]]
    scattered = [stem_beat_f1(random_hits(s), SR, s.metadata.beats) for s in songs[::2]]
    assert np.mean(shifted) <= 0.15  # measured 0.03
    # Chance level: +-70 ms around a beat is 20-35 % of a beat period at these tempos; measured 0.34.
    assert np.mean(scattered) <= 0.45


# -- chord tones ------------------------------------------------------------------------------

def _chords(*spans: tuple[float, float, list[int]]) -> list[ChordSpan]:
    return [ChordSpan(name=f"c{i}", root=pcs[0], pitch_classes=pcs, start=start, end=end, bar=i)
            for i, (start, end, pcs) in enumerate(spans)]


def test_chord_tone_count_uses_the_chord_just_after_each_onset():
    chords = _chords((0.0, 2.0, [0, 4, 7]), (2.0, 4.0, [9, 0, 4]))
    notes = [DetectedNote(0.1, (0,)), DetectedNote(0.5, (2,)),  # C in C, D not in C
             DetectedNote(1.97, (9,)),  # A 30 ms before the change to Am: judged against Am
             DetectedNote(2.5, (9, 0, 4)), DetectedNote(3.0, (7, 11)),  # Am chord; G and B not in Am
             DetectedNote(4.5, (5,))]  # after the last chord: not counted
    count = chord_tone_count(notes, chords)
    assert (count.notes, count.chord_tones) == (8, 5)
    assert count.share == pytest.approx(5 / 8)
    assert chord_tone_count([DetectedNote(1.97, (9,))], chords, lookahead=0).chord_tones == 0
    assert chord_tone_count([], chords).share is None


def test_detect_notes_finds_onsets_and_pitch_classes_of_tones():
    renderer = NoteRenderer(random_timbre(np.random.default_rng(3), "bass"), SR)
    pitches = [33, 36, 40, 43, 38, 45]  # A1 C2 E2 G2 D2 A2
    audio = np.zeros(int(3.5 * SR), np.float32)
    for i, pitch in enumerate(pitches):
        note = renderer.render(pitch, int(0.4 * SR))
        start = int((0.25 + 0.5 * i) * SR)
        audio[start: start + note.size] += note
    notes = detect_notes(audio, SR, polyphonic=False)
    assert [n.pitch_classes for n in notes] == [(p % 12,) for p in pitches]
    np.testing.assert_allclose([n.onset for n in notes], 0.25 + 0.5 * np.arange(6), atol=0.035)

    chord = sum(NoteRenderer(random_timbre(np.random.default_rng(4), "keys"), SR).render(p, int(0.6 * SR))
                for p in (57, 60, 64))  # A minor: A C E
    chord = np.concatenate([np.zeros(int(0.2 * SR), np.float32), chord, np.zeros(2 * SR, np.float32)])
    (found,) = detect_notes(chord, SR, polyphonic=True)
    assert set(found.pitch_classes) == {9, 0, 4}
    assert detect_notes(np.zeros(SR, np.float32), SR, polyphonic=True) == []


def _random_pitch_stem(song: Song, stem: str, rng: np.random.Generator) -> np.ndarray:
    """The stem's notes (same rhythm and octaves) with uniformly random pitch classes."""
    renderer = NoteRenderer(random_timbre(rng, stem), SR)
    out = np.zeros_like(song.stems[stem])
    for note in song.notes_of(stem):
        pitch = note.pitch - note.pitch % 12 + int(rng.integers(12))
        audio = renderer.render(pitch, max(int((note.end - note.start) * SR), 1))
        start = int(note.start * SR)
        end = min(start + audio.size, out.size)
        out[start:end] += note.velocity * audio[: end - start]
    return 0.5 * out / np.abs(out).max()


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["bass", "keys"])
def test_chord_tone_share_of_the_real_stem_is_near_1_and_of_random_pitches_low(songs, stem):
    picked = songs[::2]
    real = [stem_chord_tones(s.stems[stem], SR, s.metadata.chords, stem) for s in picked]
    rng = np.random.default_rng(0)
    scrambled = [stem_chord_tones(_random_pitch_stem(s, stem, rng), SR, s.metadata.chords, stem) for s in picked]
    assert all(c.notes >= 8 for c in real)  # notes are found in every song
    assert np.mean([c.share for c in real]) >= 0.95  # measured 0.98 on all 20 songs
    # A random pitch class is a triad tone 3 times in 12 (4 for sevenths); measured 0.23.
    assert np.mean([c.share for c in scrambled]) <= 0.35


def test_stem_chord_tones_refuses_drums():
    with pytest.raises(ValueError, match="no pitched notes"):
        stem_chord_tones(np.zeros(SR, np.float32), SR, [], "drums")


# -- the ablation statistic -------------------------------------------------------------------

def test_paired_comparison_reports_the_mean_difference_and_its_interval():
    rng = np.random.default_rng(1)
    without = rng.uniform(0.2, 0.5, size=20)
    better = paired_comparison(without + 0.3 + rng.normal(0, 0.05, 20), without)
    assert better.difference == pytest.approx(0.3, abs=0.03)
    assert better.ci95[0] < better.difference < better.ci95[1] and better.helps
    assert (better.wins, better.losses) == (20, 0)
    same = paired_comparison(without + rng.normal(0, 0.1, 20), without)
    assert same.ci95[0] < 0 < same.ci95[1] and not same.helps
    with pytest.raises(ValueError, match="equally long"):
        paired_comparison([0.1, 0.2], [0.1])


# -- the protocol -----------------------------------------------------------------------------

QUICK = EvalSettings(n_tempos=2, duration=2.5, trim_seconds=1.0)


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {name: make_tiny_expert(root / f"{name}.safetensors", instrument=name, seed=i)
            for i, name in enumerate(["drums", "bass", "keys", "guitar"])} | {
        "ablation": make_tiny_expert(root / "ablation.safetensors", instrument="drums", seed=9)}


@pytest.mark.slow
def test_evaluate_runs_every_task_and_reports_the_real_stems(tiny_experts, tmp_path):
    calls = []
    report = evaluate([tiny_experts["drums"], tiny_experts["bass"], tiny_experts["keys"]],
                      ablation_drums=tiny_experts["ablation"], settings=QUICK,
                      progress=lambda *a: calls.append(a), audio_dir=tmp_path / "audio")
    names = [t.name for t in report.tasks]
    assert names == ["drums from a click", "drums (no click pairs) from a click", "drums in context", "bass", "keys"]
    contexts = {t.name: t.context for t in report.tasks}
    assert contexts["drums from a click"] == "click" and contexts["bass"] == "drums+keys+lead"
    assert calls[:2] == [("drums from a click", 1, 2), ("drums from a click", 2, 2)] and len(calls) == 10

    # The references are the metrics of the held-out songs' own stems, as is and through the codec.
    songs = held_out_songs(2, 2.5, SR)
    bass_expert = load_expert(tiny_experts["bass"])
    for score, song in zip(report.task("bass").songs, songs):
        assert (score.seed, score.bpm) == (song.metadata.seed, song.metadata.bpm)
        real, coded = song.stems["bass"], codec_round_trip(bass_expert, song.stems["bass"])
        assert coded.shape == real.shape and not np.allclose(coded, real, atol=0.05)
        for audio, reference in ((real, score.real), (coded, score.real_coded)):
            assert reference.f1 == stem_beat_f1(audio, SR, song.metadata.beats, 1.0)
            tones = stem_chord_tones(audio, SR, song.metadata.chords, "bass")
            assert (reference.chord_tone_share, reference.notes) == (tones.share or 0.0, tones.notes)
        assert 0.0 <= score.generated.f1 <= 1.0 and 0.0 <= score.generated.chord_tone_share <= 1.0
    assert report.task("drums from a click").songs[0].generated.chord_tone_share is None

    assert report.ablation is not None and report.ablation.difference == pytest.approx(
        report.task("drums from a click").mean("f1") - report.task("drums (no click pairs) from a click").mean("f1"))
    assert report.task("bass").mean("chord_tone_share", "real") == pytest.approx(
        np.mean([s.real.chord_tone_share for s in report.task("bass").songs]))
    assert [t.met is None for t in report.targets] == [False] * 6
    assert len(list((tmp_path / "audio").rglob("*.wav"))) == 10

    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["experts"]["drums (no click pairs)"]["sha256"] and data["tempos"] == [100.5, 140.5]
    assert len(data["tasks"][3]["per_song"]) == 2 and set(data["tasks"][3]["per_song"][0]["real_coded"]) == {
        "f1", "chord_tone_share", "notes", "tempo", "tempo_match", "in_key_share"}
    assert data["summary"][3]["mean"]["real"]["f1"] == report.task("bass").mean("f1", "real")
    table = report.table()
    assert "| bass | drums+keys+lead | 2 | rhythmic F1 |" in table and "click pairs help" in table


@pytest.mark.slow
def test_an_expert_that_plays_the_real_stem_scores_like_the_real_stem(tiny_experts, monkeypatch):
    """Wiring: each stem generated through the Arranger is scored against its own song's beats
    and chords, and the expert hears what the task says (the click alone, or the other stems)."""
    import stage_stack.arranger
    from stage_stack.evaluation import click_context, stems_context
    from stage_stack.pipeline import StemResult, window_plan_for

    songs = {song.metadata.seed: song for song in held_out_songs(2, 10.0, SR)}
    heard_by = {}

    def oracle(expert, heard, sample_rate, duration, *, seed, plan, **kwargs):
        assert sample_rate == SR and duration == 10.0
        song = songs[seed]
        heard_by[(expert.instrument, seed, "click" if np.allclose(heard, click_context(song), atol=0.05)
                  else "stems")] = heard
        plan = plan or window_plan_for(expert, duration)
        codes = torch.zeros(1, expert.codec.config.n_q, plan.total_frames, dtype=torch.long)
        return StemResult(song.stems[expert.instrument][None].copy(), plan, codes)

    monkeypatch.setattr(stage_stack.arranger, "render_stem", oracle)
    report = evaluate([tiny_experts["drums"], tiny_experts["bass"], tiny_experts["keys"]],
                      settings=EvalSettings(n_tempos=2, duration=10.0))
    for task in report.tasks:
        assert [s.generated for s in task.songs] == [s.real for s in task.songs], task.name
    for seed, song in songs.items():  # from a click the drums hear the click; in context, the other stems
        assert ("drums", seed, "click") in heard_by and ("bass", seed, "stems") in heard_by
        others = stems_context(song, "bass")[0]
        assert np.corrcoef(heard_by[("bass", seed, "stems")], others)[0, 1] > 0.99
    drums_f1 = [stem_beat_f1(song.stems["drums"], SR, song.metadata.beats) for song in songs.values()]
    assert [s.generated.f1 for s in report.task("drums from a click").songs] == drums_f1
    assert report.task("bass").mean("chord_tone_share") >= 0.95
    # The real drums are played at the song's tempo: the tempo column reads 1 for them.
    assert report.task("drums from a click").mean("tempo_match", "real") == 1.0
    assert [t.description for t in report.targets][:5] == [
        "drums from a click, beat F1", "drums from a click, share of songs played within 4% of the click's tempo",
        "drums in context, rhythmic F1", "bass in context, chord-tone share", "keys in context, chord-tone share"]
    assert [t.met for t in report.targets] == [np.mean(drums_f1) >= 0.8, True, np.mean(
        [s.real.f1 for s in report.task("drums in context").songs]) >= 0.7, True, True, None]


def test_evaluate_rejects_experts_it_cannot_score(tiny_experts, tmp_path):
    with pytest.raises(EvaluationError, match="'guitar' expert has no held-out stem"):
        evaluate([tiny_experts["guitar"]], settings=QUICK)
    with pytest.raises(EvaluationError, match="second 'drums' expert"):
        evaluate([tiny_experts["drums"], tiny_experts["ablation"]], settings=QUICK)
    with pytest.raises(EvaluationError, match="give the drums expert"):
        evaluate([tiny_experts["bass"]], ablation_drums=tiny_experts["ablation"], settings=QUICK)
    with pytest.raises(EvaluationError, match="must be a drums expert, this one is 'bass'"):
        evaluate([tiny_experts["drums"]], ablation_drums=tiny_experts["bass"], settings=QUICK)
    with pytest.raises(EvaluationError, match="expert file not found: .*nope.safetensors"):
        evaluate([tmp_path / "nope.safetensors"], settings=QUICK)
    with pytest.raises(EvaluationError, match="no expert"):
        evaluate([], settings=QUICK)


def test_settings_need_beats_after_the_trim():
    with pytest.raises(EvaluationError, match=r"duration \(6.0 s\) must be at least 1.5 s longer"):
        EvalSettings(duration=6.0)
    with pytest.raises(EvaluationError, match="tempos must be >= 1"):
        EvalSettings(n_tempos=0)


def test_sampling_settings_reach_the_generation_params():
    from stage_stack.evaluation import _Protocol
    from stage_stack.generation import SamplingParams

    from stage_stack.testing import TINY_CODEC, TINY_LM, expert_metadata

    plain = expert_metadata("keys", TINY_LM, TINY_CODEC)
    own = expert_metadata("keys", TINY_LM, TINY_CODEC, sampling={"temperature": 0.5})
    # by default, what the Arranger uses: the expert's own sampling, else the reference's
    assert _Protocol(EvalSettings(), None, None).params_for(plain) == SamplingParams()
    assert _Protocol(EvalSettings(), None, None).params_for(own) == SamplingParams(temperature=0.5)
    params = _Protocol(EvalSettings(cfg_coef=2.0, temperature=0.7, top_k=10), None, None).params_for(own)
    assert (params.cfg_coef, params.temperature, params.top_k) == (2.0, 0.7, 10)
    with pytest.raises(EvaluationError, match="temperature must be > 0, got 0"):
        EvalSettings(temperature=0)
    with pytest.raises(EvaluationError, match="top_k must be >= 0"):
        EvalSettings(top_k=-1)
    chords = _Protocol(EvalSettings(chord_temperature=1.0), None, None).params_for(own)
    assert (chords.temperature, chords.chord_temperature) == (0.5, 1.0)
    with pytest.raises(EvaluationError, match="chord_temperature must be >= 0"):
        EvalSettings(chord_temperature=-0.5)


@pytest.mark.slow
def test_eval_command_prints_the_table_and_writes_json(tiny_experts, tmp_path):
    out = tmp_path / "results" / "quality.json"
    result = CliRunner().invoke(cli, ["eval", str(tiny_experts["bass"]), "--tempos", "1", "--duration", "2.5",
                                      "--trim", "1", "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| bass | drums+keys+lead | 1 | rhythmic F1 |" in result.output
    assert "bass in context, chord-tone share" in result.output and "not run" in result.output
    data = json.loads(out.read_text())
    assert data["settings"]["n_tempos"] == 1 and data["summary"][0]["name"] == "bass"
    assert not out.with_name("quality.json.partial").exists()


def test_eval_command_errors_name_the_problem(tiny_experts, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tiny_experts["guitar"]), "--no-progress"])
    assert result.exit_code != 0 and "'guitar' expert has no held-out stem" in result.output
    result = CliRunner().invoke(cli, ["eval", str(tiny_experts["bass"]), "--duration", "5", "--no-progress"])
    assert result.exit_code != 0 and "must be at least 1.5 s longer than the beat trim" in result.output
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "missing.safetensors")])
    assert result.exit_code != 0 and "does not exist" in result.output
    result = CliRunner().invoke(cli, ["eval", str(tiny_experts["bass"]), "--context-stems", "piano", "--no-progress"])
    assert result.exit_code != 0 and "context_stems must name stems of the held-out songs" in result.output


@pytest.mark.slow
def test_eval_command_runs_a_control(tiny_experts):
    result = CliRunner().invoke(cli, ["eval", str(tiny_experts["bass"]), "--tempos", "1", "--duration", "2.5",
                                      "--trim", "1", "--context-stems", "keys", "--top-k", "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| bass | keys | 1 | rhythmic F1 |" in result.output and "(control: keys)" in result.output


# -- control contexts -------------------------------------------------------------------------

def test_control_contexts_are_the_next_song_or_silence_and_name_themselves():
    from stage_stack.evaluation import control_context, stems_context

    two = held_out_songs(2, 2.5, SR)
    own, name = control_context(two, 0, "bass", "song")
    np.testing.assert_array_equal(own, stems_context(two[0], "bass")[0])
    assert name == "drums+keys+lead"
    other, other_name = control_context(two, 0, "bass", "other-song")
    assert other.shape == own.shape and other_name == "another song's drums+keys+lead"
    np.testing.assert_array_equal(other, stems_context(two[1], "bass")[0][: own.size])
    assert not np.allclose(other, own)
    silence, silence_name = control_context(two, 1, "bass", "silence")
    assert silence_name == "silence" and silence.shape == own.shape and not silence.any()
    keys, keys_name = control_context(two, 0, "bass", "song", stems=("keys",))
    np.testing.assert_array_equal(keys, two[0].stems["keys"].astype(np.float32))
    assert keys_name == "keys"

    with pytest.raises(EvaluationError, match="context_source must be one of song, other-song, silence, got 'mix'"):
        EvalSettings(context_source="mix")
    with pytest.raises(EvaluationError, match=r"context_stems must name stems .* got \['piano'\]"):
        EvalSettings(context_stems=("piano",))


@pytest.mark.slow
def test_a_control_run_reports_its_context_and_claims_no_target(tiny_experts):
    from dataclasses import replace

    with pytest.raises(EvaluationError, match="include the 'bass' stem the expert must generate"):
        evaluate([tiny_experts["bass"]], settings=replace(QUICK, context_stems=("bass", "keys")))
    report = evaluate([tiny_experts["bass"]], settings=replace(QUICK, context_source="silence"))
    assert report.task("bass").context == "silence"
    bass_target = next(t for t in report.targets if t.description.startswith("bass in context"))
    assert bass_target.met is None and "(control: silence)" in bass_target.description
    assert bass_target.value == report.task("bass").mean("chord_tone_share")


def _hearing(path: Path, out: Path, hears: list[str]) -> Path:
    """A copy of the expert file at `path` whose metadata says it was trained to hear `hears`."""
    from safetensors.torch import load_file

    from stage_stack.expert import atomic_save_safetensors, read_metadata

    metadata = read_metadata(path).model_copy(update={"hears": hears})
    return atomic_save_safetensors(load_file(str(path)), out, metadata.to_header())


@pytest.mark.slow
def test_an_expert_trained_to_hear_some_stems_is_scored_over_those(tiny_experts, tmp_path):
    bass = _hearing(tiny_experts["bass"], tmp_path / "bass.safetensors", ["keys"])
    report = evaluate([bass], settings=QUICK)
    assert report.task("bass").context == "keys"
    target = next(t for t in report.targets if t.description.startswith("bass in context"))
    assert "control" not in target.description and target.met is not None  # what users get: it claims the target
    guitar = _hearing(tiny_experts["bass"], tmp_path / "bass-guitar.safetensors", ["guitar"])
    with pytest.raises(EvaluationError, match=r"the expert hears guitar \(metadata 'hears'\), which the held-out "
                                              r"songs do not have"):
        evaluate([guitar], settings=QUICK)


@pytest.mark.slow
def test_in_key_share_of_the_real_keys_is_near_1_of_random_pitches_near_7_in_12_and_of_another_key_lower(songs):
    from stage_stack.evaluation import in_key_share

    picked = songs[::2]
    rng = np.random.default_rng(1)
    real, scrambled, transposed = [], [], []
    for s in picked:
        notes = detect_notes(s.stems["keys"], SR, polyphonic=True)
        real.append(in_key_share(notes, s.metadata.key))
        scrambled.append(in_key_share(detect_notes(_random_pitch_stem(s, "keys", rng), SR, polyphonic=True),
                                      s.metadata.key))
        # the same notes heard against the key a tritone away share few scale tones with it
        root, mode = s.metadata.key.split()
        names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
        flats = ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"]
        index = names.index(root) if root in names else flats.index(root)
        transposed.append(in_key_share(notes, f"{names[(index + 6) % 12]} {mode}"))
    assert np.mean(real) >= 0.95
    assert 0.45 <= np.mean(scrambled) <= 0.7  # chance: 7 / 12 = 0.58
    assert np.mean(transposed) <= 0.5
    assert in_key_share([], "C major") is None
