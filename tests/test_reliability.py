"""Nothing lost, nothing touched outside the song (issue 10).

One regression test per numbered case of the fault audit (`test_caseNN_...`), then the
reliability suite: kill -9 at each phase of a layer commit, an install and a training step,
and concurrent writers on one song and on one installed.json. The figures (cases tried /
handled, kill trials / anything lost, concurrent runs / records lost) are printed at the end
of the module (`pytest -s`, or in the terminal summary) and kept honest by the asserts.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from arranger_helpers import SR, band, experts, run  # noqa: F401  (band: a fixture)
from plugin_helpers import isolated  # noqa: F401  (a private STAGE_STACK_HOME, no user registry)
from stage_stack import Arranger, Layer, Song
from stage_stack import history as song_history
from stage_stack import prune as song_prune
from stage_stack import undo as song_undo
from stage_stack.arrangement import Arrangement, audio_digest
from stage_stack.cli import arrange as _arrange_commands  # noqa: F401  (registers them on `cli`)
from stage_stack.cli import cli
from stage_stack.cli import registry as _registry_commands  # noqa: F401
from stage_stack.cli import train as _train_commands  # noqa: F401
from stage_stack.errors import ArrangementError, RegistryConfigError, StageStackError
from stage_stack.locks import LockBusyError

FIGURES = {"cases tried": 0, "cases handled": 0, "kill trials": 0, "kill trials that lost something": 0,
           "concurrent runs": 0, "records lost": 0}


@pytest.fixture(scope="module", autouse=True)
def print_figures(request):
    yield
    line = "reliability figures: " + ", ".join(f"{k} {v}" for k, v in FIGURES.items())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    else:
        print(line)


def case(handled: bool) -> bool:
    """Count one bad-input / fault case of the table (`handled`: clear error or correct result)."""
    FIGURES["cases tried"] += 1
    FIGURES["cases handled"] += bool(handled)
    return handled


def song_with(band, out, layers=("drums", "bass"), **kwargs) -> Song:
    return Arranger(band).arrange(list(layers), duration=1.0, out=out, **kwargs)


def edit_manifest(out: Path, change) -> None:
    data = json.loads((out / "manifest.json").read_text())
    change(data)
    (out / "manifest.json").write_text(json.dumps(data))


# -- 1. paths from files are confined ------------------------------------------------------------

@pytest.mark.parametrize("evil", ["../victim/thesis.txt", "<absolute>", "stems/../../victim/thesis.txt"])
def test_case01_a_manifest_cannot_name_files_outside_the_song(band, tmp_path, evil):
    victim = tmp_path / "victim" / "thesis.txt"
    victim.parent.mkdir()
    victim.write_text("four years of work")
    out = tmp_path / "song"
    song_with(band, out, layers=("drums",))
    evil = str(victim) if evil == "<absolute>" else evil
    edit_manifest(out, lambda m: m["files"].update({evil: "0" * 64}))
    result = run("mix", out, ok=False)
    assert case(result.exit_code == 1 and "field 'files." in result.output and victim.read_text() == "four years of work")
    with pytest.raises(ArrangementError, match="invalid arrangement manifest"):
        Song.open(out)
    assert victim.exists()


def test_case01_a_layer_name_or_candidate_path_cannot_escape(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=("drums",))
    edit_manifest(out, lambda m: m["layers"][0].update(name="../../x"))
    with pytest.raises(ArrangementError, match="layers.0.name"):
        Song.open(out)
    song_with(band, tmp_path / "song2", layers=("drums",))
    edit_manifest(tmp_path / "song2", lambda m: m["layers"][0]["files"].append("/etc/passwd"))
    with pytest.raises(ArrangementError, match="layers.0.files.1.*absolute path"):
        Song.open(tmp_path / "song2")
    case(True)


def test_case01_a_symlinked_folder_cannot_lead_writes_outside(band, tmp_path):
    out = tmp_path / "song"
    song = song_with(band, out, layers=("drums",))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "drums.wav").write_bytes(b"not yours")
    for path in (out / "stems").iterdir():
        path.unlink()
    (out / "stems").rmdir()
    (out / "stems").symlink_to(outside)
    with pytest.raises(StageStackError, match="outside"):
        song.pick("drums", 0, force=True)
    assert case((outside / "drums.wav").read_bytes() == b"not yours")


def test_case01_installed_json_cannot_name_files_outside_the_cache(isolated, tmp_path):
    from stage_stack.registry import InstalledIndex, paths

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    index = paths.experts_dir() / "installed.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps({"version": 1, "experts": {"drums": {
        "instrument": "drums", "file": "../../victim.txt", "sha256": "a" * 64, "size": 1, "source": "x",
        "installed_at": "now"}}}))
    with pytest.raises(RegistryConfigError, match="experts.drums.file.*'\\.\\.'"):
        InstalledIndex.read()
    assert case(victim.read_text() == "mine")


# -- 2. one writer at a time per song --------------------------------------------------------------

def test_case02_a_second_writer_fails_at_once_naming_the_process(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=("drums",))
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another process holds the song's lock until told to let go
        try:
            with Arrangement(out).lock():
                os.write(ready_w, b"1")
                os.read(release_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        result = run("mix", out, "--gain", "drums=-3", ok=False)
        assert result.exit_code == 1
        assert f"song {out} is being changed by process {pid}" in result.output and "--wait" in result.output
        with pytest.raises(LockBusyError, match=f"process {pid}"):
            Song.open(out)
    finally:
        os.write(release_w, b"1")
        assert _status(pid) == 0
    assert case(json.loads((out / "manifest.json").read_text())["layers"][0]["gain_db"] == 0.0)
    run("mix", out, "--gain", "drums=-3", "--wait")  # the lock is free again
    assert Song.open(out).manifest.layer("drums").gain_db == -3.0


def test_case02_a_session_that_read_an_older_revision_cannot_commit_over_a_newer_one(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=(Layer("drums", candidates=2), "bass"))
    first, second = Song.open(out), Song.open(out)
    first.pick("drums", 1)
    with pytest.raises(ArrangementError, match="changed by another process since this session read it"):
        second.remix({"bass": -6.0})
    on_disk = Song.open(out).manifest
    assert on_disk.layer("drums").picked == 1 and on_disk.layer("bass").gain_db == 0.0
    assert case(second.manifest.layer("bass").gain_db == 0.0)  # the refused change is undone in memory too


# -- 4. temp files: ours by name and pid -----------------------------------------------------------

def test_case04_user_files_that_look_like_temp_files_survive(band, tmp_path):
    out = tmp_path / "userdir"
    out.mkdir()
    (out / ".cache.tmp").write_text("a cache")
    (out / ".draft.tmp.wav").write_bytes(b"a draft")
    (out / "stems").mkdir()
    (out / "stems" / ".take.tmp.wav").write_bytes(b"another")
    run("arrange", "--add", "drums", "--duration", 1, "-o", out, "-q", *experts(band, "drums"))
    run("mix", out, "--gain", "drums=-2", "-q")
    assert case((out / ".cache.tmp").read_text() == "a cache" and (out / ".draft.tmp.wav").read_bytes() == b"a draft"
                and (out / "stems" / ".take.tmp.wav").read_bytes() == b"another")


# -- 5. hand edits are refused ------------------------------------------------------------------------

def test_case05_hand_edited_stems_and_mix_are_not_overwritten(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=(Layer("drums", candidates=2), "bass"))
    edited_mix = np.full(SR, 0.01, dtype=np.float32)
    sf.write(str(out / "mix.wav"), edited_mix, SR, subtype="FLOAT")
    result = run("mix", out, "--gain", "bass=-3", ok=False)
    assert result.exit_code == 1 and "mix.wav changed since stage-stack wrote it" in result.output
    assert "--force" in result.output
    assert np.array_equal(sf.read(str(out / "mix.wav"), dtype="float32")[0], edited_mix)

    sf.write(str(out / "stems/drums.wav"), edited_mix, SR, subtype="FLOAT")
    with pytest.warns(UserWarning, match="changed since stage-stack wrote it; it is kept"):
        song = Song.open(out)
    with pytest.raises(ArrangementError, match="stems/drums.wav"):
        song.pick("drums", 1)
    assert np.array_equal(sf.read(str(out / "stems/drums.wav"), dtype="float32")[0], edited_mix)
    run("pick", out, "drums", 1, "--force", "-q")
    m = Song.open(out).manifest
    assert case(audio_digest(out / "stems/drums.wav") == m.files["stems/drums.wav"] and m.layer("drums").picked == 1)


# -- 6. every take is kept; undo, history, prune ---------------------------------------------------

def test_case06_redo_keeps_the_old_take_and_undo_restores_it(band, tmp_path):
    out = tmp_path / "song"
    song = song_with(band, out, layers=(Layer("drums", candidates=2), Layer("bass", candidates=2)))
    song.pick("bass", 1)
    before = {rel: audio_digest(out / rel) for rel in ("mix.wav", "stems/drums.wav", "stems/bass.wav")}
    old_files = dict(song.manifest.files)

    run("redo", out, "drums", "--seed", 9, "--downstream", "-q")
    redone = Song.open(out).manifest
    assert [redone.layer(n).take for n in ("drums", "bass")] == [2, 2] and redone.layer("bass").picked == 0
    for rel in old_files:
        if rel.startswith("candidates/"):
            assert audio_digest(out / rel) == old_files[rel]  # the old takes are still on disk

    shown = run("show", out).stdout
    assert "candidates: candidates/drums/take2-0.wav*, candidates/drums/take2-1.wav" in shown
    assert "other takes (kept until `stage-stack prune`): candidates/drums/take1-0.wav" in shown

    listed = run("history", out).stdout
    assert listed.index("(current)") < listed.index("redo") < listed.index("pick bass 1")

    run("undo", out, "-q")
    back = Song.open(out)
    assert [back.manifest.layer(n).take for n in ("drums", "bass")] == [1, 1]
    assert back.manifest.layer("bass").picked == 1  # --downstream's reset pick is restored too
    assert {rel: audio_digest(out / rel) for rel in before} == before
    assert back.manifest.history[-1].action == "undo"

    song_undo(out)  # back before the pick
    assert Song.open(out).manifest.layer("bass").picked == 0
    assert [r.action for r in song_history(out)] == ["undo"]  # the first state: nothing before it
    with pytest.raises(ArrangementError, match="nothing to undo"):
        song_undo(out)

    # a new redo never overwrites the takes of the undone change: it gets take 3
    Arranger(band).redo(Song.open(out), "drums", seed=1)
    assert Song.open(out).manifest.layer("drums").take == 3
    assert (out / "candidates/drums/take2-0.wav").is_file()

    removed = song_prune(out)
    assert "candidates/drums/take2-0.wav" in removed and "candidates/drums/take1-0.wav" in removed
    assert not (out / "history").exists() or not any((out / "history").iterdir())
    assert sorted(p.name for p in (out / "candidates/drums").iterdir()) == ["take3-0.wav", "take3-1.wav"]
    with pytest.raises(ArrangementError, match="nothing to undo"):
        song_undo(out)
    assert case(Song.open(out).layers == ["drums", "bass"])


def test_case06_remove_can_be_undone(band, tmp_path):
    out = tmp_path / "song"
    song = song_with(band, out)
    stem = audio_digest(out / "stems/bass.wav")
    song.remove("bass")
    assert not (out / "stems/bass.wav").exists() and (out / "candidates/bass/take1-0.wav").is_file()
    song.undo()
    assert case(song.layers == ["drums", "bass"] and audio_digest(out / "stems/bass.wav") == stem)


# -- 7. a deleted candidate is not a dead end -------------------------------------------------------

def test_case07_redo_regenerates_a_layer_whose_candidate_was_deleted(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out)
    (out / "candidates/bass/take1-0.wav").unlink()
    result = run("mix", out, ok=False)
    assert result.exit_code == 1 and "stage-stack redo" in result.output
    run("redo", out, "bass", "--seed", 3, "-q", *experts(band, "bass"))
    song = Song.open(out)
    assert song.damaged == {} and song.manifest.layer("bass").take == 2
    assert case(audio_digest(out / "stems/bass.wav") == song.manifest.files["stems/bass.wav"])


# -- 8. a gain change marks later layers stale; --from reproduces what was heard ----------------------

def test_case08_gain_changes_mark_later_layers_stale_and_reproduce_hears_the_recorded_gain(band, tmp_path):
    out = tmp_path / "song"
    arranger = Arranger(band)
    song = arranger.arrange([Layer("drums", gain_db=-2.0), "bass"], duration=1.0, out=out)
    song.remix({"drums": -3.0})
    assert song.stale == ["bass"] and "[stale" in run("show", out).stdout
    song.remix({"bass": -1.0})  # the last layer's gain changes nothing anyone heard
    assert song.stale == ["bass"]

    again = Arranger({}).reproduce(out / "manifest.json", out=tmp_path / "again")
    assert np.array_equal(again.candidates["bass"], song.candidates["bass"])  # bass heard drums at -2 dB
    assert again.manifest.layer("drums").gain_db == -3.0 and again.stale == ["bass"]
    assert case(np.array_equal(again.mix, song.mix))


# -- 9. training resumes exactly, wherever the Ctrl-C falls --------------------------------------------

def _train_weights(run: Path) -> dict:
    import torch

    from stage_stack.training.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run))
    return {"step": state["step"], "model": state["model"], "exp_avg": {
        k: v["exp_avg"] for k, v in state["optimizer"]["state"].items()}, "history": state["history"],
        "torch": torch}


def _interrupt_at(monkeypatch, phase: str, signal_it: bool):
    """Make step 3 (6 for a non-signal KeyboardInterrupt) of a run stop at `phase`."""
    import signal

    import torch

    from stage_stack.training.train import Trainer

    def stop():
        if signal_it:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered at the next bytecode
        else:
            raise KeyboardInterrupt  # a second Ctrl-C: stops at once, mid-step

    at = 3 if signal_it else 6
    if phase == "forward":
        real = Trainer.losses  # the training forward (the LM loss and any auxiliary one)

        def losses(self, batch, train, micro=0, **kw):
            if train and self.step == at - 1:
                stop()
            return real(self, batch, train, micro, **kw)
        monkeypatch.setattr(Trainer, "losses", losses)
    elif phase == "after optimizer.step":
        real_step = torch.optim.lr_scheduler.LambdaLR.step

        def step(self, *a, **kw):
            if self.last_epoch == at - 1:
                stop()
            return real_step(self, *a, **kw)
        monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
    elif phase == "validation":
        real_validate = Trainer.validate

        def validate(self):
            if self.step == 4:
                stop()
            return real_validate(self)
        monkeypatch.setattr(Trainer, "validate", validate)


@pytest.mark.parametrize("phase,signal_it", [("forward", True), ("after optimizer.step", True),
                                             ("validation", True), ("after optimizer.step", False)])
def test_case09_training_resumes_exactly_from_an_interruption_anywhere_in_a_step(tmp_path, monkeypatch, phase,
                                                                                  signal_it):
    from test_train import make_config

    from stage_stack.training.train import train

    shared = {"root": _train_root(tmp_path)}
    train(make_config(shared, tmp_path / "straight"), progress=False, export=False)
    config = make_config(shared, tmp_path / "run")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, phase, signal_it)
        with pytest.raises(KeyboardInterrupt):
            train(config, progress=False, export=False)
    train(config, resume=True, progress=False, export=False)
    a, b = _train_weights(tmp_path / "straight"), _train_weights(tmp_path / "run")
    torch = a["torch"]
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    differ += [k for k in a["exp_avg"] if not torch.equal(a["exp_avg"][k], b["exp_avg"][k])]
    assert a["step"] == b["step"] == 8 and a["history"] == b["history"]
    assert case(differ == []), differ


def test_case09_resume_without_a_run_says_so(tmp_path):
    from test_train import make_config

    from stage_stack.training.train import train

    config = make_config({"root": _train_root(tmp_path)}, tmp_path / "never-started")
    with pytest.raises(StageStackError, match="nothing to resume: .*never-started holds no checkpoints"):
        train(config, resume=True, progress=False, export=False)
    assert case(not (tmp_path / "never-started").exists())


_TRAIN_ROOT: list[Path] = []


def _train_root(tmp_path: Path) -> Path:
    """The tiny training set-up of tests/test_train.py (codec file; songs and cache made once)."""
    if not _TRAIN_ROOT:
        from stage_stack.expert import save_codec
        from stage_stack.testing import tiny_codec

        root = tmp_path.parent / "reliability-train"
        root.mkdir(exist_ok=True)
        save_codec(root / "codec.safetensors", tiny_codec(), id="tiny")
        _TRAIN_ROOT.append(root)
    return _TRAIN_ROOT[0]


# -- 10. truncated audio ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["WAV", "MP3"])
def test_case10_a_file_cut_short_is_reported(tmp_path, fmt):
    from stage_stack.audio import TruncatedAudioWarning
    from stage_stack.inputs import read_context_file

    audio = (np.random.default_rng(0).standard_normal(44100 * 4) * 0.1).astype(np.float32)
    path = tmp_path / f"mix.{fmt.lower()}"
    try:
        sf.write(str(path), audio, 44100, format=fmt)
    except (sf.LibsndfileError, TypeError, ValueError):
        pytest.skip(f"this libsndfile cannot write {fmt}")
    whole = read_context_file(path)  # no warning for a whole file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(TruncatedAudioWarning, match="header says 4.00 s: the file was cut short"):
        cut = read_context_file(path)
    assert case(cut.seconds < whole.seconds / 1.5)


# -- 11. the sample rate is checked in one place ---------------------------------------------------

@pytest.mark.parametrize("rate", ["1", "0", "-44100"])
def test_case11_a_bad_sample_rate_is_refused(band, tmp_path, rate):
    out = tmp_path / "song"
    result = run("arrange", "--add", "drums", "--duration", 1, "--sample-rate", rate, "-o", out,
                 *experts(band, "drums"), ok=False)
    assert result.exit_code == 1 and f"sample rate {rate} Hz is outside 4000-384000 Hz" in result.output
    assert case(not out.exists() and "Traceback" not in result.output)


# -- 12. new-plugin writes valid code whatever the description --------------------------------------

@pytest.mark.parametrize("description", ["x\\", "two\nlines", "quotes ' \" and \"\"\" too"])
def test_case12_new_plugin_writes_valid_python_for_any_description(tmp_path, description):
    import ast

    from stage_stack.scaffold import write_plugin

    root = write_plugin("pads", tmp_path, description=description, base_model="a: b\nc")
    module = root / "stage_stack_pads" / "__init__.py"
    tree = ast.parse(module.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "description"]
    assert [ast.literal_eval(k.value) for k in calls] == [description]
    for path in root.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    import yaml

    front = yaml.safe_load(root.joinpath("README.md").read_text().split("---")[1])
    assert case(front["base_model"] == "a: b c")


def test_case12_an_invalid_scaffold_is_never_written():
    from stage_stack.scaffold import check_scaffold

    with pytest.raises(StageStackError, match="invalid x/__init__.py"):
        check_scaffold({"x/__init__.py": "def f(:\n"})
    case(True)


# -- 13. safetensors offsets -------------------------------------------------------------------------

def _overlapping(src: Path, dest: Path) -> Path:
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    tensors = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    (_, first), (_, second) = tensors[0], tensors[1]
    begin, end = header[second]["data_offsets"]
    shift = min(4, header[first]["data_offsets"][1] - header[first]["data_offsets"][0])
    header[second]["data_offsets"] = [begin - shift, end - shift]  # overlaps the first tensor
    text = json.dumps(header).encode()
    dest.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return dest


def test_case13_overlapping_offsets_are_refused_before_anything_is_written(band, isolated, tmp_path):
    bad = _overlapping(band["drums"], tmp_path / "bad.safetensors")
    out = tmp_path / "song"
    result = run("arrange", "--add", "drums", "--duration", 1, "-o", out, "--expert", f"drums={bad}", ok=False)
    assert result.exit_code == 1 and "bad.safetensors: not a valid safetensors file" in result.output
    assert "overlaps the tensor before it" in result.output and not out.exists()
    installed = run("install", "drums", bad, ok=False)
    assert installed.exit_code == 1 and "overlaps" in installed.output and "Traceback" not in installed.output
    assert case(not (isolated / "home" / "experts" / "installed.json").exists())


# -- 14. plugin conflicts are explained ---------------------------------------------------------------

def test_case14_conflicting_plugins_are_named_with_the_fix(isolated, tmp_path):
    from plugin_helpers import instrument_plugin, write_plugin_file

    plugins = tmp_path / "plugins"
    write_plugin_file(plugins, "pads_one", instrument_plugin("pads"))
    write_plugin_file(plugins, "pads_two", instrument_plugin("pads"))
    write_plugin_file(plugins, "my_drums", instrument_plugin("drums"))
    for instrument in ("pads", "drums"):
        result = run("--plugins-dir", plugins, "arrange", "--add", instrument, "-o", tmp_path / "song", ok=False)
        assert result.exit_code == 1, result.output
        assert f"instrument {instrument!r} is registered by 2 plugins" in result.output, result.output
        assert "instruments:" in result.output and "plugin:" in result.output
        assert "unknown instrument" not in result.output
    case(True)


# -- 15. small errors that were unclear ---------------------------------------------------------------

def test_case15_pick_with_a_negative_candidate(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=(Layer("drums", candidates=2),))
    result = run("pick", out, "drums", "-1", ok=False)
    assert case(result.exit_code == 1 and "has 2 candidate(s), numbered 0 to 1; got -1" in result.output)


def test_case15_adding_an_existing_layer_names_the_add_command(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=("drums",))
    result = run("add", out, "drums", *experts(band, "drums"), ok=False)
    assert "--add" not in result.output
    assert case(result.exit_code == 1 and "stage-stack add SONG drums2=drums" in result.output)


def test_case15_install_sha256_case_and_directories(band, isolated, tmp_path):
    from stage_stack.expert import sha256_file

    digest = sha256_file(band["drums"]).upper()
    run("install", "drums", band["drums"], "--sha256", digest, "--force")
    folder = run("install", "drums", band["drums"].parent, ok=False)
    assert folder.exit_code == 1 and "is a directory; give the expert file itself" in folder.output
    assert "drums.safetensors" in folder.output
    bad = run("install", "drums", band["drums"], "--sha256", "abc", ok=False)
    assert case(bad.exit_code == 1 and "is not a sha256: expected 64 hex digits" in bad.output)


def test_case15_an_empty_data_folder_is_named(tmp_path):
    from test_train import make_config

    from stage_stack.training.train import train

    empty = tmp_path / "songs"
    empty.mkdir()
    config = make_config({"root": _train_root(tmp_path)}, tmp_path / "run",
                         data={"root": str(empty), "synth": None, "cache": str(tmp_path / "cache")})
    with pytest.raises(StageStackError) as error:
        train(config, progress=False, export=False)
    assert case(str(error.value).startswith(f"{empty}: the training data folder holds no song with a 'drums' stem"))


def test_case15_files_are_written_with_the_umask_mode(band, tmp_path):
    from stage_stack.expert import load_expert, save_expert

    expert = load_expert(band["drums"])
    old = os.umask(0o022)
    try:
        path = save_expert(tmp_path / "x.safetensors", expert.metadata, expert.lm, expert.codec)
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    assert case(oct(path.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777) == "0o644")


# -- 16. torch's weights_only=False advice is not passed on --------------------------------------------

def test_case16_a_checkpoint_holding_code_is_refused_without_the_advice(tmp_path):
    import torch

    from stage_stack.training.checkpoint import load_checkpoint

    path = tmp_path / "step-00000001.pt"
    torch.save({"model": {}, "thing": textwrap.TextWrapper()}, path)
    with pytest.raises(StageStackError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "code that would run when it is loaded; stage-stack does not load such files" in message
    assert case("weights_only" not in message and "False" not in message)


# == the reliability suite: kill -9 at each phase, concurrent writers ====================================
#
# The writers run in forked children of the test process (torch is imported once, so a trial costs
# what the work costs); a kill trial's child sets STAGE_STACK_KILL_AT and SIGKILLs itself there.

COMMIT_PHASES = ["commit:writing", "commit:before-manifest", "commit:after-manifest", "commit:after-renames"]


def in_child(work, kill_at: str | None = None, log: Path | None = None) -> int:
    """Run `work()` in a forked child; its exit status (-9 when it was killed). `log` gets its errors."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            from stage_stack import faults

            faults._reached.clear()
            if kill_at is not None:
                os.environ[faults.ENV] = kill_at
            status = work() or 0
        except BaseException:
            import traceback

            if log is not None:
                log.write_text(traceback.format_exc())
        finally:
            os._exit(status)
    return _status(pid)


def _status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def cli_in_child(args, log: Path, kill_at: str | None = None) -> int:
    def work():
        result = CliRunner().invoke(cli, [str(a) for a in args])
        log.write_text(result.output + (repr(result.exception) if result.exit_code not in (0, 1) else ""))
        return result.exit_code
    return in_child(work, kill_at, log)


def _song_state(out: Path) -> dict:
    """{file: digest} of every file the song's manifest names, checked to be on disk as recorded."""
    song = Song.open(out)
    assert song.damaged == {}
    for rel, digest in song.manifest.files.items():
        assert audio_digest(out / rel) == digest, rel
    leftovers = [p.name for p in out.rglob("*") if ".stage-stack-" in p.name]
    assert leftovers == [], leftovers
    return dict(song.manifest.files)


def _lost(out: Path, before: dict) -> bool:
    """Whether a take or the context of the earlier state is gone from disk or changed (stems and
    the mix are re-rendered when the song changes)."""
    for rel, digest in before.items():
        if rel.startswith(("candidates/", "context.wav")):
            if not (out / rel).is_file() or audio_digest(out / rel) != digest:
                return True
    return False


@pytest.mark.parametrize("command,phase", [("add", p) for p in COMMIT_PHASES] + [("redo", "commit:after-manifest")])
def test_kill_9_during_a_layer_commit_loses_nothing(band, tmp_path, command, phase):
    out = tmp_path / "song"
    song_with(band, out, layers=("drums", "bass") if command == "redo" else ("drums",))
    (out / "notes.txt").write_text("the user's")
    before = _song_state(out)
    args = ["add", out, "keys"] if command == "add" else ["redo", out, "bass", "--seed", "5"]
    args += ["-q", *experts(band, "drums", "bass", "keys")]
    assert cli_in_child(args, tmp_path / "killed.log", kill_at=phase) == -9
    after = _song_state(out)
    committed = phase in ("commit:after-manifest", "commit:after-renames")
    if command == "add":
        assert Song.open(out).layers == (["drums", "keys"] if committed else ["drums"])
    else:
        assert Song.open(out).manifest.layer("bass").take == (2 if committed else 1)
    lost = _lost(out, before) or (out / "notes.txt").read_text() != "the user's"
    FIGURES["kill trials"] += 1
    FIGURES["kill trials that lost something"] += lost
    assert not lost and after
    rerun = run(*args, ok=False)
    if command == "add" and committed:  # the layer is there: adding it again is refused, clearly
        assert rerun.exit_code == 1 and "already has a layer named 'keys'" in rerun.output
    else:
        assert rerun.exit_code == 0, rerun.output
    case(True)


def _install_in_child(instrument: str, path: Path, tmp_path: Path, kill_at: str | None = None) -> int:
    return cli_in_child(["install", instrument, path, "--force"], tmp_path / f"install-{instrument}.log", kill_at)


def _index(home: Path) -> dict:
    return json.loads((home / "experts" / "installed.json").read_text())["experts"]


def _copies(home: Path) -> list[str]:
    return sorted(p.relative_to(home / "experts").as_posix() for p in (home / "experts").glob("*/*.safetensors"))


@pytest.mark.parametrize("phase", ["install:copied", "install:indexed"])
def test_kill_9_during_an_install_loses_no_record_and_leaves_no_orphan(band, isolated, tmp_path, phase):
    from arranger_helpers import FAST_CODEC, SHORT_WINDOW
    from stage_stack.testing import make_tiny_expert

    home = isolated / "home"
    run("install", "keys", band["keys"], "--force")
    run("install", "drums", band["drums"], "--force")
    new_drums = make_tiny_expert(tmp_path / "drums2.safetensors", instrument="drums", seed=3, codec_config=FAST_CODEC,
                                 training=SHORT_WINDOW)
    assert _install_in_child("drums", new_drums, tmp_path, kill_at=phase) == -9
    index = _index(home)  # readable, and every record still names a file that is there
    lost = set(index) != {"keys", "drums"} or not all((home / "experts" / r["file"]).is_file() for r in index.values())
    FIGURES["kill trials"] += 1
    FIGURES["kill trials that lost something"] += lost
    assert not lost
    run("install", "bass", band["bass"], "--force")
    index = _index(home)
    assert _copies(home) == sorted(r["file"] for r in index.values())  # the half-done install's copy is gone
    assert case(set(index) == {"keys", "drums", "bass"})


def test_case03_concurrent_installs_keep_every_record_and_no_orphan(band, isolated, tmp_path):
    from arranger_helpers import FAST_CODEC, SHORT_WINDOW
    from stage_stack.testing import make_tiny_expert

    home = isolated / "home"
    other_drums = make_tiny_expert(tmp_path / "drums2.safetensors", instrument="drums", seed=7, codec_config=FAST_CODEC,
                                   training=SHORT_WINDOW)
    jobs = [("drums", band["drums"]), ("bass", band["bass"]), ("keys", band["keys"]), ("drums", other_drums)]
    pids = []
    for i, (instrument, path) in enumerate(jobs):
        log = tmp_path / f"job{i}.log"
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                result = CliRunner().invoke(cli, ["install", instrument, str(path), "--force"])
                log.write_text(result.output)
                status = result.exit_code
            finally:
                os._exit(status)
        pids.append(pid)
    statuses = [_status(pid) for pid in pids]
    assert statuses == [0] * len(jobs), [(tmp_path / f"job{i}.log").read_text() for i in range(len(jobs))]
    index = _index(home)
    FIGURES["concurrent runs"] += len(jobs)
    FIGURES["records lost"] += len({"drums", "bass", "keys"} - set(index))
    assert set(index) == {"drums", "bass", "keys"}
    assert _copies(home) == sorted(record["file"] for record in index.values())  # no orphaned expert file
    assert case(all((home / "experts" / r["file"]).is_file() for r in index.values()))


_STRAIGHT: dict = {}


@pytest.mark.parametrize("phase", ["train:step@6", "train:stepped@6", "checkpoint:before-rename@2"])
def test_kill_9_during_training_resumes_exactly(tmp_path, phase):
    from test_train import make_config

    from stage_stack.training.train import train

    shared = {"root": _train_root(tmp_path)}
    if not _STRAIGHT:
        train(make_config(shared, tmp_path.parent / "straight-run"), progress=False, export=False)
        _STRAIGHT.update(_train_weights(tmp_path.parent / "straight-run"))
    run_dir = tmp_path / "run"
    status = in_child(lambda: train(make_config(shared, run_dir), progress=False, export=False) and 0,
                      kill_at=phase, log=tmp_path / "train.log")
    assert status == -9, (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else status
    train(make_config(shared, run_dir), resume=True, progress=False, export=False)
    got = _train_weights(run_dir)
    torch = got["torch"]
    lost = got["step"] != 8 or got["history"] != _STRAIGHT["history"] or \
        any(not torch.equal(_STRAIGHT["model"][k], got["model"][k]) for k in got["model"])
    FIGURES["kill trials"] += 1
    FIGURES["kill trials that lost something"] += lost
    assert case(not lost)


def test_concurrent_writers_on_one_song_lose_nothing(band, tmp_path):
    out = tmp_path / "song"
    song_with(band, out, layers=("drums",))
    waiting = [f"keys{i}=keys" for i in range(3)]
    impatient = [f"pad{i}=keys" for i in range(2)]
    pids = {}
    for layer in waiting + impatient:
        log = tmp_path / f"{layer.split('=')[0]}.log"
        args = ["add", out, layer, "-q", *(["--wait"] if layer in waiting else []), *experts(band, "keys")]
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                result = CliRunner().invoke(cli, [str(a) for a in args])
                log.write_text(result.output)
                status = result.exit_code
            finally:
                os._exit(status)
        pids[layer] = pid
    results = {layer: (_status(pid), (tmp_path / f"{layer.split('=')[0]}.log").read_text())
               for layer, pid in pids.items()}
    song = Song.open(out)
    present = set(song.layers)
    succeeded = {layer.split("=")[0] for layer, (rc, _) in results.items() if rc == 0}
    for layer, (rc, output) in results.items():
        if rc != 0:  # only a writer that did not wait may fail, and it says who is in the way
            assert layer in impatient and "is being changed by process" in output, output
    assert {f"keys{i}" for i in range(3)} <= succeeded
    FIGURES["concurrent runs"] += len(pids)
    FIGURES["records lost"] += len(succeeded - present)
    assert succeeded <= present and present == {"drums"} | succeeded
    assert case(_song_state(out) == song.manifest.files)
