"""`stage-stack new-plugin`: the scaffold, and the round trip scaffold -> installed plugin -> registry
finds it -> its expert loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import stage_stack
import stage_stack.cli.registry  # noqa: F401  (registers the commands)
from plugin_helpers import forget_modules, install_dist_info, isolated, tiny_expert  # noqa: F401
from stage_stack.cli import cli
from stage_stack.errors import StageStackError
from stage_stack.plugins import ENTRY_POINT, load_plugins
from stage_stack.registry import Registry
from stage_stack.scaffold import write_plugin

REPO = Path(__file__).resolve().parents[1]


def new_plugin(parent: Path, *args: str) -> Path:
    result = CliRunner().invoke(cli, ["new-plugin", *args, "--dir", str(parent)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return parent


def test_scaffold_files(isolated):
    new_plugin(isolated, "synth-pads", "--license", "CC-BY-4.0", "--base-model", "none",
               "--description", 'lush "analog" pads')
    root = isolated / "stage-stack-synth-pads"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "README.md", "pyproject.toml", "stage_stack_synth_pads", "stage_stack_synth_pads/__init__.py",
        "stage_stack_synth_pads/weights", "tests", "tests/test_plugin.py"]

    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "stage-stack-synth-pads"
    assert project["project"]["license"] == "CC-BY-4.0"
    assert project["project"]["entry-points"]["stage_stack"] == {"synth-pads": "stage_stack_synth_pads"}
    assert project["project"]["dependencies"] == [f"stage-stack>={stage_stack.__version__}"]
    assert project["tool"]["setuptools"]["package-data"] == {"stage_stack_synth_pads": ["weights/*.safetensors"]}

    readme = (root / "README.md").read_text()
    front_matter = yaml.safe_load(readme.split("---\n")[1])
    assert front_matter["license"] == "cc-by-4.0" and front_matter["base_model"] == "none"
    assert "synth-pads" in front_matter["tags"]

    for path in (root / "stage_stack_synth_pads" / "__init__.py", root / "tests" / "test_plugin.py"):
        compile(path.read_text(), str(path), "exec")  # valid Python after substitution
    assert """description='lush "analog" pads'""" in (root / "stage_stack_synth_pads" / "__init__.py").read_text()


def test_scaffold_never_overwrites_and_checks_names(isolated):
    root = write_plugin("pads", isolated)
    (root / "README.md").write_text("my notes")
    with pytest.raises(StageStackError, match="already exists"):
        write_plugin("pads", isolated)
    assert (root / "README.md").read_text() == "my notes"
    for bad in ("Pads", "9lives", "pads!", ""):
        with pytest.raises(StageStackError, match="not a valid plugin name"):
            write_plugin(bad, isolated)
    with pytest.raises(StageStackError, match="not a valid instrument name"):
        write_plugin("ok", isolated, instrument="Bad Name")
    with pytest.raises(StageStackError, match="not an SPDX license expression"):
        write_plugin("ok", isolated, license="all rights reserved")
    assert not (isolated / "stage-stack-ok").exists()
    result = CliRunner().invoke(cli, ["new-plugin", "pads", "--dir", str(isolated)])
    assert result.exit_code == 1 and "already exists" in result.stderr


def test_new_plugin_round_trip(isolated, monkeypatch, tiny_expert):
    """Scaffold -> 'installed' (a dist-info built from its pyproject, on sys.path) -> registry -> expert."""
    root = new_plugin(isolated, "synth-pads", "--instrument", "pads") / "stage-stack-synth-pads"
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    forget_modules("stage_stack_synth_pads")
    install_dist_info(root, monkeypatch, project["name"], project["version"], project["entry-points"]["stage_stack"])
    weights = tiny_expert(root / "stage_stack_synth_pads" / "weights" / "pads.safetensors", instrument="pads")
    monkeypatch.setenv("STAGE_STACK_LOAD_PLUGINS", "stage-stack-synth-pads")

    plugins = load_plugins()
    info = plugins.info("synth-pads")
    assert (info.source, info.version) == (ENTRY_POINT, "0.1.0")
    assert plugins.hooks("synth-pads") == ["register_instruments"]
    assert plugins.failures == []

    registry = Registry.load(plugins=plugins)
    pads = registry.instrument("pads")
    assert pads.plugin == "synth-pads" and pads.license == "MIT"
    assert registry.resolve_expert("pads").path == weights
    expert = registry.load_expert("pads")
    assert expert.instrument == "pads" and expert.path == weights

    result = CliRunner().invoke(cli, ["instruments"], catch_exceptions=False)
    row = next(line for line in result.stdout.splitlines() if line.startswith("pads "))
    assert "synth-pads" in row and "installed" in row and str(weights) in row
    forget_modules("stage_stack_synth_pads")


@pytest.mark.slow
def test_new_plugin_pip_install_and_its_own_tests(isolated, tiny_expert):
    """The scaffold really installs with pip (entry point, package data) and its generated tests pass."""
    root = new_plugin(isolated, "tubular-bells") / "stage-stack-tubular-bells"
    tiny_expert(root / "stage_stack_tubular_bells" / "weights" / "tubular-bells.safetensors",
                instrument="tubular-bells")
    target = isolated / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(root)], check=True, capture_output=True)
    assert (target / "stage_stack_tubular_bells" / "weights" / "tubular-bells.safetensors").is_file()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]),
           "STAGE_STACK_HOME": str(isolated / "home")}
    env.pop("STAGE_STACK_LOAD_PLUGINS", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                            cwd=isolated, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout

    listing = subprocess.run([str(Path(sys.executable).parent / "stage-stack"), "instruments", "--json"],
                             env=env, capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(listing.stdout)["instruments"]}
    assert rows["tubular-bells"]["plugin"] == "tubular-bells" and rows["tubular-bells"]["installed"] is True
