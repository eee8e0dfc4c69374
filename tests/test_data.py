"""STAGE training pairs from stem folders: click track, metadata, recipe, alignment, bad data."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import soundfile as sf

from stage_stack.audio import click, click_track, read_audio, resample, write_audio
from stage_stack.training.data import (DatasetError, StemDataset, augment, collate_pairs, load_song_metadata,
                                       read_stem, scan_songs)
from stage_stack.training.synth import generate_song, write_dataset, write_song

SR = 32000


def onsets(x: np.ndarray) -> np.ndarray:
    """Start of each click: the sample before a non-zero one that follows >= 100 zeros (sin(0) = 0)."""
    nz = np.flatnonzero(x)
    return nz[np.diff(nz, prepend=-1000) > 100] - 1


@pytest.fixture(scope="module")
def band(tmp_path_factory):
    root = tmp_path_factory.mktemp("band")
    write_dataset(root, 3, seed=3, duration=14.0, sample_rate=SR)
    return root


# -- click track ------------------------------------------------------------------------------

def test_click_is_librosas_decaying_1khz_sine():
    c = click(SR)
    assert c.size == 3200  # 100 ms
    n = np.arange(3200)
    expected = np.logspace(0, -10, 3200, base=2.0) * np.sin(2 * np.pi * 1000 / SR * n)
    assert np.allclose(c, expected, atol=1e-7)
    assert np.abs(c[:40]).max() > 0.98 and np.abs(c[-40:]).max() < 1.1 * 2**-10


def test_click_track_positions_and_downbeat_accents():
    beats, downbeats = [0.5, 1.0, 1.5, 2.0, 2.98], [0.5, 2.0]
    x = click_track(beats, downbeats, SR, 3 * SR)
    assert x.shape == (3 * SR,) and x.dtype == np.float32
    assert list(onsets(x)) == [int(t * SR) for t in beats]
    one = click(SR)
    for t in (1.0, 1.5):  # plain beats: one click, exactly
        s = int(t * SR)
        assert np.array_equal(x[s : s + 3200], one)
        assert np.abs(x[s : s + 3200]).max() < 1.0
    for t in downbeats:  # accents: the doubled click, clipped, so louder and saturated
        s = int(t * SR)
        assert np.array_equal(x[s : s + 3200], np.clip(2 * one, -1, 1))
        assert np.sum(np.abs(x[s : s + 3200]) == 1.0) > 100
        assert np.sum(x[s : s + 3200] ** 2) > 1.5 * np.sum(one**2)
    assert np.array_equal(x[int(2.98 * SR) :], one[: 3 * SR - int(2.98 * SR)])  # cut at the end
    assert not x[: int(0.5 * SR)].any() and not x[int(1.1 * SR) : int(1.5 * SR)].any()
    assert not click_track([3.5, -0.2], [3.5], SR, 3 * SR).any()  # outside the track: dropped


# -- audio I/O --------------------------------------------------------------------------------

def test_read_audio_downmixes_stereo_and_resamples(tmp_path):
    t = np.arange(16000) / 16000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "st.wav", np.stack([left, np.zeros_like(left)], axis=1), 16000, subtype="FLOAT")
    mono, sr = read_audio(tmp_path / "st.wav")
    assert sr == 16000 and np.allclose(mono, 0.25 * np.sin(2 * np.pi * 440 * t), atol=1e-6)
    up, sr = read_audio(tmp_path / "st.wav", sample_rate=32000)
    assert sr == 32000 and up.size == 32000
    spectrum = np.abs(np.fft.rfft(up))
    assert np.fft.rfftfreq(up.size, 1 / 32000)[np.argmax(spectrum)] == pytest.approx(440, abs=1)
    window, _ = read_audio(tmp_path / "st.wav", start=100, stop=300)
    assert np.array_equal(window, mono[100:300])
    assert resample(np.ones((2, 100), np.float32), 100, 200).shape == (2, 200)


# -- metadata ---------------------------------------------------------------------------------

def write_meta(folder, data, name="metadata.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data) if not isinstance(data, str) else data)
    return folder


@pytest.mark.parametrize("data,field,words", [
    ({"bpm": "fast"}, "bpm", "valid number"),
    ({"bpm": -3}, "bpm", "greater than 0"),
    ({"genres": ["rock"]}, "<root>", "'bpm'"),
    ({"bpm": 100, "beats": [1.0, 0.5]}, "beats", "increasing order"),
    ({"bpm": 100, "time_signature": [4, 3]}, "time_signature", "[4, 4]"),
    ({"bpm": 100, "chords": [{"name": "C", "root": 0, "pitch_classes": [4, 7], "start": 0, "end": 2, "bar": 0}]},
     "chords.0", "root 0 is not among"),
    ({"bpm": 100, "chords": [{"name": "C", "root": 0, "pitch_classes": [0], "start": 0, "bar": 0}]},
     "chords.0.end", "required but missing"),
])
def test_metadata_errors_name_the_file_and_field(tmp_path, data, field, words):
    folder = write_meta(tmp_path / "song", data)
    with pytest.raises(DatasetError) as e:
        load_song_metadata(folder)
    message = str(e.value)
    assert str(folder / "metadata.json") in message and f"field '{field}'" in message and words in message


def test_metadata_unreadable_or_missing(tmp_path):
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_song_metadata(write_meta(tmp_path / "a", "{bpm: 1"))
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_song_metadata(write_meta(tmp_path / "b", "[120]"))
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError, match=r"no metadata.json.*at least \{\"bpm\": 120\}"):
        load_song_metadata(tmp_path / "c")


def test_moisesdb_like_metadata_and_beat_grid(tmp_path):
    folder = write_meta(tmp_path / "s", {"bpm": 120.0, "genres": "rock, pop, indie, folk", "moods": "dark",
                                         "key": ["A", "minor"], "num_frames": 123, "sample_rate": 44100},
                        name="features.json")
    meta = load_song_metadata(folder)
    assert meta.genres == ["rock", "pop", "indie", "folk"] and meta.key == "A minor"
    assert meta.text() == "Genres: rock, pop, indie. Mood: dark. "  # STAGE's form: first three of each
    beats, downbeats = meta.beat_grid(4.2)
    assert np.allclose(beats, np.arange(0, 4.2, 0.5)) and np.allclose(downbeats, [0.0, 2.0, 4.0])
    meta2 = meta.model_copy(update={"first_beat": 0.25, "time_signature": (3, 4)})
    beats, downbeats = meta2.beat_grid(2.0)
    assert np.allclose(beats, [0.25, 0.75, 1.25, 1.75]) and np.allclose(downbeats, [0.25, 1.75])
    # beatthis.npz wins over the bpm grid
    np.savez(folder / "beatthis.npz", beats=np.array([0.1, 0.6, 1.1]), downbeats=np.array([0.1]))
    beats, downbeats = load_song_metadata(folder).beat_grid(4.2)
    assert np.allclose(beats, [0.1, 0.6, 1.1]) and np.allclose(downbeats, [0.1])
    np.savez(folder / "beatthis.npz", wrong=np.array([1.0]))
    with pytest.raises(DatasetError, match="beatthis.npz: expected an npz with arrays 'beats'"):
        load_song_metadata(folder)


# -- the recipe -------------------------------------------------------------------------------

def disk_stem(band, song_id, stem):
    return sf.read(band / song_id / stem / f"{stem}.wav", dtype="float32")[0]


def test_pairs_follow_the_recipe_and_are_aligned(band):
    ds = StemDataset(band, "bass", speed_prob=0.0, pitch_prob=0.0, samples_per_epoch=40, seed=0)
    assert len(ds) == 40 and [s.song_id for s in ds.songs] == ["song_00000", "song_00001", "song_00002"]
    kinds, sizes, lengths = set(), set(), []
    for i in range(len(ds)):
        pair = ds[i]
        info = pair.info
        assert pair.target.shape == (10 * SR,) and pair.target.dtype == np.float32
        assert 5 * SR <= pair.context.size <= 10 * SR and pair.context.dtype == np.float32
        assert info.context_seconds == pair.context.size / SR and pair.sample_rate == SR
        assert pair.description == load_song_metadata(band / info.song_id).text() != ""
        assert info.song_id == ds.songs[i % 3].song_id  # songs cycle
        offset = round(info.offset_seconds * SR)
        target = disk_stem(band, info.song_id, "bass")[offset : offset + 10 * SR]
        assert np.array_equal(pair.target[: target.size], target)
        kinds.add(info.context_kind)
        lengths.append(pair.context.size)
        if info.context_kind == "stems":
            assert "bass" not in info.context_stems and len(info.context_stems) >= 1
            sizes.add(len(info.context_stems))
            mix = sum(disk_stem(band, info.song_id, s) for s in info.context_stems)
            # the context starts where the target starts, and the crop keeps the beginning
            assert np.allclose(pair.context, mix[offset : offset + pair.context.size], atol=1e-6)
    assert kinds == {"stems", "click"} and sizes == {1, 2, 3}
    assert np.std(lengths) > 0.15 * SR  # lengths are spread over [5, 10] s


def test_click_context_sits_on_the_song_beats(band):
    ds = StemDataset(band, "drums", click_prob=1.0, speed_prob=0.0, pitch_prob=0.0, samples_per_epoch=6, seed=1)
    for i in range(6):
        pair = ds[i]
        meta = load_song_metadata(band / pair.info.song_id)
        assert pair.info.context_kind == "click" and pair.info.context_stems == ()
        start = pair.info.offset_seconds
        beats = [b for b in meta.beats if start <= b < start + pair.context.size / SR]
        # within one sample: the offset is a whole number of samples, beats are rounded to 1 us
        assert np.allclose(onsets(pair.context), [(b - start) * SR for b in beats], atol=1.0)
        loud = [o for o in onsets(pair.context) if np.abs(pair.context[o : o + 3200]).max() == 1.0]
        downbeats = [b for b in meta.downbeats if start <= b < start + pair.context.size / SR]
        assert np.allclose(loud, [(b - start) * SR for b in downbeats], atol=1.0)


def test_click_beats_are_rescaled_by_the_speed_factor(band):
    ds = StemDataset(band, "drums", click_prob=1.0, speed=(1.2, 1.2), speed_prob=1.0, pitch_prob=0.0,
                     segment_seconds=4.0, context_seconds=(4.0, 4.0), samples_per_epoch=2, seed=2)
    pair = ds[0]
    meta = load_song_metadata(band / pair.info.song_id)
    assert pair.info.speed == 1.2 and pair.context.size == 4 * SR
    start = pair.info.offset_seconds
    beats = [b for b in meta.beats if start <= b < start + 4.0 / 1.2]
    assert np.allclose(onsets(pair.context), [(b - start) * 1.2 * SR for b in beats], atol=1.0)


def write_identical_stems(folder, seconds=6.0, sample_rate=SR):
    """Two stems with the same audio: a 440 Hz tone, silent for 0.1 s every second."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * ((t % 1.0) > 0.1)).astype(np.float32)
    for stem in ("a", "b"):
        write_audio(folder / stem / f"{stem}.wav", x, sample_rate, subtype="FLOAT")
    write_meta(folder, {"bpm": 120})
    return x


def test_augmentation_is_identical_on_target_and_context(tmp_path):
    write_identical_stems(tmp_path / "song", seconds=6.0)
    ds = StemDataset(tmp_path, "a", click_prob=0.0, speed=(1.2, 1.2), speed_prob=1.0, pitch=(3, 3), pitch_prob=1.0,
                     full_context_prob=1.0, samples_per_epoch=1)
    pair = ds[0]
    assert (pair.info.speed, pair.info.pitch, pair.info.offset_seconds) == (1.2, 3, 0.0)  # song < window
    assert pair.info.context_stems == ("b",)
    assert np.array_equal(pair.context, pair.target)  # same input, same stretcher call -> same output
    # the 6 s song became 7.2 s in both (then zero-padded to 10 s)
    last = np.flatnonzero(np.abs(pair.target) > 1e-3)[-1] / SR
    assert last == pytest.approx(6.0 * 1.2, abs=0.05)
    # and 3 semitones up: 440 Hz -> 523 Hz
    x = pair.target[SR : 5 * SR]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    assert np.fft.rfftfreq(x.size, 1 / SR)[np.argmax(spectrum)] == pytest.approx(440 * 2 ** (3 / 12), rel=0.005)


def test_augment_moves_events_by_the_time_ratio_in_every_row():
    rng = np.random.default_rng(0)
    x = np.zeros((2, 4 * SR), np.float32)
    x[1] = 0.02 * rng.standard_normal(4 * SR)  # different content in the other row
    burst = click(SR)[:400]
    for t in (0.5, 1.5, 3.0):
        x[:, int(t * SR) : int(t * SR) + 400] += burst
    for speed in (0.8, 1.2):
        y = augment(x, SR, speed, 0)
        assert y.shape == (2, round(4 * SR * speed))
        for row in y:
            loud = np.where(np.abs(row) > 0.3, row, 0)
            assert np.allclose(onsets(loud) / SR, [0.5 * speed, 1.5 * speed, 3.0 * speed], atol=0.02)
        assert np.array_equal(y[0], augment(x[:1], SR, speed, 0)[0])  # rows do not leak into each other
    assert augment(x, SR, 1.0, 0) is x  # no coin, no processing


def test_same_seed_same_pairs_other_seed_or_epoch_other_pairs(band):
    kwargs = dict(segment_seconds=3.0, context_seconds=(1.5, 3.0), samples_per_epoch=4)
    a, b = StemDataset(band, "keys", seed=5, **kwargs), StemDataset(band, "keys", seed=5, **kwargs)
    for i in (0, 3):
        pa, pb = a[i], b[i]
        assert np.array_equal(pa.target, pb.target) and np.array_equal(pa.context, pb.context)
        assert pa.info == pb.info
    c = StemDataset(band, "keys", seed=6, **kwargs)
    assert [c[i].info for i in range(4)] != [a[i].info for i in range(4)]
    a.set_epoch(1)
    assert [a[i].info for i in range(4)] != [b[i].info for i in range(4)]


def test_resamples_to_the_target_rate(tmp_path):
    write_dataset(tmp_path, 1, seed=0, duration=5.0, sample_rate=16000)
    ds = StemDataset(tmp_path, "bass", sample_rate=SR, segment_seconds=4.0, context_seconds=(2.0, 4.0),
                     speed_prob=0.0, pitch_prob=0.0, click_prob=0.0, samples_per_epoch=1)
    pair = ds[0]
    assert pair.target.size == 4 * SR
    offset = round(pair.info.offset_seconds * 16000)
    source = sf.read(tmp_path / "song_00000" / "bass" / "bass.wav", dtype="float32")[0][offset : offset + 4 * 16000]
    assert np.allclose(pair.target, resample(source, 16000, SR), atol=1e-5)


def test_split_and_collate_and_dataloader(band):
    import torch

    train = StemDataset(band, "drums", split="train", n_valid=1, speed_prob=0, pitch_prob=0)
    valid = StemDataset(band, "drums", split="valid", n_valid=1, speed_prob=0, pitch_prob=0)
    assert [s.song_id for s in train.songs] == ["song_00000", "song_00001"]
    assert [s.song_id for s in valid.songs] == ["song_00002"] and len(valid) == 1
    loader = torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate_pairs)
    batch = next(iter(loader))
    assert batch["target"].shape == (2, 1, 10 * SR) and batch["target"].dtype == torch.float32
    assert [c.shape[0] for c in batch["context"]] == [1, 1] and len(batch["description"]) == 2
    assert [i.song_id for i in batch["info"]] == ["song_00000", "song_00001"]
    with pytest.raises(ValueError, match="context_seconds"):
        StemDataset(band, "drums", context_seconds=(5.0, 12.0))


def test_stem_folder_files_are_summed_zero_padded(tmp_path):
    folder = tmp_path / "song"
    kick, snare = np.full(SR, 0.2, np.float32), np.full(SR // 2, 0.1, np.float32)
    write_audio(folder / "drums" / "kick.wav", kick, SR, subtype="FLOAT")
    write_audio(folder / "drums" / "snare.wav", snare, SR, subtype="FLOAT")
    write_audio(folder / "bass" / "bass.wav", np.full(SR, 0.3, np.float32), SR, subtype="FLOAT")
    write_audio(folder / "vocals" / "vocals.wav", np.full(SR, 0.3, np.float32), SR, subtype="FLOAT")
    write_meta(folder, {"bpm": 100})
    songs, skipped, _ = scan_songs(tmp_path)
    assert not skipped and sorted(songs[0].stems) == ["bass", "drums"]  # vocals are never used
    drums = read_stem(songs[0], "drums", SR // 4, SR + 100)
    expected = np.concatenate([np.full(SR // 4, 0.3), np.full(SR // 2, 0.2), np.zeros(100)])
    assert np.allclose(drums, expected)


# -- bad data ---------------------------------------------------------------------------------

@pytest.fixture()
def messy(tmp_path):
    """Two good songs and one of each kind of bad song."""
    good = generate_song(1, 12.0, SR)
    for name in ("a_good", "b_good", "c_unreadable", "d_mismatch", "e_missing", "f_badmeta", "g_rate", "h_alone"):
        write_song(good, tmp_path / name)
    (tmp_path / "c_unreadable" / "bass" / "bass.wav").write_bytes(b"RIFF but not really a wav file")
    write_audio(tmp_path / "d_mismatch" / "keys" / "keys.wav", good.stems["keys"][:-10], SR)
    shutil.rmtree(tmp_path / "e_missing" / "drums")
    (tmp_path / "f_badmeta" / "metadata.json").write_text(json.dumps({"bpm": "fast"}))
    write_audio(tmp_path / "g_rate" / "lead" / "lead.wav", resample(good.stems["lead"], SR, 16000), 16000)
    for stem in ("bass", "keys", "lead"):
        shutil.rmtree(tmp_path / "h_alone" / stem)
    silent = generate_song(2, 12.0, SR)
    silent.stems = {k: np.zeros_like(v) for k, v in silent.stems.items()}
    write_song(silent, tmp_path / "i_silent")
    (tmp_path / "j_not_a_song.txt").write_text("ignored: not a folder")
    return tmp_path


def test_bad_songs_are_skipped_and_counted_never_crash(messy, caplog):
    caplog.set_level(logging.WARNING)
    ds = StemDataset(messy, "drums", speed_prob=0.0, pitch_prob=0.0, samples_per_epoch=12, seed=0)
    assert dict(ds.skipped) == {"unreadable": 1, "length_mismatch": 1, "missing_stem": 1, "bad_metadata": 1,
                                "sample_rate_mismatch": 1, "no_context_stems": 1}
    assert [s.song_id for s in ds.songs] == ["a_good", "b_good", "i_silent"]
    assert "field 'bpm'" in ds.skip_reasons["f_badmeta"] and "bass.wav" in ds.skip_reasons["c_unreadable"]
    assert "lengths" in ds.skip_reasons["d_mismatch"] and "'drums/'" in ds.skip_reasons["e_missing"]
    # a file that breaks after the scan is found mid-epoch and skipped too
    (messy / "b_good" / "keys" / "keys.wav").write_bytes(b"garbage")
    got = [ds[i].info.song_id for i in range(len(ds))]
    assert set(got) == {"a_good"}
    assert ds.skipped["silent"] == 1 and ds.skipped["unreadable"] == 2
    assert "audible" in ds.skip_reasons["i_silent"]
    assert sum("skipping song" in r.message for r in caplog.records) == 8  # one warning per bad song


def test_nothing_usable_is_one_clear_error(tmp_path, messy):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        StemDataset(tmp_path / "nope", "drums")
    with pytest.raises(DatasetError, match=r"no usable songs with a 'piano' stem.*missing_stem"):
        StemDataset(messy, "piano")
    only_silent = tmp_path / "silent_only"
    shutil.copytree(messy / "i_silent", only_silent / "i_silent")
    ds = StemDataset(only_silent, "drums", speed_prob=0.0, pitch_prob=0.0)
    with pytest.raises(DatasetError, match="every song was skipped.*silent"):
        ds[0]
