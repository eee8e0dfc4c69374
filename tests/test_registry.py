"""registry.yaml (package default, layering, validation), expert resolution, install and cache,
codec install, compatibility checks."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

import stage_stack.cli.registry  # noqa: F401  (registers the commands)
import stage_stack.registry  # the isolated fixture swaps its package_config_path
from plugin_helpers import isolated, tiny_expert  # noqa: F401
from stage_stack import paths
from stage_stack.cli import cli
from stage_stack.errors import (ExpertFormatError, ExpertNotInstalledError, IncompatibleExpertError, IntegrityError,
                                RegistryConfigError, StageStackError, UnknownInstrumentError)
from stage_stack.expert import WeightsRef, read_metadata, save_codec, save_expert, sha256_file
from stage_stack.registry import (CONFIG_PLUGIN, HubSource, InstalledIndex, Instrument, PathSource, Registry,
                                  UrlSource, check_compatible, install_codec, package_config_path)
from stage_stack.testing import TINY_CODEC, TINY_LM, expert_metadata, tiny_codec, tiny_lm

REPO = Path(__file__).resolve().parents[1]
OTHER_CODEC = dataclasses.replace(TINY_CODEC, sample_rate=24000)  # same shapes, another rate


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# -- package default --------------------------------------------------------------------------

def test_package_default_registers_the_builtin_families(isolated):
    registry = Registry.load(default_file=package_config_path())  # the real one, bundled experts and all
    assert registry.layers == [str(package_config_path())]
    assert registry.names == ["drums", "keys", "bass", "guitar"]  # by chain position
    assert registry.default_chain == ["drums", "keys", "bass"]
    assert [registry.instrument(n).chain_position for n in registry.names] == [10, 20, 30, 40]
    for name in registry.names:
        instrument = registry.instrument(name)
        assert instrument.plugin == f"stage_stack.instruments.{name}"
        assert instrument.description and instrument.default_prompt and instrument.license == "MIT"
        assert -60 <= instrument.default_gain_db <= 0
        # registry.yaml names the bundled file, relative to its real location (the repo root here)
        [source] = instrument.sources
        assert Path(source.path) == REPO / "instruments" / "weights" / f"{name}.safetensors"
    assert registry.problems == []


def test_shipped_registry_yaml_is_the_repo_root_file():
    assert package_config_path().read_bytes() == (REPO / "registry.yaml").read_bytes()


def test_relative_paths_follow_links_to_the_real_file(isolated):
    real = write(isolated / "repo" / "registry.yaml",
                 "instruments:\n  drums:\n    sources: [{path: w/d.safetensors}]\n")
    link = isolated / "repo" / "pkg" / "registry.yaml"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "registry.yaml")
    [source] = Registry.load(default_file=link).instrument("drums").sources
    assert Path(source.path) == real.parent / "w" / "d.safetensors"


@pytest.fixture
def plugin_sources_only(isolated):
    """A package default that sets no sources, so the built-in plugins' own sources apply."""
    return write(isolated / "default.yaml", "version: 1\nchain: [drums, bass, keys]\n")


def test_builtin_plugin_source_is_the_bundled_file(plugin_sources_only):
    registry = Registry.load(default_file=plugin_sources_only)
    import stage_stack.instruments as builtin

    for name in registry.names:
        [source] = registry.instrument(name).sources
        assert Path(source.path) == builtin.WEIGHTS_DIR / f"{name}.safetensors"


def test_missing_bundled_expert_says_how_to_get_one(plugin_sources_only, monkeypatch):
    import stage_stack.instruments as builtin

    monkeypatch.setattr(builtin, "WEIGHTS_DIR", plugin_sources_only.parent / "no-weights")
    registry = Registry.load(default_file=plugin_sources_only)
    with pytest.raises(ExpertNotInstalledError) as e:
        registry.expert_path("drums")
    message = str(e.value)
    assert str(plugin_sources_only.parent / "no-weights" / "drums.safetensors") in message
    assert "no bundled demo expert for 'drums'" in message
    assert "stage-stack install drums PATH_OR_URL" in message
    assert not registry.is_installed("drums")


def test_bundled_expert_is_used_when_present(plugin_sources_only, monkeypatch, tiny_expert):
    import stage_stack.instruments as builtin

    weights = plugin_sources_only.parent / "weights"
    monkeypatch.setattr(builtin, "WEIGHTS_DIR", weights)
    path = tiny_expert(weights / "keys.safetensors", instrument="keys")
    resolved = Registry.load(default_file=plugin_sources_only).resolve_expert("keys")
    assert (resolved.path, resolved.origin, resolved.sha256) == (path, "path", None)

    # Pinned in a registry file: a matching file resolves with its digest, a changed one is an error.
    pinned = write(plugin_sources_only.parent / "pinned.yaml",
                   f"instruments:\n  keys:\n    sources: [{{path: {path}, sha256: {sha256_file(path)}}}]\n")
    assert Registry.load(user_file=pinned).resolve_expert("keys").sha256 == sha256_file(path)
    pinned.write_text(f"instruments:\n  keys:\n    sources: [{{path: {path}, sha256: '{'0' * 64}'}}]\n")
    with pytest.raises(IntegrityError, match="expects 0000"):
        Registry.load(user_file=pinned).resolve_expert("keys")


# -- layering ---------------------------------------------------------------------------------

def test_layers_default_then_user_file_then_overrides(isolated):
    user = write(isolated / "cfg" / "user.yaml", """
        chain: [bass, drums]
        instruments:
          guitar: {enabled: false}
          drums:
            default_prompt: brushed jazz kit
            default_gain_db: -4
            sources: [{path: experts/drums.safetensors}]
    """.replace("\n        ", "\n"))
    registry = Registry.load(user_file=user, overrides={"instruments": {"drums": {"default_gain_db": -9.5}}})
    assert registry.layers == [str(stage_stack.registry.package_config_path()), str(user), "overrides"]
    drums = registry.instrument("drums")
    assert drums.default_prompt == "brushed jazz kit"  # user file
    assert drums.default_gain_db == -9.5  # overrides beat the user file
    assert drums.description.startswith("Drum kit")  # untouched: from the plugin
    # relative to the file that names it
    assert drums.sources == (PathSource(path=str(isolated / "cfg" / "experts" / "drums.safetensors")),)
    assert registry.default_chain == ["bass", "drums"]
    assert "guitar" not in registry.names and registry.instrument("keys").name == "keys"
    with pytest.raises(UnknownInstrumentError, match=r"disabled.*instruments.guitar.enabled"):
        registry.instrument("guitar")


def test_user_file_from_environment(isolated, monkeypatch):
    user = write(isolated / "env.yaml", "chain: [keys]\n")
    monkeypatch.setenv("STAGE_STACK_REGISTRY", str(user))
    assert Registry.load().default_chain == ["keys"]
    assert CliRunner().invoke(cli, ["instruments", "--json"]).exit_code == 0
    monkeypatch.setenv("STAGE_STACK_REGISTRY", str(isolated / "missing.yaml"))
    with pytest.raises(RegistryConfigError, match="missing.yaml: no such file"):
        Registry.load()


def test_cli_registry_option(isolated):
    user = write(isolated / "cli.yaml", "chain: [guitar, drums]\n")
    data = json.loads(run("--registry", str(user), "instruments", "--json").stdout)
    assert data["default_chain"] == ["guitar", "drums"]
    assert data["layers"][-1] == str(user)


def test_config_can_declare_an_instrument_without_a_plugin(isolated, tiny_expert):
    expert = tiny_expert(isolated / "strings.safetensors", instrument="strings")
    user = write(isolated / "user.yaml", f"""
instruments:
  strings:
    description: string section
    default_gain_db: -8
    sources:
      - url: {expert.as_uri()}
        sha256: {sha256_file(expert)}
""")
    registry = Registry.load(user_file=user)
    strings = registry.instrument("strings")
    assert (strings.plugin, strings.description, strings.default_gain_db) == (CONFIG_PLUGIN, "string section", -8)
    assert registry.resolve_expert("strings").origin == "url"
    assert registry.load_expert("strings").instrument == "strings"


def test_chain_naming_unknown_instrument_is_reported_and_skipped(isolated):
    registry = Registry.load(overrides={"chain": ["drums", "theremin"]})
    assert registry.default_chain == ["drums"]
    assert any("'theremin'" in p and "not registered" in p for p in registry.config_problems)


def test_unknown_instrument_lists_the_known_ones(isolated):
    with pytest.raises(UnknownInstrumentError, match="unknown instrument 'drum'; known instruments: drums, keys, bass"):
        Registry.load().instrument("drum")


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, field, expected", [
    ("instruments:\n  drums:\n    sources:\n      - path: x.safetensors\n        sha256: abc\n",
     "instruments.drums.sources.0.sha256", "expected 64 lowercase hex digits"),
    ("chains: [drums]\n", "chains", "unknown field; expected one of: chain, instruments, version"),
    ("instruments:\n  drums:\n    enable: false\n", "instruments.drums.enable", "expected one of: chain_position, "
                                                                              "default_gain_db, default_prompt"),
    ("instruments:\n  drums:\n    sources: [{file: x}]\n", "instruments.drums.sources.0",
     "needs one of the keys 'path', 'url' (file://) or 'hub'"),
    ("instruments:\n  drums:\n    sources: [{url: 'https://example.org/d.safetensors', sha256: '" + "a" * 64 + "'}]\n",
     "instruments.drums.sources.0.url", "only file:// URLs are read"),
    ("instruments:\n  drums:\n    sources: [{hub: org/repo, filename: d.safetensors}]\n",
     "instruments.drums.sources.0.sha256", "Field required"),
    ("instruments:\n  drums:\n    sources: [{hub: org/repo, filename: d, sha256: '" + "a" * 64 + "', rev: x}]\n",
     "instruments.drums.sources.0.rev", "expected one of: filename, hub, sha256"),
    ("chain: [Drums]\n", "chain.0", "not an instrument name"),
    ("version: 2\n", "version", "Input should be 1"),
    ("instruments:\n  drums:\n    default_gain_db: 40\n", "instruments.drums.default_gain_db",
     "less than or equal to 12"),
])
def test_invalid_config_names_file_field_and_expected_form(isolated, text, field, expected):
    user = write(isolated / "bad.yaml", text)
    with pytest.raises(RegistryConfigError) as e:
        Registry.load(user_file=user)
    message = str(e.value)
    assert f"registry config {user} is invalid" in message
    assert f"field '{field}'" in message and expected in message


@pytest.mark.parametrize("text, expected", [
    ("chain: [drums\n", "not valid YAML"),
    ("- drums\n- bass\n", "expected a mapping with the keys chain, instruments, version; got list"),
])
def test_unparseable_config(isolated, text, expected):
    user = write(isolated / "bad.yaml", text)
    with pytest.raises(RegistryConfigError, match=expected) as e:
        Registry.load(user_file=user)
    assert str(user) in str(e.value)
    assert run("--registry", str(user), "instruments").exit_code == 1


def test_empty_user_file_changes_nothing(isolated):
    user = write(isolated / "empty.yaml", "")
    assert Registry.load(user_file=user).default_chain == ["drums", "keys", "bass"]


def test_invalid_overrides_are_named_as_such(isolated):
    with pytest.raises(RegistryConfigError,
                       match=r"(?s)overrides \(Registry.load argument\).*field 'chain': Input should be a valid list"):
        Registry.load(overrides={"chain": "drums"})


# -- resolution -------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resolution tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def hub_file(make, hf_cache: Path, hub: str, filename: str, instrument: str, seed: int = 0) -> Path:
    owner, repo = hub.split("/")
    return make(hf_cache / f"models--{owner}--{repo}" / "snapshots" / "abc123" / filename,
                            instrument=instrument, seed=seed)


def test_hub_source_resolves_from_the_local_cache_only(isolated, no_network, tiny_expert):
    cached = hub_file(tiny_expert, isolated / "hf", "org/stage-bass", "bass.safetensors", "bass")
    digest = sha256_file(cached)
    source = {"hub": "org/stage-bass", "filename": "bass.safetensors", "sha256": digest}
    registry = Registry.load(overrides={"instruments": {"bass": {"sources": [source]}}})
    resolved = registry.resolve_expert("bass")
    assert (resolved.path, resolved.sha256) == (cached, digest)

    other = {"hub": "org/stage-bass", "filename": "bass.safetensors", "sha256": "b" * 64}  # another version
    registry = Registry.load(overrides={"instruments": {"bass": {"sources": [other]}}})
    with pytest.raises(ExpertNotInstalledError) as e:
        registry.resolve_expert("bass")
    message = str(e.value)
    assert "never downloads" in message
    assert "huggingface-cli download org/stage-bass bass.safetensors" in message
    assert "stage-stack install bass PATH/bass.safetensors" in message


def test_resolution_order_overrides_then_installed_then_sources(isolated, tiny_expert):
    config_file = tiny_expert(isolated / "config.safetensors", instrument="drums", seed=1)
    installed_src = tiny_expert(isolated / "installed.safetensors", instrument="drums", seed=2)
    override_file = tiny_expert(isolated / "override.safetensors", instrument="drums", seed=3)
    # a chain of drums alone: the bundled bass and keys use another codec than these tiny experts
    user = write(isolated / "user.yaml",
                 f"chain: [drums]\ninstruments:\n  drums:\n    sources: [{{path: {config_file}}}]\n")

    assert Registry.load(user_file=user).resolve_expert("drums").path == config_file
    Registry.load(user_file=user).install("drums", installed_src)
    resolved = Registry.load(user_file=user).resolve_expert("drums")
    assert resolved.origin == "installed" and resolved.sha256 == sha256_file(installed_src)
    overrides = {"instruments": {"drums": {"sources": [{"path": str(override_file)}]}}}
    resolved = Registry.load(user_file=user, overrides=overrides).resolve_expert("drums")
    assert (resolved.path, resolved.origin) == (override_file, "override")


def test_pinned_path_with_another_file_is_an_integrity_error(isolated, tiny_expert):
    expert = tiny_expert(isolated / "d.safetensors", instrument="drums")
    registry = Registry.load(overrides={"instruments": {"drums": {"sources": [
        {"path": str(expert), "sha256": "c" * 64}]}}})
    with pytest.raises(IntegrityError, match=f"has sha256 {sha256_file(expert)}, but the registry expects cccc"):
        registry.expert_path("drums")


def test_expert_for_another_instrument_is_refused_naming_both(isolated, tiny_expert):
    bass = tiny_expert(isolated / "b.safetensors", instrument="bass")
    registry = Registry.load(overrides={"instruments": {"drums": {"sources": [{"path": str(bass)}]}}})
    with pytest.raises(IncompatibleExpertError, match=r"expert for 'bass'.*instrument 'drums'"):
        registry.load_expert("drums")


def test_load_expert_through_the_registry(isolated, tiny_expert):
    path = tiny_expert(isolated / "k.safetensors", instrument="keys", seed=4)
    registry = Registry.load(overrides={"instruments": {"keys": {"sources": [{"path": str(path)}]}}})
    expert = registry.load_expert("keys")
    assert expert.instrument == "keys" and expert.path == path
    assert expert.lm.config == TINY_LM and expert.sample_rate == TINY_CODEC.sample_rate


# -- compatibility ----------------------------------------------------------------------------

def test_check_compatible(isolated, tiny_expert):
    drums = read_metadata(tiny_expert(isolated / "d.safetensors", instrument="drums"))
    bass = read_metadata(tiny_expert(isolated / "b.safetensors", instrument="bass", seed=5))
    other = read_metadata(tiny_expert(isolated / "o.safetensors", instrument="keys", codec_config=OTHER_CODEC))
    check_compatible([drums, bass])
    check_compatible([])
    with pytest.raises(IncompatibleExpertError) as e:
        Registry.load().check_compatible([drums, bass, other])
    assert "'drums' and 'keys' experts cannot be chained" in str(e.value)
    assert "sample_rate 16000 vs 24000" in str(e.value)
    assert "codec_config.sample_rate 16000 vs 24000" in str(e.value)


def test_check_chain_on_resolved_experts(isolated, tiny_expert):
    registry = Registry.load(overrides={"instruments": {
        "drums": {"sources": [{"path": str(tiny_expert(isolated / "d.safetensors", instrument="drums"))}]},
        "bass": {"sources": [{"path": str(tiny_expert(isolated / "b.safetensors", instrument="bass",
                                                            codec_config=OTHER_CODEC))}]}}})
    registry.check_chain(["drums"])
    with pytest.raises(IncompatibleExpertError, match="'drums' and 'bass'"):
        registry.check_chain(["drums", "bass"])


# -- install ----------------------------------------------------------------------------------

def test_install_copies_verifies_and_records(isolated, tiny_expert):
    src = tiny_expert(isolated / "src" / "drums.safetensors", instrument="drums", license="CC0-1.0")
    digest = sha256_file(src)
    record = Registry.load().install("drums", src, sha256=digest)
    expected = isolated / "home" / "experts" / "drums" / f"{digest}.safetensors"
    assert record.path == expected and sha256_file(expected) == digest
    assert (record.sha256, record.size, record.source, record.license) == (digest, src.stat().st_size, str(src),
                                                                          "CC0-1.0")
    index = json.loads((isolated / "home" / "experts" / "installed.json").read_text())
    assert index["experts"]["drums"]["file"] == f"drums/{digest}.safetensors"
    assert InstalledIndex.read().experts["drums"] == record
    assert Registry.load().resolve_expert("drums").path == expected
    assert src.is_file()  # the user's file stays


def test_reinstall_replaces_the_cached_copy(isolated, tiny_expert):
    first = tiny_expert(isolated / "a.safetensors", instrument="drums", seed=1)
    second = tiny_expert(isolated / "b.safetensors", instrument="drums", seed=2)
    old = Registry.load().install("drums", first)
    new = Registry.load().install("drums", second)
    assert not old.path.exists() and new.path.is_file()
    assert first.is_file() and second.is_file()
    assert Registry.load().resolve_expert("drums").sha256 == sha256_file(second)
    assert Registry.load().install("drums", second).path == new.path  # idempotent


def test_install_from_file_url(isolated, tiny_expert):
    src = tiny_expert(isolated / "dir with space" / "bass.safetensors", instrument="bass")
    record = Registry.load().install("bass", src.as_uri())
    assert record.source == src.as_uri() and record.sha256 == sha256_file(src)


@pytest.mark.parametrize("case", ["sha256", "instrument", "not-an-expert", "remote-url", "missing", "unknown"])
def test_install_refuses_bad_input_and_writes_nothing(isolated, case, tiny_expert):
    src = tiny_expert(isolated / "bass.safetensors", instrument="bass")
    args, error, match = {
        "sha256": (("bass", src, "d" * 64), IntegrityError, "expected dddd"),
        "instrument": (("drums", src), IncompatibleExpertError, "expert for 'bass'.*instrument 'drums'"),
        "not-an-expert": (("bass", write(isolated / "x.safetensors", "hello")), ExpertFormatError,
                          "not a valid safetensors file"),
        "remote-url": (("bass", "https://example.org/bass.safetensors"), StageStackError, "does not download"),
        "missing": (("bass", isolated / "nope.safetensors"), StageStackError, "no such file"),
        "unknown": (("tuba", src), UnknownInstrumentError, "unknown instrument 'tuba'"),
    }[case]
    with pytest.raises(error, match=match):
        Registry.load().install(*args)
    assert not (isolated / "home" / "experts").exists()


def test_install_refuses_a_codec_the_chain_cannot_mix_unless_forced(isolated, tiny_expert):
    Registry.load().install("drums", tiny_expert(isolated / "d.safetensors", instrument="drums"))
    other = tiny_expert(isolated / "b.safetensors", instrument="bass", codec_config=OTHER_CODEC)
    with pytest.raises(IncompatibleExpertError, match=r"(?s)'drums' and 'bass' experts cannot be chained.*--force"):
        Registry.load().install("bass", other)
    assert "bass" not in InstalledIndex.read().experts
    Registry.load().install("bass", other, force=True)
    assert "bass" in InstalledIndex.read().experts
    # Every installed expert of the default chain is checked, not only the first.
    with pytest.raises(IncompatibleExpertError, match="'bass' and 'keys' experts cannot be chained"):
        Registry.load().install("keys", tiny_expert(isolated / "k.safetensors", instrument="keys"))


def test_corrupt_installed_index_is_a_clear_error(isolated):
    write(isolated / "home" / "experts" / "installed.json", '{"version": 1, "experts": {"drums": {"file": 3}}}')
    with pytest.raises(RegistryConfigError, match=r"(?s)installed.json is invalid.*field 'experts.drums.file'"):
        Registry.load().resolve_expert("drums")


def test_install_cli(isolated, tiny_expert):
    src = tiny_expert(isolated / "drums.safetensors", instrument="drums")
    result = run("install", "drums", str(src))
    assert result.exit_code == 0
    assert result.stdout.startswith("Installed drums: ") and sha256_file(src)[:12] in result.stdout
    result = run("install", "bass", str(src))
    assert result.exit_code == 1
    assert "Error: " in result.stderr and "expert for 'drums'" in result.stderr


# -- codecs -----------------------------------------------------------------------------------

def shared_codec_expert(directory: Path, instrument: str = "drums") -> tuple[Path, Path]:
    """An expert that references its codec file (kept beside it) instead of embedding it."""
    codec_path = save_codec(directory / "tiny_codec.safetensors", tiny_codec(), id="test/tiny-codec")
    ref = WeightsRef(id="test/tiny-codec", filename="tiny_codec.safetensors", sha256=sha256_file(codec_path))
    metadata = expert_metadata(instrument, TINY_LM, TINY_CODEC, codec=ref)
    return save_expert(directory / f"{instrument}.safetensors", metadata, tiny_lm()), codec_path


def test_install_codec(isolated):
    _, codec_path = shared_codec_expert(isolated / "src")
    digest = sha256_file(codec_path)
    dest = install_codec(codec_path, sha256=digest)
    assert dest == paths.codec_dir() / f"{digest}.safetensors" and sha256_file(dest) == digest
    assert install_codec(codec_path) == dest  # again: nothing changes

    result = run("install-codec", str(codec_path))
    assert result.exit_code == 0 and str(dest) in result.stdout


@pytest.mark.parametrize("case", ["expert", "sha256", "truncated"])
def test_install_codec_refuses_bad_files(isolated, case):
    expert, codec_path = shared_codec_expert(isolated / "src")
    if case == "expert":
        with pytest.raises(ExpertFormatError, match="not a stage-stack codec file"):
            install_codec(expert)
    elif case == "sha256":
        with pytest.raises(IntegrityError, match="expected eeee"):
            install_codec(codec_path, sha256="e" * 64)
    else:
        truncated = write(isolated / "t.safetensors", "")
        truncated.write_bytes(codec_path.read_bytes()[:-100])
        with pytest.raises(ExpertFormatError, match="truncated"):
            install_codec(truncated)
    assert not paths.codec_dir().exists()


def test_install_brings_along_a_referenced_codec(isolated):
    import shutil

    expert, codec_path = shared_codec_expert(isolated / "src")
    Registry.load().install("drums", expert)
    assert (paths.codec_dir() / f"{sha256_file(codec_path)}.safetensors").is_file()
    shutil.rmtree(isolated / "src")  # the installed expert no longer needs the originals
    loaded = Registry.load().load_expert("drums")
    assert loaded.instrument == "drums" and not loaded.metadata.codec.embedded


def test_source_models_describe_themselves():
    digest = "a" * 64
    assert PathSource(path="/x.safetensors").describe() == "/x.safetensors"
    assert UrlSource(url="file:///x.safetensors", sha256=digest).local_path == Path("/x.safetensors")
    assert HubSource(hub="o/r", filename="f.safetensors", sha256=digest).describe() == "hub:o/r/f.safetensors"
    with pytest.raises(ValueError, match="not a hub id"):
        HubSource(hub="no-slash", filename="f", sha256=digest)
    assert Instrument(name="x").plugin == ""
