"""Finding and loading stage-stack plugins (see `stage_stack.hookspecs` for the hooks).

Plugins come from three places, loaded in this order:

1. built-in: every module of the package `stage_stack.instruments` (the repo's `instruments/`);
2. third-party: entry points in the group `stage_stack` of installed distributions;
3. one-off files: every `*.py` (not starting with `_`) in the plugin directories given by
   `--plugins-dir DIR` (repeatable) or, when none is given, `STAGE_STACK_PLUGINS_DIR`
   (several directories separated by `os.pathsep`).

`STAGE_STACK_LOAD_PLUGINS` restricts the third-party plugins, like llm's `LLM_LOAD_PLUGINS`:
unset loads all of them; a comma-separated list loads only those named (a distribution name
such as `stage-stack-pads`, or an entry-point name); an empty string loads none. Built-in
plugins and plugin-directory files are always loaded: they are part of stage-stack, or were
asked for explicitly.

A plugin that fails to import, or whose hook raises, is recorded in `Plugins.failures` (its name
and the exception) and skipped; every other plugin keeps working.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import click
import pluggy

from . import __version__, hookspecs

ENV_LOAD_PLUGINS = "STAGE_STACK_LOAD_PLUGINS"
ENV_PLUGINS_DIR = "STAGE_STACK_PLUGINS_DIR"
BUILTIN_PACKAGE = "stage_stack.instruments"

BUILTIN, ENTRY_POINT, PLUGINS_DIR = "built-in", "entry point", "plugins dir"


@dataclass
class PluginInfo:
    """One plugin that was found, whether or not it loaded."""

    name: str
    source: str  # BUILTIN, ENTRY_POINT or PLUGINS_DIR
    location: str  # module name, "distribution: entry point value", or file path
    version: str | None = None
    module: ModuleType | None = field(default=None, repr=False)


@dataclass
class PluginFailure:
    plugin: str
    source: str
    location: str
    stage: str  # "import", "register", or "hook NAME"
    error: BaseException

    def __str__(self) -> str:
        return (f"plugin {self.plugin!r} ({self.source}: {self.location}) failed in {self.stage}: "
                f"{type(self.error).__name__}: {self.error}")


def normalize_name(name: str) -> str:
    """Distribution-name normalisation (PEP 503), so `Stage_Stack.Pads` matches `stage-stack-pads`."""
    return re.sub(r"[-_.]+", "-", name).lower()


class Plugins:
    """A pluggy manager plus what stage-stack knows about each plugin it tried to load."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        # Latest failure per (plugin, stage): calling a hook again replaces or clears it, so a
        # shared Plugins object never reports one failure twice.
        self._failures: dict[tuple[str, str], PluginFailure] = {}

    @property
    def failures(self) -> list[PluginFailure]:
        return list(self._failures.values())

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)

    def hooks(self, name: str) -> list[str]:
        """Names of the hooks the plugin implements (empty when it did not load)."""
        module = self.manager.get_plugin(name)
        if module is None:
            return []
        return sorted(caller.name for caller in self.manager.get_hookcallers(module) or [])

    def fail(self, info: PluginInfo, stage: str, error: BaseException) -> None:
        self._failures[(info.name, stage)] = PluginFailure(info.name, info.source, info.location, stage, error)

    def add(self, info: PluginInfo, load: Callable[[], Any]) -> None:
        """Import a plugin with `load()` and register it; a failure is recorded, not raised."""
        self.infos.append(info)
        if self.manager.has_plugin(info.name):
            other = self.info(info.name)
            self.fail(info, "register", ValueError(
                f"a plugin named {info.name!r} is already loaded from {other.location if other else '?'}; "
                "rename one of them"))
            return
        try:
            info.module = load()
        except Exception as e:  # a broken plugin must not take the others down
            self.fail(info, "import", e)
            return
        try:
            self.manager.register(info.module, name=info.name)
        except Exception as e:  # pluggy rejects hook implementations with unknown arguments
            self.fail(info, "register", e)
            return
        self._check_hook_names(info)

    def _check_hook_names(self, info: PluginInfo) -> None:
        """A misspelt hook name would otherwise be silently ignored; say so, with a suggestion."""
        known = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "stage_stack_spec")]
        for caller in self.manager.get_hookcallers(info.module) or []:
            if not caller.has_spec():
                close = difflib.get_close_matches(caller.name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known hooks: {', '.join(known)}"
                self.fail(info, f"hook {caller.name}", AttributeError(f"unknown hook {caller.name!r}{hint}"))

    def call_each(self, hook: str, kwargs_for: Callable[[PluginInfo], dict[str, Any]]) -> list[PluginInfo]:
        """Call `hook` on each plugin separately, in load order; return the plugins that succeeded.

        pluggy's own `manager.hook.NAME(...)` stops at the first exception; calling one
        implementation at a time lets one broken plugin be reported while the rest still run.
        `kwargs_for(info)` gives the arguments for that plugin (e.g. a `register` that records
        which plugin registered what).
        """
        order = {info.name: i for i, info in enumerate(self.infos)}
        impls = sorted(getattr(self.manager.hook, hook).get_hookimpls(), key=lambda impl: order[impl.plugin_name])
        succeeded = []
        for impl in impls:
            info = self.infos[order[impl.plugin_name]]
            kwargs = kwargs_for(info)
            stage = f"hook {hook}"
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception as e:
                self.fail(info, stage, e)
                continue
            self._failures.pop((info.name, stage), None)
            succeeded.append(info)
        return succeeded


# -- discovery --------------------------------------------------------------------------------

def _builtin_modules() -> list[str]:
    package = importlib.import_module(BUILTIN_PACKAGE)
    return sorted(f"{BUILTIN_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


def _load_filter(value: str | None) -> set[str] | None:
    """STAGE_STACK_LOAD_PLUGINS -> None (load all) or the set of normalised names to load."""
    if value is None:
        return None
    return {normalize_name(name.strip()) for name in value.split(",") if name.strip()}


def _load_file(path: Path) -> ModuleType:
    # A unique module name per file path, so two directories may each hold a `drums.py`.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    module_name = f"_stage_stack_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pydantic and dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def plugin_dirs_from_env() -> list[Path]:
    value = os.environ.get(ENV_PLUGINS_DIR, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def load_plugins(plugin_dirs: Iterable[str | os.PathLike] | None = None,
                 load: str | None = None, use_env: bool = True) -> Plugins:
    """Find and load every plugin (a new manager each call; see `get_plugins` for the cached one).

    plugin_dirs: directories of one-off plugin files; None = STAGE_STACK_PLUGINS_DIR.
    load: the STAGE_STACK_LOAD_PLUGINS value to apply; None = read the environment variable.
    """
    if load is None and use_env:
        load = os.environ.get(ENV_LOAD_PLUGINS)
    if plugin_dirs is None:
        plugin_dirs = plugin_dirs_from_env() if use_env else []
    plugins = Plugins()

    try:
        builtin = _builtin_modules()
    except Exception as e:
        builtin = []
        plugins.fail(PluginInfo(BUILTIN_PACKAGE, BUILTIN, BUILTIN_PACKAGE), "import", e)
    for module_name in builtin:
        plugins.add(PluginInfo(module_name, BUILTIN, module_name, __version__),
                    lambda m=module_name: importlib.import_module(m))

    wanted = _load_filter(load)
    found: set[str] = set()
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        dist_name = ep.dist.metadata["Name"] if ep.dist is not None else None
        names = {normalize_name(ep.name)} | ({normalize_name(dist_name)} if dist_name else set())
        if wanted is not None and not names & wanted:
            continue
        found |= names
        version = ep.dist.version if ep.dist is not None else None
        plugins.add(PluginInfo(ep.name, ENTRY_POINT, f"{dist_name or '?'}: {ep.value}", version), ep.load)
    for missing in sorted((wanted or set()) - found):
        plugins.fail(PluginInfo(missing, ENTRY_POINT, ENV_LOAD_PLUGINS), "import", LookupError(
            f"{ENV_LOAD_PLUGINS} names {missing!r}, but no installed distribution has a "
            f"'{hookspecs.PROJECT}' entry point of that name; `pip install` it or remove it from the variable"))

    for directory in map(Path, plugin_dirs):
        if not directory.is_dir():
            plugins.fail(PluginInfo(str(directory), PLUGINS_DIR, str(directory)), "import", FileNotFoundError(
                f"plugins directory {directory} does not exist; create it or fix --plugins-dir / {ENV_PLUGINS_DIR}"))
            continue
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            plugins.add(PluginInfo(path.stem, PLUGINS_DIR, str(path)), lambda p=path: _load_file(p))
    return plugins


_cache: dict[tuple, Plugins] = {}


def get_plugins(plugin_dirs: Iterable[str | os.PathLike] | None = None) -> Plugins:
    """The loaded plugins, cached per (plugin dirs, STAGE_STACK_LOAD_PLUGINS); `reset_plugins()` clears it."""
    dirs = tuple(Path(p).expanduser().absolute() for p in plugin_dirs) if plugin_dirs is not None \
        else tuple(p.absolute() for p in plugin_dirs_from_env())
    key = (dirs, os.environ.get(ENV_LOAD_PLUGINS))
    if key not in _cache:
        _cache[key] = load_plugins(dirs)
    return _cache[key]


def reset_plugins() -> None:
    _cache.clear()


# -- command line -----------------------------------------------------------------------------

class PluginCommandGroup(click.Group):
    """The `stage-stack` group, plus the commands plugins add through `register_commands`.

    Plugin commands are collected only when a name is not a built-in command (or for --help),
    after the group's own options are parsed, so `--plugins-dir` decides where plugins come from.
    They live in a group made for this invocation, so one invocation's plugins never leak into
    the next (tests run many in one process). A built-in command always wins a name clash.
    """

    META_KEY = "stage_stack.plugin_commands"

    def plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        root = ctx.find_root()
        if self.META_KEY not in root.meta:
            plugins = get_plugins(root.params.get("plugins_dirs") or None)
            scratch = click.Group()
            plugins.call_each("register_commands", lambda info: {"cli": scratch})
            for name in sorted(set(scratch.commands) & set(self.commands)):
                click.echo(f"warning: a plugin adds a command named {name!r}, which is a built-in "
                           "command; the built-in one is used", err=True)
            root.meta[self.META_KEY] = {n: c for n, c in scratch.commands.items() if n not in self.commands}
        return root.meta[self.META_KEY]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.plugin_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self.plugin_commands(ctx).get(cmd_name)
