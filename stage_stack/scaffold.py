"""`stage-stack new-plugin NAME`: write a ready-to-install plugin package for one instrument.

    stage-stack-NAME/
        pyproject.toml          the `stage_stack` entry point NAME = stage_stack_NAME
        README.md               model card: YAML front matter with license and base_model
        stage_stack_NAME/__init__.py   the plugin: register_instruments
        stage_stack_NAME/weights/      the expert goes here (NAME.safetensors), shipped as package data
        tests/test_plugin.py    the plugin registers its instrument and an expert for it loads
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

from . import __version__
from .atomic import TEMP_MARK
from .errors import StageStackError

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "stage-stack plugin: a STAGE expert for $instrument"
readme = "README.md"
requires-python = ">=3.10"
license = "$license"
dependencies = ["stage-stack>=$stage_stack_version"]

# stage-stack finds plugins through this entry-point group; the name is the plugin's name in
# `stage-stack plugins` and in registry.yaml (`instruments: $instrument: plugin: $name`).
[project.entry-points.stage_stack]
$name = "$module"

[project.optional-dependencies]
test = ["pytest>=8"]

[tool.setuptools]
packages = ["$module"]

[tool.setuptools.package-data]
"$module" = ["weights/*.safetensors"]
''')

MODULE = Template('''\
"""stage-stack plugin: the "$instrument" instrument.

stage-stack loads this module through the `stage_stack` entry point in pyproject.toml and calls
its hooks. Check it with `stage-stack plugins` and `stage-stack instruments`.
"""

from pathlib import Path

import stage_stack
from stage_stack.registry import Instrument, PathSource

__version__ = "0.1.0"

# The expert ships inside this package. Put it here, then pin its sha256 below
# (`sha256sum $module/weights/$instrument.safetensors`) so `stage-stack doctor` can verify it.
WEIGHTS = Path(__file__).parent / "weights" / "$instrument.safetensors"
WEIGHTS_SHA256 = None


@stage_stack.hookimpl
def register_instruments(register):
    register(
        Instrument(
            name="$instrument",
            description=$description,
            default_prompt="",  # used when the user gives no prompt (text-conditioned experts only)
            default_gain_db=-3.0,  # mix gain of this stem
            chain_position=50,  # where it goes in a chain: drums 10, bass 20, keys 30, guitar 40
            license="$license",
            sources=[
                PathSource(path=str(WEIGHTS), sha256=WEIGHTS_SHA256,
                           get="reinstall $dist: it ships weights/$instrument.safetensors"),
                # A copy on a model hub, found in the local cache (never downloaded by stage-stack):
                # HubSource(hub="OWNER/$dist", filename="$instrument.safetensors", sha256="..."),
            ],
        )
    )
''')

README = Template('''\
---
license: $license_lower
base_model: $base_model_yaml
library_name: stage-stack
tags:
  - stage-stack
  - music
  - stem-generation
  - $instrument
---

# $dist

A [stage-stack](https://pypi.org/project/stage-stack/) plugin: a STAGE expert that generates a
**$instrument** stem that fits an existing mix.

## Model

- Instrument: `$instrument`
- Base model: `$base_model`
- License of the weights: $license
- Expert file: `$module/weights/$instrument.safetensors` (stage-stack expert format v1)

## Training data

Describe the stems the expert was fine-tuned on, their licenses, and how many hours.

## Training procedure

The `stage-stack train` config used, the number of steps, and the hardware.

## Evaluation

Beat F1 / rhythmic F1 / chord-tone share on held-out songs (`stage-stack eval`).

## Intended use and limitations

What it is good at, what it is not, and the styles it was not trained on.

## Usage

```bash
pip install $dist
stage-stack instruments          # lists "$instrument"
stage-stack arrange --bpm 120 --add drums,$instrument -o out/
```
''')

TEST = Template('''\
"""Tests for the $dist plugin. Run them with the plugin installed: pip install -e .[test] && pytest"""

from stage_stack.registry import Registry
from stage_stack.testing import make_tiny_expert

from $module import WEIGHTS


def test_the_plugin_registers_its_instrument():
    instrument = Registry.load().instrument("$instrument")
    assert instrument.plugin == "$name"
    assert instrument.sources[0].path == str(WEIGHTS)


def test_an_expert_for_the_instrument_loads(tmp_path):
    path = make_tiny_expert(tmp_path / "tiny.safetensors", instrument="$instrument")
    registry = Registry.load(overrides={"instruments": {"$instrument": {"sources": [{"path": str(path)}]}}})
    expert = registry.load_expert("$instrument")
    assert expert.instrument == "$instrument"
    assert expert.path == path


def test_the_bundled_expert_is_for_this_instrument():
    if not WEIGHTS.exists():
        import pytest

        pytest.skip(f"no bundled expert yet: put it at {WEIGHTS}")
    assert Registry.load().read_metadata("$instrument").instrument == "$instrument"
''')


# An SPDX id, or ids joined by AND / OR / WITH (pyproject's `project.license`; setuptools checks the ids).
SPDX_EXPRESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*( (AND|OR|WITH) [A-Za-z0-9][A-Za-z0-9.+-]*)*")


@dataclass(frozen=True)
class PluginNames:
    name: str  # plugin / entry-point name
    dist: str  # distribution (pip) name
    module: str  # import name
    instrument: str

    @classmethod
    def from_name(cls, name: str, instrument: str | None = None) -> "PluginNames":
        for what, value in (("plugin name", name), ("instrument name", instrument or name)):
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", value):
                raise StageStackError(f"{value!r} is not a valid {what}: use lowercase letters, digits and '-', "
                                      "starting with a letter (like 'synth-pads')")
        short = name.removeprefix("stage-stack-")
        return cls(name=short, dist=f"stage-stack-{short}", module="stage_stack_" + short.replace("-", "_"),
                   instrument=instrument or short)


def write_plugin(name: str, parent: str | Path = ".", instrument: str | None = None, license: str = "MIT",
                 base_model: str = "facebook/musicgen-small", description: str | None = None) -> Path:
    """Create `parent/stage-stack-NAME/` and return it; never overwrites an existing directory."""
    names = PluginNames.from_name(name, instrument)
    if not SPDX_EXPRESSION.fullmatch(license):
        raise StageStackError(f"--license {license!r} is not an SPDX license expression (like MIT, Apache-2.0, "
                              "CC-BY-4.0 or LicenseRef-Proprietary), which pyproject.toml needs")
    root = Path(parent) / names.dist
    if root.exists():
        raise StageStackError(f"{root} already exists; choose another name or --dir (nothing was written)")
    fields = dict(name=names.name, dist=names.dist, module=names.module, instrument=names.instrument,
                  license=license, license_lower=license.lower(), base_model=" ".join(base_model.split()),
                  # values that land in code or YAML are written as literals of that language, never
                  # pasted: any description (quotes, backslashes, newlines) gives valid Python
                  description=repr(description if description is not None else
                                   f"A STAGE expert for {names.instrument}."),
                  base_model_yaml=json.dumps(" ".join(base_model.split())),  # a JSON string is a YAML scalar
                  stage_stack_version=__version__)
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{names.module}/__init__.py": MODULE,
        "tests/test_plugin.py": TEST,
    }
    rendered = {relative: template.substitute(fields) for relative, template in files.items()}
    check_scaffold(rendered)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{names.dist}.{TEMP_MARK}-{os.getpid()}-", dir=root.parent))
    try:  # written beside the target and renamed: a failed write leaves no half a package
        for relative, text in rendered.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        (staging / names.module / "weights").mkdir()
        os.chmod(staging, 0o777 & ~_umask())
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_scaffold(files: dict[str, str]) -> None:
    """Every generated Python file compiles and pyproject.toml parses (StageStackError otherwise)."""
    import tomllib

    for relative, text in files.items():
        try:
            if relative.endswith(".py"):
                compile(text, relative, "exec")
            elif relative.endswith(".toml"):
                tomllib.loads(text)
        except (SyntaxError, tomllib.TOMLDecodeError) as e:
            raise StageStackError(f"new-plugin would write an invalid {relative} ({e}); nothing was written. "
                                  "This is a stage-stack bug: please report it with the options you used") from None
