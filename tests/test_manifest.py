"""The versioned manifest: round trip, validation errors that name the file and field, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from stage_stack import manifest as manifest_module
from stage_stack.errors import ArrangementError
from stage_stack.generation import SamplingParams
from stage_stack.longform import plan_windows
from stage_stack.manifest import (MANIFEST_VERSION, ExpertRecord, LayerRecord, LayerTimings, Manifest,
                                  SamplingRecord, atomic_write_text, now)


def layer(name: str, conditioned_on: dict, take: int = 1, picked: int = 0, candidates: int = 2) -> LayerRecord:
    return LayerRecord(
        name=name, instrument=name, seed=3, sampling=SamplingRecord(), candidates=candidates, picked=picked, gain_db=-2.0,
        click="mix+click", take=take, files=[f"candidates/{name}/take{take}-{i}.wav" for i in range(candidates)],
        conditioned_on=conditioned_on, window_plan=plan_windows(25.0, 32000, 640), timings=LayerTimings(generate_s=1.5),
        created=now(), expert=ExpertRecord(instrument=name, source="/x/e.safetensors", sha256="0" * 64,
                                           sample_rate=32000, frame_rate=50, device="cpu", dtype="torch.float32"))


def song_manifest(**extra) -> Manifest:
    fields = dict(library_version="0.1.0", arrangement_id="abc", created=now(), updated=now(), sample_rate=32000,
                  duration=25.0, samples=800000, bpm=120.0, bpm_source="given", click="mix+click", seed=0)
    fields.update(extra)
    return Manifest(**fields)


def test_round_trip(tmp_path):
    m = song_manifest()
    m.layers.append(layer("drums", {}))
    m.layers.append(layer("bass", {"drums": "1.0"}))
    m.log("arrange", "drums, bass")
    path = m.save(tmp_path / "manifest.json")
    again = Manifest.load(path)
    assert again == m
    assert again.manifest_version == MANIFEST_VERSION
    assert [w.start_frame for w in again.layers[0].window_plan.windows] == [0, 300, 600, 750]  # 10 s windows, 6 s apart
    assert again.layers[1].sampling.params() == SamplingParams()
    assert json.loads(path.read_text())["layers"][1]["conditioned_on"] == {"drums": "1.0"}


def test_stale_layers_follow_picks_and_redos():
    m = song_manifest()
    m.layers += [layer("drums", {}), layer("bass", {"drums": "1.0"}), layer("keys", {"drums": "1.0", "bass": "1.0"})]
    assert m.stale_layers() == []
    m.layers[0].picked = 1  # drums now plays another candidate: bass and keys heard the old one
    assert m.stale_layers() == ["bass", "keys"]
    m.layers[0].picked = 0
    m.layers[1].take = 2  # bass was redone: keys heard the old bass
    assert m.stale_layers() == ["keys"]
    assert m.index("keys") == 2
    with pytest.raises(ArrangementError, match="no layer 'tuba'; its layers are: drums, bass, keys"):
        m.layer("tuba")


def test_unknown_version_is_refused(tmp_path):
    path = song_manifest().save(tmp_path / "manifest.json")
    data = json.loads(path.read_text())
    data["manifest_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ArrangementError, match=r"manifest\.json: invalid arrangement manifest:\n"
                                               r"  field 'manifest_version': .*version 99 is not supported"):
        Manifest.load(path)


def test_invalid_fields_name_the_file_and_field(tmp_path):
    path = tmp_path / "manifest.json"
    m = song_manifest()
    m.layers.append(layer("drums", {}))
    data = json.loads(m.model_dump_json())
    data["layers"][0]["picked"] = 5
    data["bpm"] = "fast"
    path.write_text(json.dumps(data))
    with pytest.raises(ArrangementError) as info:
        Manifest.load(path)
    message = str(info.value)
    assert str(path) in message and "field 'bpm'" in message
    assert "field 'layers.0.picked'" in message and "has 2, numbered from 0" in message


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ArrangementError, match="no such file"):
        Manifest.load(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArrangementError, match="not a readable JSON manifest"):
        Manifest.load(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(ArrangementError, match="not a stage-stack arrangement manifest"):
        Manifest.load(tmp_path / "manifest.json")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "manifest.json", "old\n")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["manifest.json"]  # no temp file left behind
