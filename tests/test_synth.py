"""The synthetic band: determinism, music (tempo, chords, grid), levels, speed, files on disk."""

from __future__ import annotations

import time

import numpy as np
import pytest
import soundfile as sf

from stage_stack.training.data import load_song_metadata
from stage_stack.training.synth import (SCALES, STEMS, NoteRenderer, generate_song, midi_to_hz, parse_key,
                                        random_timbre, song_seed, write_dataset)

SR = 32000
DURATION = 24.0  # every song then has at least one phrase end (8 bars at 80 BPM)


@pytest.fixture(scope="module")
def songs():
    return [generate_song(seed, DURATION, SR) for seed in range(8)]


def test_same_seed_same_song_other_seed_other_song():
    a, b, c = generate_song(5, 6.0), generate_song(5, 6.0), generate_song(6, 6.0)
    for stem in STEMS:
        assert np.array_equal(a.stems[stem], b.stems[stem])
    assert a.notes == b.notes and a.drum_hits == b.drum_hits and a.metadata == b.metadata
    assert not np.array_equal(a.stems["bass"], c.stems["bass"])
    assert a.metadata.seed == 5


def test_tempo_in_range_and_key_and_tempo_can_be_chosen():
    bpms = [generate_song(seed, 1.0).metadata.bpm for seed in range(24)]
    assert all(80 <= bpm <= 160 for bpm in bpms)
    assert len(set(bpms)) > 12 and max(bpms) - min(bpms) > 40  # tempi really vary
    song = generate_song(1, 4.0, bpm=137.5, key="Bb minor")
    assert song.metadata.bpm == 137.5 and song.metadata.key == "Bb minor"
    assert np.allclose(np.diff(song.metadata.beats), 60 / 137.5, atol=1e-6)
    assert song.metadata.downbeats == song.metadata.beats[::4]
    assert parse_key("F# major") == (6, "major") and parse_key("Bb minor") == (10, "minor")
    with pytest.raises(ValueError, match="key must look like"):
        parse_key("H dorian")


def test_chords_one_per_bar_and_diatonic(songs):
    for song in songs:
        meta = song.metadata
        bar = 4 * 60 / meta.bpm
        root, mode = parse_key(meta.key)
        scale = {(root + i) % 12 for i in SCALES[mode]}
        assert [c.bar for c in meta.chords] == list(range(len(meta.chords)))
        assert np.allclose([c.start for c in meta.chords], np.arange(len(meta.chords)) * bar, atol=1e-5)
        assert meta.chords[-1].end == pytest.approx(meta.duration, abs=1e-5)
        for chord in meta.chords:
            assert set(chord.pitch_classes) <= scale and chord.pitch_classes[0] == chord.root


def test_bass_plays_the_chord_roots(songs):
    for song in songs:
        bass = song.notes_of("bass")
        assert len(bass) >= len(song.metadata.chords)  # at least one note per bar
        for note in bass:
            assert note.pitch % 12 == song.chord_at(note.start).root
            assert 28 <= note.pitch <= 51  # the bass register


def test_bass_audio_is_strongest_on_the_root(songs):
    """From the rendered audio, not the score: fold each bar's low spectrum into pitch classes."""
    for song in songs[:4]:
        x = song.stems["bass"]
        for chord in song.metadata.chords[:-1]:
            seg = x[int(chord.start * SR) : int(chord.end * SR)]
            spectrum = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
            freqs = np.fft.rfftfreq(seg.size, 1 / SR)
            band = (freqs > 35) & (freqs < 400)
            pcs = np.round(12 * np.log2(freqs[band] / 440.0) + 69).astype(int) % 12
            chroma = np.bincount(pcs, weights=spectrum[band] ** 2, minlength=12)
            assert int(np.argmax(chroma)) == chord.root, (song.metadata.seed, chord)


def test_keys_and_lead_fit_the_harmony(songs):
    for song in songs:
        root, mode = parse_key(song.metadata.key)
        scale = {(root + i) % 12 for i in SCALES[mode]}
        keys = song.notes_of("keys")
        assert keys
        for note in keys:
            assert note.pitch % 12 in song.chord_at(note.start).pitch_classes
        beat = 60 / song.metadata.bpm
        lead = song.notes_of("lead")
        assert lead
        for note in lead:
            assert note.pitch % 12 in scale
            on_beat = abs(note.start / beat - round(note.start / beat)) < 1e-6
            chord = song.chord_at(note.start)
            # strong beats take chord tones (a repeated motif can land one bar late in a short last cycle)
            if on_beat and note.start < song.metadata.chords[-1].start:
                assert note.pitch % 12 in chord.pitch_classes, (song.metadata.seed, note, chord)


def test_drum_hits_are_on_the_16th_grid_with_fills(songs):
    n_fills = 0
    for song in songs:
        sixteenth = 60 / song.metadata.bpm / 4
        hits = song.drum_hits
        assert {"kick", "hat"} <= {h.instrument for h in hits}
        for hit in hits:
            assert hit.time == pytest.approx(hit.step * sixteenth, abs=1e-9)
        assert hits[0].step == 0
        fills = [h for h in hits if h.fill]
        n_fills += bool(fills)
        assert all(h.step % 16 >= 8 for h in fills)  # fills take the last beats of a bar
        # kicks on the first beat of most bars
        bars = {h.step // 16 for h in hits if h.instrument == "kick" and h.step % 16 == 0}
        assert len(bars) >= 0.7 * len(song.metadata.chords)
    assert n_fills >= 5  # a phrase end gets a fill with p 0.6 .. 1


def test_drum_audio_onsets_fall_on_the_grid(songs):
    """Onsets found in the rendered drums (rises of log energy, 16 ms windows) sit on 16th steps."""
    hop, win = 128, 512
    for song in songs:
        x = np.diff(song.stems["drums"], prepend=0.0)  # pre-emphasis: transients over kick rumble
        frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]
        log_energy = np.log(np.sqrt(np.mean(frames**2, axis=1)) + 1e-4)
        rise = np.maximum(np.diff(log_energy, prepend=log_energy[0]), 0)
        local_max = np.lib.stride_tricks.sliding_window_view(np.pad(rise, 8), 17).max(axis=1)  # +-32 ms
        onsets = np.flatnonzero((rise > 0.3 * rise.max()) & (rise == local_max))
        times = (onsets * hop + win) / SR  # a hit shows when it enters the end of the window
        sixteenth = 60 / song.metadata.bpm / 4
        distance = np.abs(times - np.round(times / sixteenth) * sixteenth)
        assert onsets.size >= 2 * len(song.metadata.chords)
        assert np.mean(distance < 0.012) >= 0.95, (song.metadata.seed, times[distance >= 0.012])
        # and the grid is not trivially fine: half a 16th is >= 47 ms at 160 BPM
        assert sixteenth / 2 > 0.04


def test_levels_are_sane_and_nothing_clips(songs):
    for song in songs:
        for stem in STEMS:
            x = song.stems[stem]
            assert x.dtype == np.float32 and x.size == DURATION * SR
            assert 0.1 < np.abs(x).max() < 0.9, (stem, np.abs(x).max())
            assert np.isfinite(x).all()
        mix = song.mix()
        assert np.abs(mix).max() <= 0.9
        assert 0.05 < np.sqrt(np.mean(mix**2)) < 0.5


def test_timbres_vary_between_songs(songs):
    cutoffs = {round(s.timbres["bass"]["cutoff"]) for s in songs}
    kicks = {round(s.timbres["drums"]["kick_start"]) for s in songs}
    assert len(cutoffs) == len(songs) and len(kicks) == len(songs)
    # and it is audible: the bass spectral centroid differs by more than 10 % across songs
    centroids = []
    for s in songs:
        spectrum = np.abs(np.fft.rfft(s.stems["bass"]))
        freqs = np.fft.rfftfreq(s.stems["bass"].size, 1 / SR)
        centroids.append(float((spectrum * freqs).sum() / spectrum.sum()))
    assert max(centroids) > 1.1 * min(centroids)


@pytest.mark.parametrize("role,pitches", [("bass", (28, 39, 45)), ("keys", (55, 64, 72)), ("lead", (64, 76, 86))])
def test_rendered_notes_have_the_right_pitch(role, pitches):
    """The fundamental of a rendered note (zero-padded spectrum peak near f0) is the MIDI pitch."""
    for seed in range(3):
        renderer = NoteRenderer(random_timbre(np.random.default_rng(seed), role), SR)
        for pitch in pitches:
            x = renderer.render(pitch, SR)[SR // 10 : SR].astype(np.float64)
            spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size), 8 * x.size))
            freqs = np.fft.rfftfreq(8 * x.size, 1 / SR)
            f0 = midi_to_hz(pitch)
            near = (freqs > 0.8 * f0) & (freqs < 1.2 * f0)
            assert freqs[near][np.argmax(spectrum[near])] == pytest.approx(f0, rel=0.01)  # detune <= 12 cents
            assert spectrum[(freqs > 20) & (freqs < 0.8 * f0)].max() < 0.05 * spectrum[near].max()  # nothing below f0


@pytest.mark.slow
def test_a_30_second_song_renders_fast():
    generate_song(0, 2.0)  # warm up numpy's FFT plans
    start = time.perf_counter()
    generate_song(1, 30.0)
    elapsed = time.perf_counter() - start
    # ~0.25 s on one free core; the bound leaves room for a shared CI machine
    assert elapsed < 3.0, elapsed


def test_write_dataset_layout_and_contents(tmp_path):
    folders = write_dataset(tmp_path, 2, seed=7, duration=3.0, sample_rate=16000)
    assert [f.name for f in folders] == ["song_00000", "song_00001"]
    for i, folder in enumerate(folders):
        song = generate_song(song_seed(7, i), 3.0, 16000)
        meta = load_song_metadata(folder)
        assert meta == song.metadata
        for stem in STEMS:
            audio, sr = sf.read(folder / stem / f"{stem}.wav", dtype="float32")
            assert sr == 16000 and audio.shape == (48000,)
            assert np.abs(audio - song.stems[stem]).max() < 1 / 2**14  # 16-bit PCM
    assert load_song_metadata(folders[0]).bpm != load_song_metadata(folders[1]).bpm or \
        load_song_metadata(folders[0]).key != load_song_metadata(folders[1]).key


def test_write_dataset_with_a_tempo_range(tmp_path):
    write_dataset(tmp_path, 3, seed=1, duration=1.0, bpm_range=(141.0, 143.0))
    for i in range(3):
        assert 141.0 <= load_song_metadata(tmp_path / f"song_{i:05d}").bpm <= 143.0
