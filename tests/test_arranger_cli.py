"""`stage-stack arrange / add / pick / redo / remove / mix / show`, and Arranger.from_registry."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
import yaml

from arranger_helpers import band, experts, run  # noqa: F401  (band: a fixture)
from plugin_helpers import isolated  # noqa: F401  (a private STAGE_STACK_HOME, no user registry)
from stage_stack import Arranger
from stage_stack.expert import sha256_file


def read(path):
    return sf.read(str(path), dtype="float32")[0]


def test_arrange_and_session_commands(band, isolated, tmp_path):
    out = tmp_path / "out"
    result = run("arrange", "--bpm", 120, "--add", "drums,bass", "--duration", 1, "--candidates", "bass=2",
                 "-o", out, *experts(band, "drums", "bass"))
    assert "layers: 100%" in result.stderr and "drums" in result.stderr  # tqdm bars: layers and steps
    assert "1. drums (drums)" in result.stdout and "candidate 0 of 2" in result.stdout
    assert (out / "stems/drums.wav").is_file() and (out / "mix.wav").is_file()

    again = run("arrange", "--bpm", 120, "--add", "drums,bass", "--duration", 1, "--candidates", "bass=2",
                "-o", out, *experts(band, "drums", "bass"))
    assert "resuming" in again.stderr and "2 layer(s) done, 0 to go" in again.stderr

    shown = run("show", out)
    assert "BPM 120, click none" in shown.stdout and "2. bass (bass)" in shown.stdout
    manifest = json.loads(run("show", out, "--json").stdout)
    assert [layer["name"] for layer in manifest["layers"]] == ["drums", "bass"]

    run("pick", out, "bass", 1, "-q")
    assert np.array_equal(read(out / "stems/bass.wav"), read(out / "candidates/bass/take1-1.wav"))

    added = run("add", out, "pad=keys", "--seed", 3, "--gain", -9, *experts(band, "keys"))
    assert "3. pad (keys)" in added.stdout and "seed 3, -9 dB" in added.stdout

    redone = run("redo", out, "drums", "--seed", 5)
    assert "take 2" in redone.stdout and "[stale" in redone.stdout
    assert "redo" in redone.stderr  # the note on how to bring stale layers up to date
    run("redo", out, "drums", "--seed", 6, "--downstream", "-q")
    assert "stale" not in run("show", out).stdout

    run("remove", out, "pad", "-q")
    before = read(out / "mix.wav")
    run("mix", out, "--gain", "bass=-12", "-q")
    assert not np.array_equal(before, read(out / "mix.wav"))
    assert "-12 dB" in run("show", out).stdout

    quiet = run("arrange", "--add", "drums", "--duration", 1, "-o", tmp_path / "quiet", "-q", *experts(band, "drums"))
    assert quiet.stdout == "" and quiet.stderr == ""


def test_arrange_from_manifest_is_bit_for_bit(band, isolated, tmp_path):
    out, again = tmp_path / "out", tmp_path / "again"
    run("arrange", "--bpm", 96, "--add", "drums,bass", "--duration", 1.5, "--seed", 4, "-o", out, "-q",
        *experts(band, "drums", "bass"))
    run("arrange", "--from", out / "manifest.json", "-o", again, "-q")
    for rel in ("mix.wav", "stems/drums.wav", "stems/bass.wav"):
        assert np.array_equal(read(out / rel), read(again / rel))
    first = json.loads((out / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["files"] == second["files"]
    assert [l["expert"]["sha256"] for l in second["layers"]] == [sha256_file(band["drums"]), sha256_file(band["bass"])]


def test_cli_errors(band, isolated, tmp_path):
    out = tmp_path / "out"
    bad = run("arrange", "--add", "drums,tuba", "-o", out, *experts(band, "drums"), ok=False)
    assert bad.exit_code == 1 and "Error: unknown instrument 'tuba'; known instruments:" in bad.output
    bad = run("arrange", "--bpm", 20, "--add", "drums", "-o", out, *experts(band, "drums"), ok=False)
    assert bad.exit_code == 1 and "outside 30-300" in bad.output
    bad = run("arrange", "--add", "drums", "--gain", "bass=-3", "-o", out, *experts(band, "drums"), ok=False)
    assert "--gain names layer(s) bass that are not arranged" in bad.output
    bad = run("arrange", "--add", "drums", "--context", tmp_path / "nope.wav", "-o", out, *experts(band, "drums"),
              ok=False)
    assert "nope.wav: no such file" in bad.output
    assert not out.exists()  # nothing was started

    run("arrange", "--add", "drums", "--duration", 1, "-o", out, "-q", *experts(band, "drums"))
    bad = run("arrange", "--add", "bass", "--duration", 1, "-o", out, "-q", *experts(band, "bass"), ok=False)
    assert "already holds another arrangement" in bad.output
    bad = run("pick", out, "drums", 4, ok=False)
    assert "has 1 candidate(s)" in bad.output
    bad = run("redo", out, "keys", ok=False)
    assert "no layer 'keys'; its layers are: drums" in bad.output
    bad = run("show", tmp_path, ok=False)
    assert "not an arrangement" in bad.output


def registry_file(tmp_path, band) -> str:
    config = {"version": 1, "chain": ["drums", "bass"], "instruments": {
        name: {"description": f"test {name}", "default_gain_db": gain,
               "sources": [{"path": str(band[name]), "sha256": sha256_file(band[name])}]}
        for name, gain in (("drums", -2.0), ("bass", -4.0))}}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_from_registry(band, isolated, tmp_path):
    arranger = Arranger.from_registry(user_file=registry_file(tmp_path, band))
    assert {"drums", "bass"} <= set(arranger.instruments)
    song = arranger.arrange(["drums", "bass"], bpm=120, duration=1.0, seed=0)
    assert [layer.gain_db for layer in song.manifest.layers] == [-2.0, -4.0]  # the registry's default gains
    assert song.manifest.registry.layers[-1].endswith("registry.yaml")
    assert song.manifest.layers[0].expert.origin == "registry"


def test_cli_with_the_registry_default_chain(band, isolated, tmp_path):
    out = tmp_path / "out"
    result = run("--registry", registry_file(tmp_path, band), "arrange", "--bpm", 120, "--duration", 1, "-o", out)
    assert "layers: drums, bass (the registry's default chain)" in result.stderr
    assert (out / "stems/bass.wav").is_file()
