"""Plugin discovery (built-in, entry points, plugin dirs), STAGE_STACK_LOAD_PLUGINS, faults, conflicts,
plugin commands, and the `plugins` / `instruments` / `doctor` commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import stage_stack
import stage_stack.cli.registry  # noqa: F401  (registers the commands)
from plugin_helpers import (forget_modules, install_dist_info, instrument_plugin, isolated,  # noqa: F401
                            tiny_expert, write_plugin_file)
from stage_stack.cli import cli
from stage_stack.errors import InstrumentConflictError
from stage_stack.plugins import BUILTIN, ENTRY_POINT, PLUGINS_DIR, get_plugins, load_plugins, reset_plugins
from stage_stack.registry import Registry

BUILTINS = {f"stage_stack.instruments.{n}" for n in ("drums", "bass", "keys", "guitar")}


def run(*args, env=None):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result


def test_hookimpl_is_reexported():
    from stage_stack.hookspecs import hookimpl

    assert stage_stack.hookimpl is hookimpl


def test_builtin_plugins_load_with_their_hooks(isolated):
    plugins = load_plugins()
    by_name = {info.name: info for info in plugins.infos}
    assert BUILTINS <= set(by_name)
    for name in BUILTINS:
        assert by_name[name].source == BUILTIN
        assert by_name[name].version == stage_stack.__version__
        assert plugins.hooks(name) == ["register_instruments"]
    assert plugins.failures == []


def test_plugins_dir_from_argument_env_and_cli(isolated, monkeypatch):
    directory = isolated / "plugs"
    write_plugin_file(directory, "strings_plugin", instrument_plugin("strings"))
    write_plugin_file(directory, "_private", "raise RuntimeError('files starting with _ are not plugins')")

    plugins = load_plugins(plugin_dirs=[directory])
    info = plugins.info("strings_plugin")
    assert (info.source, info.location) == (PLUGINS_DIR, str(directory / "strings_plugin.py"))
    assert plugins.failures == []
    assert Registry.load(plugins=plugins).instrument("strings").plugin == "strings_plugin"

    monkeypatch.setenv("STAGE_STACK_PLUGINS_DIR", str(directory))
    assert Registry.load().instrument("strings").plugin == "strings_plugin"
    monkeypatch.delenv("STAGE_STACK_PLUGINS_DIR")
    reset_plugins()
    assert "strings" not in Registry.load().names

    result = run("--plugins-dir", str(directory), "instruments", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)["instruments"]}
    assert rows["strings"]["plugin"] == "strings_plugin"


def test_missing_plugins_dir_is_reported(isolated):
    plugins = load_plugins(plugin_dirs=[isolated / "nope"])
    assert [f.stage for f in plugins.failures] == ["import"]
    assert "does not exist" in str(plugins.failures[0])
    assert BUILTINS <= {i.name for i in plugins.infos}


@pytest.fixture
def entry_point_plugin(isolated, monkeypatch):
    """An installed distribution `stage-stack-strings` with the entry point strings = ep_strings."""
    forget_modules("ep_strings")
    install_dist_info(isolated / "site", monkeypatch, "stage-stack-strings", "1.2.3", {"strings": "ep_strings"},
                      {"ep_strings": instrument_plugin("strings")})
    yield
    forget_modules("ep_strings")


@pytest.mark.parametrize("load, loaded", [
    (None, True),  # unset: every entry-point plugin
    ("", False),  # empty: none
    ("stage-stack-strings", True),  # by distribution name
    ("Stage_Stack.Strings", True),  # ... normalised
    ("strings", True),  # by entry-point name
    ("other", False),
])
def test_load_plugins_env_restricts_entry_points(entry_point_plugin, monkeypatch, load, loaded):
    if load is None:
        monkeypatch.delenv("STAGE_STACK_LOAD_PLUGINS")
    else:
        monkeypatch.setenv("STAGE_STACK_LOAD_PLUGINS", load)
    plugins = load_plugins()
    info = plugins.info("strings")
    assert (info is not None) == loaded
    if loaded:
        assert (info.source, info.version, info.location) == (ENTRY_POINT, "1.2.3", "stage-stack-strings: ep_strings")
        assert Registry.load(plugins=plugins).instrument("strings").plugin == "strings"
    assert BUILTINS <= {i.name for i in plugins.infos}  # built-ins always load
    if load == "other":
        assert any("names 'other'" in str(f) for f in plugins.failures)


def test_entry_point_that_fails_to_import_is_reported(isolated, monkeypatch):
    install_dist_info(isolated / "site", monkeypatch, "stage-stack-broken", "0.1", {"broken": "no_such_module_xyz"})
    monkeypatch.setenv("STAGE_STACK_LOAD_PLUGINS", "stage-stack-broken")
    plugins = load_plugins()
    [failure] = plugins.failures
    assert (failure.plugin, failure.stage, type(failure.error)) == ("broken", "import", ModuleNotFoundError)
    registry = Registry.load(plugins=plugins)
    assert registry.instrument("drums").name == "drums"  # the rest keeps working


def test_plugin_raising_on_import_is_reported_and_the_rest_works(isolated):
    directory = isolated / "plugs"
    write_plugin_file(directory, "boom", "raise RuntimeError('boom at import')")
    write_plugin_file(directory, "fine", instrument_plugin("strings"))
    registry = Registry.load(plugin_dirs=[directory])
    assert any("'boom'" in p and "import" in p and "RuntimeError: boom at import" in p for p in registry.problems)
    assert registry.instrument("strings").plugin == "fine"
    assert {"drums", "bass", "keys", "guitar", "strings"} == set(registry.names)

    result = run("--plugins-dir", str(directory), "plugins")
    assert result.exit_code == 0
    assert "FAILED boom" in result.stderr and "RuntimeError: boom at import" in result.stderr
    assert "fine" in result.stdout

    rows = {r["name"]: r for r in json.loads(run("--plugins-dir", str(directory), "plugins", "--json").stdout)}
    assert rows["boom"]["errors"] == ["import: RuntimeError: boom at import"]
    assert rows["boom"]["hooks"] == []
    assert rows["fine"] == {"name": "fine", "version": None, "source": PLUGINS_DIR,
                            "location": str(directory / "fine.py"), "hooks": ["register_instruments"], "errors": []}

    doctor = run("--plugins-dir", str(directory), "doctor")
    assert doctor.exit_code == 1
    assert "[FAIL] plugin boom: import: RuntimeError: boom at import" in doctor.stdout


def test_plugin_raising_in_its_hook_contributes_nothing(isolated):
    directory = isolated / "plugs"
    write_plugin_file(directory, "half", """
        import stage_stack
        from stage_stack.registry import Instrument

        @stage_stack.hookimpl
        def register_instruments(register):
            register(Instrument(name="strings"))
            raise ValueError("second instrument is broken")
    """)
    registry = Registry.load(plugin_dirs=[directory])
    [problem] = registry.problems
    assert "'half'" in problem and "hook register_instruments" in problem and "ValueError: second instrument" in problem
    assert "strings" not in registry.names  # half a registration is dropped
    assert registry.instrument("bass").plugin == "stage_stack.instruments.bass"

    # The failure is the latest state, not a log: loading again does not duplicate it.
    assert len(Registry.load(plugin_dirs=[directory]).problems) == 1


@pytest.mark.parametrize("body, expected", [
    ("register('drums')", "TypeError: register() takes a stage_stack.registry.Instrument, got str"),
    ("register(Instrument(name='Bad Name'))", "is not an instrument name"),
    ("register(Instrument(name='x')); register(Instrument(name='x'))", "registered twice by this plugin"),
])
def test_bad_registrations_are_reported(isolated, body, expected):
    directory = isolated / "plugs"
    write_plugin_file(directory, "bad", f"""
        import stage_stack
        from stage_stack.registry import Instrument

        @stage_stack.hookimpl
        def register_instruments(register):
            {body}
    """)
    registry = Registry.load(plugin_dirs=[directory])
    assert any("'bad'" in p and expected in p for p in registry.problems), registry.problems
    assert "drums" in registry.names


def test_misspelt_hook_is_reported_with_a_suggestion(isolated):
    directory = isolated / "plugs"
    write_plugin_file(directory, "typo", """
        import stage_stack

        @stage_stack.hookimpl
        def register_instrument(register):
            pass
    """)
    [failure] = load_plugins(plugin_dirs=[directory]).failures
    assert "unknown hook 'register_instrument'; did you mean 'register_instruments'?" in str(failure)


def test_hook_with_an_unknown_argument_is_rejected(isolated):
    directory = isolated / "plugs"
    write_plugin_file(directory, "badargs", """
        import stage_stack

        @stage_stack.hookimpl
        def register_instruments(register, extra):
            pass
    """)
    [failure] = load_plugins(plugin_dirs=[directory]).failures
    assert failure.plugin == "badargs" and failure.stage == "register"
    assert "extra" in str(failure.error)


def test_same_plugin_name_twice_is_reported(isolated):
    write_plugin_file(isolated / "a", "dup", instrument_plugin("strings"))
    write_plugin_file(isolated / "b", "dup", instrument_plugin("pads"))
    plugins = load_plugins(plugin_dirs=[isolated / "a", isolated / "b"])
    [failure] = plugins.failures
    assert "a plugin named 'dup' is already loaded from" in str(failure.error)
    assert Registry.load(plugins=plugins).instrument("strings").plugin == "dup"


# -- conflicts --------------------------------------------------------------------------------

def test_duplicate_instrument_is_an_error_naming_both_plugins(isolated):
    directory = isolated / "plugs"
    write_plugin_file(directory, "mydrums", instrument_plugin("drums"))
    registry = Registry.load(plugin_dirs=[directory])
    with pytest.raises(InstrumentConflictError) as e:
        registry.instrument("drums")
    assert "'stage_stack.instruments.drums' and 'mydrums'" in str(e.value)
    assert "plugin: mydrums" in str(e.value)  # the fix
    assert "drums" not in registry.default_chain
    assert registry.instrument("bass").name == "bass"  # the rest keeps working
    assert {"drums": "conflict"} == {s.name: s.state for s in registry.statuses() if s.state == "conflict"}

    result = run("--plugins-dir", str(directory), "instruments")
    assert result.exit_code == 0 and "conflict" in result.stdout
    assert run("--plugins-dir", str(directory), "doctor").exit_code == 1


@pytest.mark.parametrize("winner", ["mydrums", "stage_stack.instruments.drums"])
def test_registry_config_says_which_plugin_wins(isolated, winner):
    directory = isolated / "plugs"
    write_plugin_file(directory, "mydrums", instrument_plugin("drums"))
    user = isolated / "user.yaml"
    user.write_text(f"instruments:\n  drums:\n    plugin: {winner}\n")
    registry = Registry.load(user_file=user, plugin_dirs=[directory])
    drums = registry.instrument("drums")
    assert drums.plugin == winner
    assert (drums.description == "from a test plugin") == (winner == "mydrums")
    assert registry.problems == []
    assert registry.default_chain == ["drums", "keys", "bass"]


def test_config_naming_a_plugin_that_does_not_register_the_instrument(isolated):
    user = isolated / "user.yaml"
    user.write_text("instruments:\n  drums:\n    plugin: gone\n")
    registry = Registry.load(user_file=user)
    with pytest.raises(InstrumentConflictError, match=r"comes from plugin 'gone'.*'stage_stack.instruments.drums'"):
        registry.instrument("drums")


# -- plugin commands --------------------------------------------------------------------------

COMMAND_PLUGIN = """
    import click
    import stage_stack

    @stage_stack.hookimpl
    def register_commands(cli):
        @cli.command()
        @click.argument("who")
        def hello(who):
            '''Say hello.'''
            click.echo(f"hello {who}")

        @cli.command()
        def install():
            '''Tries to replace a built-in command.'''
            click.echo("plugin install")
"""


def test_plugins_add_commands(isolated):
    directory = isolated / "plugs"
    write_plugin_file(directory, "hello_plugin", COMMAND_PLUGIN)
    write_plugin_file(directory, "broken_commands", """
        import stage_stack

        @stage_stack.hookimpl
        def register_commands(cli):
            raise RuntimeError("no commands today")
    """)
    result = run("--plugins-dir", str(directory), "hello", "world")
    assert result.exit_code == 0
    assert result.stdout == "hello world\n"
    assert "built-in command" in result.stderr  # the clash with `install` is reported

    help_text = run("--plugins-dir", str(directory), "--help").stdout
    assert "hello" in help_text and "Say hello." in help_text
    assert "Tries to replace" not in help_text
    assert run("hello", "world").exit_code == 2  # without the dir: no such command, nothing leaked

    rows = {r["name"]: r for r in json.loads(run("--plugins-dir", str(directory), "plugins", "--json").stdout)}
    assert rows["hello_plugin"]["hooks"] == ["register_commands"]
    assert rows["broken_commands"]["errors"] == ["hook register_commands: RuntimeError: no commands today"]


def test_get_plugins_is_cached_per_dirs_and_env(isolated, monkeypatch):
    first = get_plugins()
    assert get_plugins() is first
    monkeypatch.setenv("STAGE_STACK_LOAD_PLUGINS", "something")
    assert get_plugins() is not first
    monkeypatch.setenv("STAGE_STACK_LOAD_PLUGINS", "")
    assert get_plugins() is first
    reset_plugins()
    assert get_plugins() is not first


# -- instruments / doctor CLI -----------------------------------------------------------------

def test_instruments_command_lists_name_plugin_source_installed_license(isolated, tiny_expert):
    expert = tiny_expert(isolated / "bass.safetensors", instrument="bass", license="CC-BY-4.0")
    assert run("install", "bass", str(expert)).exit_code == 0

    result = run("instruments")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:5]}
    assert "stage_stack.instruments.bass" in lines["bass"] and " installed " in lines["bass"]
    assert "CC-BY-4.0" in lines["bass"]  # the expert's own license, once installed
    assert "default chain: drums, keys, bass" in result.stdout

    data = json.loads(run("instruments", "--json").stdout)
    rows = {r["name"]: r for r in data["instruments"]}
    assert rows["bass"]["installed"] is True and rows["bass"]["origin"] == "installed"
    assert rows["bass"]["expert"].endswith(".safetensors") and rows["bass"]["license"] == "CC-BY-4.0"
    assert rows["drums"]["chain_position"] == 10 and rows["drums"]["default_gain_db"] == -2.0
    assert data["default_chain"] == ["drums", "keys", "bass"]


def test_doctor_passes_on_a_healthy_install_and_fails_on_a_corrupt_expert(isolated, tiny_expert):
    expert = tiny_expert(isolated / "bass.safetensors", instrument="bass")
    assert run("install", "bass", str(expert)).exit_code == 0
    result = run("doctor")
    assert result.exit_code == 0, result.output
    assert "[ ok ] torch" in result.stdout
    assert "[ ok ] installed expert bass: sha256" in result.stdout
    assert "[ ok ] cache" in result.stdout and "No problems found." in result.stdout

    installed = next((isolated / "home" / "experts" / "bass").glob("*.safetensors"))
    data = bytearray(installed.read_bytes())
    data[-1] ^= 0xFF  # flip one weight byte
    installed.write_bytes(bytes(data))
    result = run("doctor")
    assert result.exit_code == 1
    assert "[FAIL] installed expert bass" in result.stdout and "recorded" in result.stdout


def test_doctor_fails_when_the_cache_is_not_writable(isolated, monkeypatch):
    blocker = isolated / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("STAGE_STACK_HOME", str(blocker / "home"))
    result = run("doctor")
    assert result.exit_code == 1
    assert "[FAIL] cache" in result.stdout and "STAGE_STACK_HOME" in result.stdout


def test_doctor_reports_cuda_devices_and_an_old_torch(isolated, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    result = run("doctor")
    assert "[ ok ] cuda: 2 device(s): Fake GPU 0, Fake GPU 1" in result.stdout
    assert result.exit_code == 0

    monkeypatch.setattr(torch, "__version__", "2.1.2")
    result = run("doctor")
    assert result.exit_code == 1
    assert "[FAIL] torch: 2.1.2 is older than 2.4" in result.stdout


def test_doctor_says_a_chain_shares_a_codec_config_not_its_weights(isolated, tiny_expert):
    assert run("install", "drums", str(tiny_expert(isolated / "d.safetensors", instrument="drums"))).exit_code == 0
    other_weights = tiny_expert(isolated / "b.safetensors", instrument="bass", seed=5)  # its codec too
    assert run("install", "bass", str(other_weights)).exit_code == 0  # same config, other weights: chains
    result = run("doctor")
    assert result.exit_code == 0, result.output
    assert ("[ ok ] default chain: drums, bass can be chained (one codec config; each expert hears through its "
            "own codec weights)") in result.stdout


def test_doctor_fails_on_a_default_chain_with_two_codecs(isolated, tiny_expert):
    import dataclasses

    from stage_stack.testing import TINY_CODEC

    other = dataclasses.replace(TINY_CODEC, sample_rate=24000)
    assert run("install", "drums", str(tiny_expert(isolated / "d.safetensors", instrument="drums"))).exit_code == 0
    bass = tiny_expert(isolated / "b.safetensors", instrument="bass", codec_config=other)
    refused = run("install", "bass", str(bass))
    assert refused.exit_code == 1 and "--force" in refused.stderr
    assert run("install", "bass", str(bass), "--force").exit_code == 0
    result = run("doctor")
    assert result.exit_code == 1
    assert "[FAIL] default chain: the 'drums' and 'bass' experts cannot be chained" in result.stdout
