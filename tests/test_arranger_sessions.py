"""Arrangements on disk: save / open, add / pick / redo / remove / mix, atomic writes, resume, reproduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from arranger_helpers import FAST_CODEC, SHORT_WINDOW, SR, band, heard, make_band  # noqa: F401
from stage_stack import Arranger, Layer, Song
from stage_stack import arranger as arranger_module
from stage_stack import arrangement as arrangement_module
from stage_stack.arrangement import audio_digest
from stage_stack.errors import ArrangementError, InputError, IntegrityError
from stage_stack.mixing import render_mix
from stage_stack.testing import make_tiny_expert


def files_in(folder) -> list[str]:
    """The song's files, without its lock file (which stays, see stage_stack.locks)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                  and p.name != ".stage-stack.lock")


def test_arrangement_directory(band, tmp_path):
    out = tmp_path / "song"
    song = Arranger(band).arrange(["drums", Layer("bass", candidates=2)], duration=1.5, out=out)
    assert song.path == out
    assert files_in(out) == ["candidates/bass/take1-0.wav", "candidates/bass/take1-1.wav",
                             "candidates/drums/take1-0.wav", "manifest.json", "mix.wav", "stems/bass.wav",
                             "stems/drums.wav"]
    info = sf.info(str(out / "mix.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "FLOAT")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["stems/bass.wav"] == audio_digest(out / "stems/bass.wav")
    again = Song.open(out)
    assert again.layers == song.layers
    for name in song.layers:
        assert np.array_equal(again.candidates[name], song.candidates[name])
    assert np.array_equal(again.mix, song.mix)
    assert np.array_equal(sf.read(str(out / "stems/bass.wav"), dtype="float32")[0], song.stems["bass"])


def test_save_an_in_memory_song(band, tmp_path):
    song = Arranger(band).arrange(["drums"], duration=1.0)
    assert song.path is None
    song.save(tmp_path / "a")
    assert np.array_equal(Song.open(tmp_path / "a").mix, song.mix)
    other = Arranger(band).arrange(["drums"], duration=1.0)
    with pytest.raises(InputError, match="already holds another arrangement"):
        other.save(tmp_path / "a")


def test_session_operations(band, tmp_path, heard):
    out = tmp_path / "song"
    arranger = Arranger(band)
    song = arranger.arrange([Layer("drums", candidates=2), "bass"], duration=1.0, click="none", out=out)

    # pick: the mix and stems/drums.wav follow; bass heard the other candidate, so it is stale
    song.pick("drums", 1)
    assert np.array_equal(song.stems["drums"], song.candidates["drums"][1])
    assert np.array_equal(sf.read(str(out / "stems/drums.wav"), dtype="float32")[0], song.candidates["drums"][1])
    assert np.array_equal(song.mix, song.render_mix())
    assert Song.open(out).manifest.layer("drums").picked == 1
    assert song.stale == ["bass"]
    with pytest.raises(InputError, match="has 2 candidate\\(s\\), numbered 0 to 1; got 2"):
        song.pick("drums", 2)

    # add: a second keys layer needs a name; the new layer hears the current mix
    arranger.add(song, "keys")
    with pytest.raises(InputError, match="the song already has a layer named .keys.; give the new one its own "
                                         "name.*stage-stack add SONG keys2=keys"):
        arranger.add(song, "keys")
    arranger.add(song, Layer("keys", name="pad"))
    assert song.layers == ["drums", "bass", "keys", "pad"]
    np.testing.assert_array_equal(heard[-1]["context"], song.render_mix(upto=3))

    # redo bass with a new seed: a new take (the old one stays on disk), the layers after it are now stale
    arranger.redo(song, "bass", seed=99)
    bass = song.manifest.layer("bass")
    assert (bass.take, bass.seed) == (2, 99) and song.stale == ["keys", "pad"]
    assert "candidates/bass/take1-0.wav" in files_in(out) and "candidates/bass/take2-0.wav" in files_in(out)

    # redo downstream: the later layers are generated again against the new take
    arranger.redo(song, "bass", seed=7, downstream=True)
    assert [song.manifest.layer(n).take for n in ("bass", "keys", "pad")] == [3, 2, 2]
    assert song.stale == []

    # remove keys: its stem goes (its takes stay until prune), the mix no longer has it, pad is stale
    song.remove("keys")
    assert "stems/keys.wav" not in files_in(out) and "candidates/keys/take2-0.wav" in files_in(out)
    stems = [(song.stems[n], song.manifest.layer(n).gain_db) for n in song.layers]
    assert np.array_equal(song.mix, render_mix(None, stems, SR, SR))
    assert song.stale == ["pad"]

    # remix with new gains
    before = song.mix.copy()
    song.remix({"pad": -12.0})
    assert song.manifest.layer("pad").gain_db == -12.0 and not np.array_equal(before, song.mix)
    with pytest.raises(InputError, match="from -60 to \\+24 dB"):
        song.remix({"pad": 40.0})
    with pytest.raises(ArrangementError, match="no layer 'tuba'"):
        song.remix({"tuba": 0.0})

    reopened = Song.open(out)
    assert reopened.layers == ["drums", "bass", "pad"] and np.array_equal(reopened.mix, song.mix)
    assert [h.action for h in reopened.manifest.history] == ["arrange", "pick", "add", "add", "redo", "redo",
                                                            "remove", "mix"]


def test_output_directory_checks(band, tmp_path, heard):
    arranger = Arranger(band)
    out = tmp_path / "song"
    arranger.arrange(["drums"], duration=1.0, out=out)
    manifest = (out / "manifest.json").read_text()
    heard.clear()
    with pytest.raises(InputError, match="already holds another arrangement \\(drums.*made with different settings"):
        arranger.arrange(["bass"], duration=1.0, out=out)
    assert heard == [] and (out / "manifest.json").read_text() == manifest

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mix.wav").write_bytes(b"my own mix")
    with pytest.raises(InputError, match="holds files an arrangement would overwrite \\(mix.wav\\)"):
        arranger.arrange(["drums"], duration=1.0, out=mine)
    assert (mine / "mix.wav").read_bytes() == b"my own mix" and heard == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        arranger.arrange(["drums"], duration=1.0, out=tmp_path / "file")


def test_interrupted_layer_leaves_the_arrangement_as_before_and_resumes(band, tmp_path, monkeypatch):
    layers = ["drums", "bass", "keys"]
    reference = Arranger(band).arrange(layers, duration=1.0, seed=5)
    out = tmp_path / "song"
    real = arranger_module.render_stem
    calls, interrupt = [], [True]

    def interrupted(expert, *args, **kwargs):
        calls.append(expert.instrument)
        if expert.instrument == "bass" and interrupt.pop() if interrupt else False:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the first bass layer
        return real(expert, *args, **kwargs)

    monkeypatch.setattr(arranger_module, "render_stem", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Arranger(band).arrange(layers, duration=1.0, seed=5, out=out)
    assert Song.open(out).layers == ["drums"]
    assert files_in(out) == ["candidates/drums/take1-0.wav", "manifest.json", "mix.wav", "stems/drums.wav"]

    calls.clear()
    song = Arranger(band).arrange(layers, duration=1.0, seed=5, out=out)  # the same call resumes
    assert calls == ["bass", "keys"]
    for name in layers:
        assert np.array_equal(song.stems[name], reference.stems[name])
    assert np.array_equal(song.mix, reference.mix)


def test_crash_after_the_commit_point_is_finished_on_open(band, tmp_path, monkeypatch):
    out = tmp_path / "song"
    arranger = Arranger(band)
    song = arranger.arrange(["drums"], duration=1.0, out=out)
    real_replace = os.replace

    def crash_on_audio(src, dst):
        if str(src).endswith(".tmp.wav"):
            raise KeyboardInterrupt  # the manifest is committed, the derived files are not renamed yet
        return real_replace(src, dst)

    monkeypatch.setattr(arrangement_module.os, "replace", crash_on_audio)
    with pytest.raises(KeyboardInterrupt):
        arranger.add(song, "bass")
    monkeypatch.setattr(arrangement_module.os, "replace", real_replace)
    assert not (out / "stems/bass.wav").exists()
    reopened = Song.open(out)  # re-renders the derived files the manifest describes
    assert reopened.layers == ["drums", "bass"]
    assert audio_digest(out / "stems/bass.wav") == reopened.manifest.files["stems/bass.wav"]
    assert audio_digest(out / "mix.wav") == reopened.manifest.files["mix.wav"]
    assert np.array_equal(sf.read(str(out / "mix.wav"), dtype="float32")[0], song.mix)


def test_open_cleans_leftovers_but_keeps_user_files(band, tmp_path):
    out = tmp_path / "song"
    Arranger(band).arrange(["drums"], duration=1.0, out=out)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # the pid of a writer that has exited
    ours = f"stems/.bass.wav.stage-stack-{gone}-1234abcd.tmp.wav"
    (out / ours).write_bytes(b"half written")
    (out / "stems" / ".bass.wav.1234abcd.tmp.wav").write_bytes(b"a user's file that looks like a temp file")
    (out / "candidates" / "bass").mkdir()
    (out / "candidates" / "bass" / "take1-0.wav").write_bytes(b"a take of an undone change")
    (out / "notes.txt").write_text("mine")
    (out / "stems" / "vocals-idea.wav").write_bytes(b"mine too")  # a stems/ file not named by the manifest
    Song.open(out)
    remaining = files_in(out)
    assert ours not in remaining
    assert "stems/.bass.wav.1234abcd.tmp.wav" in remaining and "candidates/bass/take1-0.wav" in remaining
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "stems/vocals-idea.wav").read_bytes() == b"mine too"


def test_a_changed_candidate_file_is_reported(band, tmp_path):
    out = tmp_path / "song"
    song = Arranger(band).arrange(["drums"], duration=1.0, out=out)
    sf.write(str(out / "candidates/drums/take1-0.wav"), song.stems["drums"] * 0.5, SR, subtype="FLOAT")
    reopened = Song.open(out)  # it opens (so that `redo` can regenerate the layer) ...
    assert reopened.damaged == {"drums": ["candidates/drums/take1-0.wav"]}
    with pytest.raises(ArrangementError, match="take1-0.wav missing or changed since it was written. Regenerate"):
        reopened.stems  # ... and says what is wrong when the audio is needed
    with pytest.raises(ArrangementError, match="not an arrangement"):
        Song.open(tmp_path)


def test_reproduce_bit_for_bit(band, tmp_path):
    rng = np.random.default_rng(3)
    context = (rng.standard_normal(int(1.5 * 22050)) * 0.1).astype(np.float32)
    out = tmp_path / "song"
    arranger = Arranger(band)
    song = arranger.arrange([Layer("drums", candidates=2), Layer("bass", gain_db=-4.0)], context=context,
                            context_sample_rate=22050, bpm=110, seed=11, out=out)
    song.pick("drums", 1)
    arranger.redo(song, "bass", seed=4)  # consistent again: bass hears drums' candidate 1
    again = Arranger({}).reproduce(out / "manifest.json", out=tmp_path / "again")
    assert again.layers == song.layers
    for name in song.layers:
        assert np.array_equal(again.candidates[name], song.candidates[name])
    assert np.array_equal(again.mix, song.mix)
    for rel in ("mix.wav", "stems/drums.wav", "stems/bass.wav", "context.wav"):
        assert again.manifest.files[rel] == song.manifest.files[rel]


def test_reproduce_checks_the_experts(tmp_path):
    experts = make_band(tmp_path / "experts", instruments=("drums",))
    out = tmp_path / "song"
    Arranger(experts).arrange(["drums"], duration=1.0, out=out)
    # the recorded expert file now holds other weights
    make_tiny_expert(experts["drums"], instrument="drums", seed=9, codec_config=FAST_CODEC, training=SHORT_WINDOW)
    with pytest.raises(IntegrityError, match="sha256"):
        Arranger({}).reproduce(out / "manifest.json", out=tmp_path / "again")


def test_reproduce_warns_about_stale_layers(band, tmp_path):
    out = tmp_path / "song"
    arranger = Arranger(band)
    song = arranger.arrange([Layer("drums", candidates=2), "bass"], duration=1.0, out=out)
    arranger.redo(song, "drums", seed=5)  # bass heard take 1, which the manifest can no longer regenerate
    with pytest.warns(UserWarning, match="bass were generated before earlier layers changed"):
        Arranger(band).reproduce(out / "manifest.json", out=tmp_path / "again")


def test_a_write_that_fails_before_the_commit_point_changes_nothing(band, tmp_path, monkeypatch):
    out = tmp_path / "song"
    arranger = Arranger(band)
    song = arranger.arrange(["drums"], duration=1.0, out=out)
    mix, files = song.mix.copy(), files_in(out)

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arrangement_module.Manifest, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        arranger.add(song, "bass")
    assert song.layers == ["drums"] and "bass" not in song.candidates  # the Song in memory
    assert np.array_equal(song.mix, mix)
    assert files_in(out) == files  # and on disk: no temp files left, nothing new
