"""`Layer.hears`: a layer that hears some earlier layers only, chosen by the user or by its expert."""

from __future__ import annotations

import numpy as np
import pytest

from arranger_helpers import SR, band, heard, run  # noqa: F401  (fixtures)
from stage_stack import Arranger, Layer
from stage_stack.errors import InputError
from stage_stack.expert import ExpertMetadata, load_expert
from stage_stack.mixing import limit, render_mix
from stage_stack.song import Song


def test_a_layer_hears_only_the_layers_it_names(band, heard):
    song = Arranger(band).arrange(["drums", "keys", Layer("bass", hears=["keys"])], duration=1.5, click="none")
    m, samples = song.manifest, int(1.5 * SR)
    keys_only = render_mix(None, [(song.stems["keys"], m.layer("keys").gain_db)], SR, samples)
    np.testing.assert_array_equal(heard[2]["context"], limit(keys_only, SR))
    everything = render_mix(None, [(song.stems[n], m.layer(n).gain_db) for n in ("drums", "keys")], SR, samples)
    assert not np.allclose(heard[2]["context"], limit(everything, SR))
    bass = m.layer("bass")
    assert bass.hears == ["keys"] and set(bass.conditioned_on) == {"keys"}
    assert m.layer("keys").hears is None and set(m.layer("keys").conditioned_on) == {"drums"}
    # the mix everyone listens to still holds every layer
    np.testing.assert_array_equal(song.mix, render_mix(None, [(song.stems[n], m.layer(n).gain_db)
                                                              for n in ("drums", "keys", "bass")], SR, samples))


def test_a_change_to_a_layer_it_does_not_hear_leaves_it_current(band, tmp_path):
    out = tmp_path / "song"
    Arranger(band).arrange([Layer("drums", candidates=2), Layer("keys", candidates=2), Layer("bass", hears=["keys"])],
                           duration=1.0, click="none", out=out)
    song = Song.open(out)
    song.pick("drums", 1)
    assert song.stale == ["keys"]  # the keys heard the drums; the bass did not
    song.pick("keys", 1)
    assert song.stale == ["keys", "bass"]


def test_an_expert_trained_to_hear_the_keys_hears_the_keys_layers_by_default(band, heard):
    bass = load_expert(band["bass"])
    bass.metadata = bass.metadata.model_copy(update={"hears": ["keys"]})
    arranger = Arranger({**band, "bass": bass})
    song = arranger.arrange(["drums", "keys", "bass"], duration=1.0, click="none")
    assert song.manifest.layer("bass").hears == ["keys"]
    keys_only = render_mix(None, [(song.stems["keys"], 0.0)], SR, SR)
    np.testing.assert_array_equal(heard[2]["context"], limit(keys_only, SR))
    # no keys layer before it: it hears everything rather than nothing
    heard.clear()
    song = arranger.arrange(["drums", "bass"], duration=1.0, click="none")
    assert song.manifest.layer("bass").hears is None and set(song.manifest.layer("bass").conditioned_on) == {"drums"}
    # the user's choice wins over the expert's
    song = arranger.arrange(["drums", "keys", Layer("bass", hears=["drums"])], duration=1.0, click="none")
    assert song.manifest.layer("bass").hears == ["drums"]


def test_hearing_no_layer_of_a_song_without_context_means_the_click(band, heard):
    song = Arranger(band).arrange(["drums", Layer("bass", hears=[])], duration=1.0, click="none")
    assert song.manifest.layer("bass").click == "click" and song.manifest.layer("bass").conditioned_on == {}


def test_hears_must_name_earlier_layers_before_any_work(band, heard, tmp_path):
    with pytest.raises(InputError, match=r"layer 'bass': hears 'lead', which is not an earlier layer; "
                                         r"earlier layers: drums"):
        Arranger(band).arrange(["drums", Layer("bass", hears=["lead"]), "keys"], duration=1.0, out=tmp_path / "s")
    with pytest.raises(InputError, match=r"hears 'keys', which is not an earlier layer; earlier layers: drums"):
        Arranger(band).arrange(["drums", Layer("bass", hears=["keys"]), "keys"], duration=1.0)
    assert heard == [] and not (tmp_path / "s").exists()
    with pytest.raises(InputError, match="hears must be a list of layer names, got 'keys'"):
        Layer("bass", hears="keys")
    with pytest.raises(InputError, match="hears names the layer itself"):
        Layer("bass", hears=["bass"])


def test_reproducing_a_song_keeps_what_each_layer_heard(band, tmp_path):
    out = tmp_path / "song"
    made = Arranger(band).arrange(["drums", "keys", Layer("bass", hears=["keys"])], duration=1.0, click="none",
                                  out=out)
    again = Arranger(band).reproduce(out / "manifest.json", out=tmp_path / "again")
    assert again.manifest.layer("bass").hears == ["keys"]
    np.testing.assert_array_equal(again.stems["bass"], made.stems["bass"])


def test_the_cli_takes_hears_per_layer(band, tmp_path):
    from arranger_helpers import experts

    out = tmp_path / "song"
    run("arrange", "drums", "keys", "bass", "--hears", "bass=keys", "--duration", "1", "-o", out,
        *experts(band, "drums", "keys", "bass"), "--quiet")
    assert Song.open(out).manifest.layer("bass").hears == ["keys"]
    bad = run("arrange", "drums", "--hears", "lead=keys", "--duration", "1", "-o", tmp_path / "bad",
              *experts(band, "drums"), "--quiet", ok=False)
    assert bad.exit_code != 0 and "--hears names layer(s) lead that are not arranged" in bad.output
    bad = run("arrange", "drums", "--hears", "drums", "--duration", "1", "-o", tmp_path / "bad",
              *experts(band, "drums"), "--quiet", ok=False)
    assert bad.exit_code != 0 and "expected LAYER=A+B" in bad.output
    run("add", out, "lead=keys", "--hears", "drums+bass", *experts(band, "keys"), "--quiet")
    assert Song.open(out).manifest.layer("lead").hears == ["drums", "bass"]


def test_expert_metadata_hears_is_left_out_of_the_header_when_unset(band):
    metadata = load_expert(band["bass"]).metadata
    assert metadata.hears is None and "hears" not in metadata.to_header()
    trained = metadata.model_copy(update={"hears": ["keys"]})
    assert ExpertMetadata.from_header(trained.to_header(), "test").hears == ["keys"]
    with pytest.raises(Exception, match="hears"):
        ExpertMetadata.model_validate({**metadata.model_dump(), "hears": []})


def test_a_redo_after_the_heard_layer_is_gone_falls_back_to_the_expert_default(band, tmp_path):
    bass = load_expert(band["bass"])
    bass.metadata = bass.metadata.model_copy(update={"hears": ["keys"]})
    arranger = Arranger({**band, "bass": bass})
    out = tmp_path / "song"
    song = arranger.arrange(["drums", "keys", "bass"], duration=1.0, click="none", out=out)
    record = song.manifest.layer("bass")
    assert (record.hears, record.hears_requested) == (["keys"], None)
    song.remove("keys")
    song = arranger.redo(Song.open(out), "bass")
    assert song.manifest.layer("bass").hears is None  # no keys now: it hears what there is
    asked = Arranger(band).arrange(["drums", "keys", Layer("bass", hears=["keys"])], duration=1.0, click="none",
                                   out=tmp_path / "asked")
    assert asked.manifest.layer("bass").hears_requested == ["keys"]
    asked.remove("keys")
    with pytest.raises(InputError, match="hears 'keys', which is not an earlier layer; earlier layers: drums"):
        Arranger(band).redo(Song.open(tmp_path / "asked"), "bass")
