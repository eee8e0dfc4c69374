"""Pre-tokenized pairs: codes on disk equal the codec's, and pairs follow the recipe in frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage_stack.audio import click_track, read_audio
from stage_stack.layout import TokenLayout
from stage_stack.testing import tiny_codec
from stage_stack.training.data import DatasetError, StemDataset, load_song_metadata
from stage_stack.training.synth import write_dataset
from stage_stack.training.token_cache import (CLICK, TokenCacheIndex, TokenPairDataset, collate_token_pairs,
                                              frame_peaks, pretokenize)

SR = 16000  # the tiny codec's rate: hop 160, 100 frames per second
STEMS = ("bass", "drums", "keys")  # three stems keep the number of mixes (and the test) small


@pytest.fixture(scope="module")
def codec():
    return tiny_codec()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, codec):
    root = tmp_path_factory.mktemp("band")
    write_dataset(root, 2, seed=4, duration=3.0, sample_rate=SR)
    out = tmp_path_factory.mktemp("cache")
    index = pretokenize(root, codec, out, variants=2, target_stems=["bass"], stems=STEMS, seed=1)
    return root, out, index


def test_index_lists_every_variant(cache):
    root, out, index = cache
    assert TokenCacheIndex.load(out) == index
    assert [(e.song_id, e.variant) for e in index.entries] == [("song_00000", 0), ("song_00000", 1),
                                                               ("song_00001", 0), ("song_00001", 1)]
    assert index.frame_rate == 100 and index.n_q == 2 and index.card == 16 and index.skipped == {}
    for entry in index.entries:
        assert entry.stems == sorted(STEMS) and entry.mixes == ["drums+keys"]  # bass's only 2-stem context
        if entry.variant == 0:
            assert (entry.speed, entry.pitch, entry.n_frames) == (1.0, 0, 300)
        else:  # an augmented variant always changes something, and its length follows the speed
            assert (entry.speed, entry.pitch) != (1.0, 0)
            assert entry.n_frames == -(-round(3 * SR * entry.speed) // 160)
        meta = load_song_metadata(root / entry.song_id)
        assert entry.description == meta.text()
        expected_beats = [b * entry.speed for b in meta.beats if b * entry.speed < entry.n_frames / 100]
        assert np.allclose(entry.beats, expected_beats, atol=1e-5)


def test_stored_codes_are_the_codecs_codes(cache, codec):
    from safetensors.numpy import load_file

    root, out, index = cache
    entry = index.entries[0]  # variant 0: the song as recorded
    tensors = load_file(out / entry.file)
    assert set(tensors) == {"codes.bass", "codes.drums", "codes.keys", "codes.drums+keys", f"codes.{CLICK}", "peaks"}
    audio = {s: read_audio(root / entry.song_id / s / f"{s}.wav")[0] for s in STEMS}
    for name, signal in [("bass", audio["bass"]), ("drums+keys", audio["drums"] + audio["keys"]),
                         (CLICK, click_track(entry.beats, entry.downbeats, SR, 3 * SR))]:
        expected = codec.encode(torch.from_numpy(signal)[None, None]).numpy()[0]
        assert tensors[f"codes.{name}"].dtype == np.int16
        assert np.array_equal(tensors[f"codes.{name}"], expected), name
    peaks = frame_peaks(np.stack([audio[s] for s in sorted(STEMS)]), 160, 300)
    assert np.array_equal(tensors["peaks"], peaks) and peaks.shape == (3, 300)
    assert peaks[0, 10] == np.abs(audio["bass"][1600:1760]).max()


def test_pairs_follow_the_recipe_in_frames(cache):
    root, out, index = cache
    ds = TokenPairDataset(out, "bass", segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=24, seed=0)
    from safetensors.numpy import load_file

    files = {e.file: load_file(out / e.file) for e in index.entries}
    kinds, variants = set(), set()
    for i in range(len(ds)):
        pair = ds[i]
        info = pair.info
        assert pair.target_codes.shape == (2, 200) and pair.target_codes.dtype == np.int64
        assert 100 <= pair.context_codes.shape[1] <= 200 and info.context_seconds == pair.context_codes.shape[1] / 100
        entry = next(e for e in index.entries if e.song_id == info.song_id and e.variant == info.variant)
        assert (info.speed, info.pitch) == (entry.speed, entry.pitch)
        offset = round(info.offset_seconds * 100)
        codes = files[entry.file]
        key = CLICK if info.context_kind == "click" else "+".join(info.context_stems)
        assert "bass" not in info.context_stems
        # target and context start on the same frame; the context crop keeps the beginning
        assert np.array_equal(pair.target_codes, codes["codes.bass"][:, offset : offset + 200])
        context_len = pair.context_codes.shape[1]
        assert np.array_equal(pair.context_codes, codes[f"codes.{key}"][:, offset : offset + context_len])
        kinds.add(info.context_kind)
        variants.add(info.variant)
    assert kinds == {"click", "stems"} and variants == {0, 1}
    again = TokenPairDataset(out, "bass", segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=24, seed=0)
    assert all(again[i].info == ds[i].info for i in range(5))  # deterministic by seed


def test_identity_prob_picks_the_plain_variant(cache):
    _, out, _ = cache
    kwargs = dict(segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=10)
    assert {TokenPairDataset(out, "bass", identity_prob=1.0, **kwargs)[i].info.variant for i in range(10)} == {0}
    assert {TokenPairDataset(out, "bass", identity_prob=0.0, **kwargs)[i].info.variant for i in range(10)} == {1}


def test_all_stems_prob_hears_the_densest_mix_and_zero_is_upstreams_draw(cache):
    _, out, _ = cache
    kwargs = dict(segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=40, click_prob=0.0, seed=3)
    upstream = [TokenPairDataset(out, "bass", **kwargs)[i].info for i in range(40)]
    # 0 draws nothing extra: the pairs are exactly upstream's
    assert [TokenPairDataset(out, "bass", all_stems_prob=0.0, **kwargs)[i].info for i in range(40)] == upstream
    assert {info.context_stems for info in upstream} >= {("drums",), ("keys",), ("drums", "keys")}
    dense = [TokenPairDataset(out, "bass", all_stems_prob=1.0, **kwargs)[i].info for i in range(40)]
    # every pair whose window has both other stems audible hears both; the target stays the same
    assert {info.context_stems for info in dense} == {("drums", "keys")}
    assert all(d.context_kind == "stems" for d in dense)
    with pytest.raises(ValueError, match=r"all_stems_prob must be in \[0, 1\], got 1.5"):
        TokenPairDataset(out, "bass", all_stems_prob=1.5, **kwargs)


def test_context_stems_restrict_what_a_pair_hears_and_none_is_upstreams_draw(cache):
    _, out, _ = cache
    kwargs = dict(segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=40, click_prob=0.0, seed=3)
    upstream = [TokenPairDataset(out, "bass", **kwargs)[i].info for i in range(40)]
    assert [TokenPairDataset(out, "bass", context_stems=None, **kwargs)[i].info for i in range(40)] == upstream
    keys_only = [TokenPairDataset(out, "bass", context_stems=("keys",), **kwargs)[i].info for i in range(40)]
    assert {info.context_stems for info in keys_only} == {("keys",)}
    with pytest.raises(ValueError, match="context_stems must name at least one stem other than the target 'bass'"):
        TokenPairDataset(out, "bass", context_stems=("bass",), **kwargs)


def test_batches_feed_the_token_layout(cache):
    _, out, _ = cache
    ds = TokenPairDataset(out, "bass", segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=4)
    batch = collate_token_pairs([ds[i] for i in range(4)])
    assert batch["target"].shape == (4, 2, 200) and batch["target"].dtype == torch.int64
    train = TokenLayout.for_card(16, 2).training_batch(batch["context"], batch["target"])
    longest = max(c.shape[1] for c in batch["context"])
    assert train.codes.shape == (4, 2, longest + 1 + 200 + 1) and train.context_len == longest


def test_pretokenize_resumes_and_checks_the_codec(cache, codec, tmp_path):
    root, out, index = cache
    first = out / index.entries[0].file
    stamp = first.stat().st_mtime_ns
    again = pretokenize(root, codec, out, variants=2, target_stems=["bass"], stems=STEMS, seed=1)
    assert again == index and first.stat().st_mtime_ns == stamp  # nothing re-encoded
    with pytest.raises(DatasetError, match="another codec config"):
        pretokenize(root, tiny_codec(tiny_codec().config.__class__(**{**tiny_codec().config.to_dict(), "n_q": 1})),
                    out, variants=2, stems=STEMS)
    with pytest.raises(DatasetError, match="no token cache index"):
        TokenPairDataset(tmp_path, "bass")


def test_broken_or_short_cached_songs_are_skipped(cache, codec, tmp_path):
    import shutil

    _, out, _ = cache
    broken = tmp_path / "cache"
    shutil.copytree(out, broken)
    (broken / "song_00001" / "variant_0.safetensors").write_bytes(b"not safetensors")
    (broken / "song_00001" / "variant_1.safetensors").unlink()
    ds = TokenPairDataset(broken, "bass", segment_seconds=2.0, context_seconds=(1.0, 2.0), samples_per_epoch=6)
    assert {ds[i].info.song_id for i in range(6)} == {"song_00000"}
    assert ds.skipped == {"unreadable": 1}
    too_long = TokenPairDataset(out, "bass", segment_seconds=10.0, samples_per_epoch=1)
    with pytest.raises(DatasetError, match="every song was skipped.*too_short"):
        too_long[0]


def test_pretokenize_takes_a_stem_dataset(cache, codec, tmp_path):
    root, _, _ = cache
    ds = StemDataset(root, "bass", stems=STEMS, split="valid", n_valid=1)
    index = pretokenize(ds, codec, tmp_path, variants=1, target_stems=["bass"])
    assert [(e.song_id, e.variant) for e in index.entries] == [("song_00001", 0)]


def test_an_interrupted_pretokenize_resumes_where_it_stopped(cache, codec, tmp_path, monkeypatch):
    import stage_stack.training.token_cache as tc

    root, _, _ = cache
    real = tc._encode_song
    calls = []

    def interrupted(song, *args, **kwargs):
        calls.append(song.song_id)
        if song.song_id == "song_00001":
            raise KeyboardInterrupt
        return real(song, *args, **kwargs)

    monkeypatch.setattr(tc, "_encode_song", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(root, codec, tmp_path, variants=1, stems=STEMS, target_stems=["bass"])
    partial = TokenCacheIndex.load(tmp_path)  # written after the first song
    assert [(e.song_id, e.variant) for e in partial.entries] == [("song_00000", 0)]
    calls.clear()
    monkeypatch.setattr(tc, "_encode_song", lambda song, *a, **k: calls.append(song.song_id) or real(song, *a, **k))
    index = pretokenize(root, codec, tmp_path, variants=1, stems=STEMS, target_stems=["bass"])
    assert calls == ["song_00001"]  # only the missing song is encoded
    assert [(e.song_id, e.variant) for e in index.entries] == [("song_00000", 0), ("song_00001", 0)]


@pytest.mark.parametrize("chords, beats, named", [
    (True, False, ["chord labels (loss.harmony_weight, a chord stream)"]),
    (False, True, ["beat labels (loss.beat_weight)"]),
    (True, True, ["chord labels (loss.harmony_weight, a chord stream) and beat labels (loss.beat_weight)"]),
])
def test_labels_without_the_songs_folder_name_every_head_that_needs_them(cache, chords, beats, named):
    _, out, _ = cache
    with pytest.raises(DatasetError) as error:
        TokenPairDataset(out, "bass", segment_seconds=2.0, context_seconds=(1.0, 2.0), chord_labels=chords,
                         beat_labels=beats)
    message = str(error.value)
    assert all(n in message for n in named) and "(data.root)" in message
    assert ("beat" in message) == beats and ("chord" in message) == chords


def _in_children(work, n: int) -> list[int]:
    """Run `work()` in n forked children at once; their exit statuses."""
    import os

    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                work()
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def test_two_processes_building_one_cache_take_turns(cache, codec, tmp_path):
    root, _, index = cache
    out = tmp_path / "shared-cache"
    statuses = _in_children(lambda: pretokenize(root, codec, out, variants=2, target_stems=["bass"], stems=STEMS,
                                                seed=1), 2)
    assert statuses == [0, 0]
    built = TokenCacheIndex.load(out)
    assert built == index  # every variant listed once, as one process alone writes it
    assert all((out / e.file).is_file() for e in built.entries)
    assert sorted(p.name for p in out.iterdir()) == [".pretokenize.lock", "index.json", "song_00000", "song_00001"]


def test_two_runs_needing_one_synthetic_dataset_take_turns(tmp_path):
    from stage_stack.training.config import SynthSpec

    spec = SynthSpec(n_songs=2, seed=3, duration=2.0, sample_rate=SR)
    root = tmp_path / "synth" / "train"
    assert _in_children(lambda: spec.ensure(root), 3) == [0, 0, 0]
    assert sorted(p.name for p in root.iterdir()) == ["song_00000", "song_00001"]
    assert sorted(p.name for p in root.parent.iterdir()) == [".train.lock", "train"]  # no half-written folder left
