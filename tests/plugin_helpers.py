"""Helpers shared by the registry / plugin tests: an isolated environment and fake installed plugins."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from stage_stack import registry as registry_module
from stage_stack.plugins import reset_plugins


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private cache, no user registry, no plugin dirs, no third-party plugins from the venv,
    and the package default registry without the bundled demo experts (a copy whose relative
    paths point into tmp_path), so tests see only the experts they make."""
    default = tmp_path / "package" / "registry.yaml"
    default.parent.mkdir()
    default.write_text(registry_module.package_config_path().read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(registry_module, "package_config_path", lambda: default)
    monkeypatch.setenv("STAGE_STACK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("STAGE_STACK_LOAD_PLUGINS", "")
    for name in ("STAGE_STACK_REGISTRY", "STAGE_STACK_PLUGINS_DIR", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    reset_plugins()
    yield tmp_path
    reset_plugins()


def write_plugin_file(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def instrument_plugin(instrument: str, source_path: str | Path | None = None, extra: str = "") -> str:
    """Source of a plugin file registering one instrument (optionally with a path source)."""
    sources = f"[PathSource(path={str(source_path)!r})]" if source_path else "[]"
    return f"""
        import stage_stack
        from stage_stack.registry import Instrument, PathSource

        @stage_stack.hookimpl
        def register_instruments(register):
            register(Instrument(name={instrument!r}, description="from a test plugin", sources={sources}))
        {extra}
    """


def install_dist_info(site: Path, monkeypatch, dist: str, version: str, entry_points: dict[str, str],
                      module_source: dict[str, str] | None = None) -> None:
    """Make `dist` look pip-installed: a *.dist-info with entry_points.txt on sys.path."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[stage_stack]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for module, source in (module_source or {}).items():
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


def forget_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_expert(tmp_path_factory):
    """make_tiny_expert, memoised: each distinct expert is built once per session and copied.

    Building one takes ~0.1-2 s depending on how busy the machine is; copying takes ~1 ms.
    """
    import shutil

    from stage_stack.testing import TINY_CODEC, make_tiny_expert

    built: dict[tuple, Path] = {}
    store = tmp_path_factory.mktemp("tiny-experts")

    def make(path: Path, instrument: str = "drums", seed: int = 0, codec_config=TINY_CODEC, **extra) -> Path:
        key = (instrument, seed, codec_config, tuple(sorted(extra.items())))
        if key not in built:
            built[key] = make_tiny_expert(store / f"{len(built)}.safetensors", instrument=instrument, seed=seed,
                                          codec_config=codec_config, **extra)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[key], path)
        return Path(path)

    return make
