"""CLI additions of the studio issue: sampling flags, relabel, and the demo's progress bars."""

from __future__ import annotations

import json

from click.testing import CliRunner

from arranger_helpers import band  # noqa: F401
from stage_stack.cli import arrange as _arrange_commands  # noqa: F401  (registers the commands)
from stage_stack.cli import cli
from stage_stack.cli import convert as _convert_commands  # noqa: F401
from stage_stack.cli import train as _train_commands  # noqa: F401
from stage_stack.expert import read_header, read_metadata


def test_sampling_flags_reach_the_manifest(band, tmp_path):
    out = tmp_path / "song"
    experts = [f"--expert={name}={path}" for name, path in band.items()]
    result = CliRunner().invoke(cli, ["arrange", "--add", "drums", "--duration", "1", "-o", str(out), "-q",
                                      "--temperature", "0.7", "--top-k", "40", "--cfg", "1.5", *experts])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["add", str(out), "bass", "-q", "--top-k", "10", *experts])
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert layers[0]["sampling"] | {} == {"cfg_coef": 1.5, "temperature": 0.7, "top_k": 40, "top_p": 0.0,
                                         "greedy": False, "chord_temperature": None}
    assert (layers[1]["sampling"]["top_k"], layers[1]["sampling"]["temperature"]) == (10, 1.0)  # others: defaults
    result = CliRunner().invoke(cli, ["add", str(out), "keys", "--temperature", "0", *experts])
    assert result.exit_code == 2 and "--temperature" in result.output


def test_relabel(band, tmp_path):
    out = tmp_path / "organ.safetensors"
    result = CliRunner().invoke(cli, ["relabel", str(band["keys"]), str(out), "--instrument", "organ",
                                      "--default-prompt", "church organ"])
    assert result.exit_code == 0, result.output
    old, new = read_metadata(band["keys"]), read_metadata(out)
    assert (new.instrument, new.default_prompt) == ("organ", "church organ")
    assert new.model_dump(exclude={"instrument", "default_prompt"}) == old.model_dump(exclude={"instrument",
                                                                                                 "default_prompt"})
    assert read_header(out)[1] == read_header(band["keys"])[1]  # the same tensors
    from stage_stack import Arranger

    song = Arranger({"organ": out}).arrange(["organ"], duration=1.0)  # usable under its new name
    assert song.layers == ["organ"]
    result = CliRunner().invoke(cli, ["relabel", str(band["keys"]), str(out), "--instrument", "x"])
    assert result.exit_code == 1 and "already exists" in result.output
    assert read_metadata(out).instrument == "organ"


def test_demo_shows_progress(band, monkeypatch, tmp_path):
    """`stage-stack demo` shows the progress bars of `stage-stack arrange` (here on the tiny experts)."""
    import shutil

    import stage_stack.instruments as instruments

    weights = tmp_path / "weights"
    weights.mkdir()
    for name, path in band.items():
        shutil.copy(path, weights / f"{name}.safetensors")
    monkeypatch.setattr(instruments, "WEIGHTS_DIR", weights)
    result = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "demo"), "--duration", "1"])
    assert result.exit_code == 0, result.output
    for bar in ("layers: 100%", "3/3", "drums", "bass", "keys", "step"):
        assert bar in result.output, bar
    quiet = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "demo2"), "--duration", "1", "-q"])
    assert quiet.exit_code == 0 and "step" not in quiet.output


def test_training_data_doc_example_is_valid():
    import re
    from pathlib import Path

    from stage_stack.training.data import SongMetadata

    text = (Path(__file__).resolve().parents[1] / "docs" / "training-data.md").read_text()
    (example,) = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    metadata = SongMetadata.model_validate(json.loads(example))
    assert metadata.bpm == 120 and metadata.chords[0].root == 9


def test_tiny_training_config_is_valid():
    from pathlib import Path

    from stage_stack.training.config import TrainConfig, load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-bass.yaml", TrainConfig)
    assert config.schedule.max_steps == 60 and config.data.synth.n_songs == 6
