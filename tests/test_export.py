"""DAW export: sample-aligned stems/mix/click, the ACID chunk and the MIDI file parsed back."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from arranger_helpers import SR, band  # noqa: F401
from stage_stack import Arranger, Layer
from stage_stack.cli import cli
from stage_stack.cli import export as _export_command  # noqa: F401  (registers the command)
from stage_stack.daw import (BEAT_NOTE, DOWNBEAT_NOTE, PPQ, AcidInfo, click_midi, read_acid, read_midi,
                             riff_chunks, with_acid_chunk)
from stage_stack.errors import InputError
from stage_stack.export import ExportOptions, export_files, export_song


@pytest.fixture(scope="module")
def song_dir(band, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "song"
    song = Arranger(band).arrange(["drums", Layer("bass", candidates=2, gain_db=-6.0)], bpm=100, duration=2.0, out=out)
    song.pick("bass", 1)
    return out


def test_acid_chunk_round_trip():
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(100, np.float32), 8000, format="WAV", subtype="PCM_16")
    wav = with_acid_chunk(buffer.getvalue(), AcidInfo(tempo=123.5, beats=17))
    ids = [cid for cid, _ in riff_chunks(wav)]
    assert ids.index(b"acid") < ids.index(b"data")
    payload = dict(riff_chunks(wav))[b"acid"]
    assert len(payload) == 24
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")  # still a valid WAV for libsndfile
    assert (rate, data.shape) == (8000, (100,))
    again = with_acid_chunk(wav, AcidInfo(tempo=90.0, beats=3))  # replaces, does not add a second chunk
    assert [cid for cid, _ in riff_chunks(again)].count(b"acid") == 1


def test_midi_round_trip():
    midi = read_midi(click_midi(100.0, beats=9))
    assert (midi.format, midi.ppq, midi.tempo_us, midi.time_signature) == (0, PPQ, 600_000, (4, 4))
    assert midi.bpm == pytest.approx(100.0)
    assert [tick for tick, _, _ in midi.notes] == [i * PPQ for i in range(9)]
    assert [note for _, note, _ in midi.notes] == [DOWNBEAT_NOTE, BEAT_NOTE, BEAT_NOTE, BEAT_NOTE, DOWNBEAT_NOTE,
                                                   BEAT_NOTE, BEAT_NOTE, BEAT_NOTE, DOWNBEAT_NOTE]


def test_export_is_sample_aligned_and_carries_the_tempo(song_dir, tmp_path):
    target = export_song(song_dir, tmp_path / "exp", ExportOptions(rate=48000, stereo=True))
    names = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert names == ["click.wav", "manifest.json", "mix.wav", "stems/bass.wav", "stems/drums.wav", "tempo.mid"]
    samples = int(round(2.0 * SR * 48000 / SR))
    for name in ["click.wav", "mix.wav", "stems/bass.wav", "stems/drums.wav"]:
        info = sf.info(str(target / name))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (48000, 2, samples, "FLOAT")
        acid = read_acid(target / name)
        assert acid.tempo == pytest.approx(100.0) and acid.beats == 4  # 2 s at 100 BPM: 3.33 beats, rounded up
    midi = read_midi((target / "tempo.mid").read_bytes())
    assert midi.bpm == pytest.approx(100.0) and len(midi.notes) == 4
    # the stem is the picked candidate with its gain, resampled
    from stage_stack.arranger import Song
    from stage_stack.audio import resample

    song = Song.open(song_dir)
    bass, _ = sf.read(str(target / "stems/bass.wav"), dtype="float32")
    want = resample(song.candidates["bass"][1] * 10 ** (-6 / 20), SR, 48000)
    assert np.allclose(bass[:, 0], want[:samples], atol=1e-5) and np.array_equal(bass[:, 0], bass[:, 1])
    assert json.loads((target / "manifest.json").read_text())["layers"][1]["picked"] == 1
    # a second export into the same folder replaces the earlier one; a foreign folder is refused
    export_song(song_dir, target)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an earlier export"):
        export_song(song_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_export_flac_and_rate_checks(song_dir):
    files = export_files(song_dir, ExportOptions(format="flac", rate=44100))
    info = sf.info(io.BytesIO(files["mix.flac"]))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_24", 44100, 1)
    with sf.SoundFile(io.BytesIO(files["mix.flac"])) as f:
        assert f.comment == "bpm=100"
    with pytest.raises(InputError, match="export rate must be one of"):
        ExportOptions(rate=12345)


def test_export_cli_zip(song_dir, tmp_path):
    out = tmp_path / "song.zip"
    result = CliRunner().invoke(cli, ["export", str(song_dir), "--zip", "-o", str(out), "--rate", "44100"])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ["click.wav", "manifest.json", "mix.wav", "stems/bass.wav", "stems/drums.wav",
                                        "tempo.mid"]
        assert sf.info(io.BytesIO(z.read("mix.wav"))).samplerate == 44100
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "not an arrangement" in result.output
