"""Built-in instrument plugins (installed as `stage_stack.instruments`): one module per family.

Every module here is loaded as a plugin (stage_stack.plugins), so a new family is one new file
with a `register_instruments` hook. Each instrument's expert source is its bundled demo expert,
`weights/<name>.safetensors` (also named, with its sha256, in the package's registry.yaml); until
that file exists the instrument shows as "not installed", with the command that installs another
expert.
"""

from __future__ import annotations

from pathlib import Path

from stage_stack.registry import PathSource

WEIGHTS_DIR = Path(__file__).parent / "weights"


def bundled_expert(name: str) -> PathSource:
    """The source for the demo expert that ships with stage-stack for this instrument.

    The package's registry.yaml names the same file and pins its sha256; this source is what
    the instrument falls back to under a registry config that gives it no sources.
    """
    return PathSource(
        path=str(WEIGHTS_DIR / f"{name}.safetensors"),
        get=(f"this install has no bundled demo expert for {name!r} (it ships in the stage-stack "
             "repository's instruments/weights/). Install an expert with\n"
             f"      stage-stack install {name} PATH_OR_URL"),
    )
