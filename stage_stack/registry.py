"""The instrument registry: which instruments exist, how they sound by default, and which expert
file plays each one.

API (what the Arranger and the CLI use)::

    registry = Registry.load(user_file=None, overrides=None, plugin_dirs=None)
    registry.names                         # enabled instruments, in chain-position order
    registry.instrument("drums")           # -> Instrument; UnknownInstrumentError / InstrumentConflictError
    registry.default_chain                 # -> list[str], e.g. ["drums", "bass", "keys"]
    registry.resolve_expert("drums")       # -> ResolvedExpert(path, sha256, origin, source)
    registry.expert_path("drums")          # -> Path; ExpertNotInstalledError says the command that gets it
    registry.read_metadata("drums")        # -> ExpertMetadata, checked against the instrument
    registry.load_expert("drums", device="cpu", dtype="float32")   # -> stage_stack.expert.Expert
    registry.check_compatible([meta, ...]) # IncompatibleExpertError unless all share one codec
    registry.check_chain(["drums", "bass"])  # the same, on the instruments' resolved experts
    registry.install("drums", "x.safetensors" or "file:///...", force=False) -> InstalledExpert
    registry.problems                      # non-fatal: broken plugins, bad chain entries, ...
    registry.layers                        # where the config came from, lowest first
    install_codec("encodec.safetensors", sha256=None) -> Path

Instruments come from plugins (`register_instruments`, see stage_stack.hookspecs) and from
registry config entries that declare one (a `description` or `sources`).

Config layering, lowest first; each layer changes only the fields it sets:
    1. the package default, `stage_stack/registry.yaml` (the repo-root registry.yaml);
    2. the user file: `user_file=`, `stage-stack --registry FILE`, or STAGE_STACK_REGISTRY;
    3. `overrides=`: a dict of the same form, from the Python API.
Relative `path:` sources are relative to the real location (links followed) of the file that
names them; to the working directory for `overrides`.

Which file plays an instrument: the first of
    1. `sources` given in `overrides` (an explicit API choice);
    2. the expert installed with `stage-stack install` (in `paths.experts_dir()`);
    3. the instrument's sources, in order: the config files' `sources` if set, else the plugin's.
Hub sources are looked up in the local caches only; nothing is ever downloaded here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Sequence, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from . import faults, paths
from .atomic import atomic_path, atomic_write_text, stale_temp
from .confined import check_relative, inside
from .errors import (ExpertFormatError, ExpertNotInstalledError, IncompatibleExpertError, InstrumentConflictError,
                     IntegrityError, RegistryConfigError, StageStackError, UnknownInstrumentError)
from .locks import exclusive
from .plugins import Plugins, get_plugins

if TYPE_CHECKING:  # torch is imported only when an expert is read, so listing plugins stays fast
    from .expert import Expert, ExpertMetadata

ENV_REGISTRY = "STAGE_STACK_REGISTRY"
CONFIG_PLUGIN = "registry config"  # the `plugin` of instruments declared in a registry config
INSTALLED_INDEX = "installed.json"
INSTALLED_LOCK = ".installed.json.lock"


# -- field types ------------------------------------------------------------------------------

def _check_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{value!r} is not a sha256: expected 64 lowercase hex digits, as `sha256sum FILE` prints")
    return value


def _check_instrument_name(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", value):
        raise ValueError(f"{value!r} is not an instrument name: expected lowercase letters, digits, '-' or '_' "
                         "(like 'drums' or 'synth-pads')")
    return value


def _check_hub_id(value: str) -> str:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise ValueError(f"{value!r} is not a hub id: expected 'owner/name'")
    return value


def _check_file_url(value: str) -> str:
    file_url_to_path(value)
    return value


Sha256 = Annotated[str, AfterValidator(_check_sha256)]
InstrumentName = Annotated[str, AfterValidator(_check_instrument_name)]


# -- expert sources ---------------------------------------------------------------------------

class PathSource(BaseModel):
    """An expert file on this machine. `get` says how to obtain it when it is missing."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: Sha256 | None = None  # None: not pinned (e.g. a bundled file that ships with its plugin)
    get: str | None = None

    def describe(self) -> str:
        return self.path


class UrlSource(BaseModel):
    """A `file://` URL. Remote URLs are not resolved: stage-stack never downloads by itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: Annotated[str, AfterValidator(_check_file_url)]
    sha256: Sha256

    @property
    def local_path(self) -> Path:
        return file_url_to_path(self.url)

    def describe(self) -> str:
        return self.url


class HubSource(BaseModel):
    """A file in a model-hub repository, found in the local caches by its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hub: Annotated[str, AfterValidator(_check_hub_id)]
    filename: str
    sha256: Sha256

    def describe(self) -> str:
        return f"hub:{self.hub}/{self.filename}"


def _source_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((key for key in ("path", "url", "hub") if key in value), None)
    return {PathSource: "path", UrlSource: "url", HubSource: "hub"}.get(type(value))


ExpertSource = Annotated[
    Union[Annotated[PathSource, Tag("path")], Annotated[UrlSource, Tag("url")], Annotated[HubSource, Tag("hub")]],
    Discriminator(_source_kind, custom_error_type="expert_source",
                  custom_error_message="an expert source needs one of the keys 'path', 'url' (file://) or 'hub' "
                                       "(with 'filename' and 'sha256')"),
]


def file_url_to_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"{url!r}: only file:// URLs are read; stage-stack does not download. Download the file "
                         "yourself, then use a 'path' source or `stage-stack install INSTRUMENT FILE`")
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: a file URL must name a local file (file:///abs/path)")
    return Path(urllib.request.url2pathname(parsed.path))


# -- instruments ------------------------------------------------------------------------------

class Instrument(BaseModel):
    """What a plugin registers: one instrument and where its expert comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: InstrumentName
    description: str = ""
    default_prompt: str = ""  # the text prompt used when the user gives none (text-conditioned experts)
    default_gain_db: float = Field(0.0, ge=-60.0, le=12.0)  # mix gain applied to this stem by default
    chain_position: int = 100  # suggested order in a chain: lower goes first (drums 10, bass 20, ...)
    # Whether its stem carries pitch: a later layer whose expert names chords hears them in the
    # pitched layers only (Layer.chords; drums: False).
    pitched: bool = True
    license: str = "unknown"  # of the expert weights; the expert's own metadata wins once installed
    sources: tuple[ExpertSource, ...] = ()
    plugin: str = ""  # filled in by the registry: the plugin that registered it


# -- registry config (registry.yaml) ----------------------------------------------------------

class InstrumentConfig(BaseModel):
    """One `instruments: NAME:` entry. Every field is optional; set ones override lower layers."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    plugin: str | None = None  # which plugin's instrument wins when several register this name
    sources: list[ExpertSource] | None = None  # replaces the plugin's sources
    description: str | None = None
    default_prompt: str | None = None
    default_gain_db: float | None = Field(None, ge=-60.0, le=12.0)
    chain_position: int | None = None
    pitched: bool | None = None
    license: str | None = None

    @property
    def declares_instrument(self) -> bool:
        """An entry with a description or sources defines an instrument even without a plugin."""
        return self.description is not None or self.sources is not None


class RegistryConfig(BaseModel):
    """The whole file: `version`, the default `chain`, and per-instrument settings."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    chain: list[InstrumentName] | None = None
    instruments: dict[InstrumentName, InstrumentConfig] = Field(default_factory=dict)


_EXPECTED_FIELDS = {
    "registry": sorted(RegistryConfig.model_fields),
    "instrument": sorted(InstrumentConfig.model_fields),
    "path": sorted(PathSource.model_fields), "url": sorted(UrlSource.model_fields),
    "hub": sorted(HubSource.model_fields),
}


def _format_config_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = list(err["loc"])
        # Drop the union tag pydantic inserts after a source index ("sources.0.hub.sha256").
        for i in range(len(loc) - 1, 0, -1):
            if isinstance(loc[i - 1], int) and loc[i] in ("path", "url", "hub") and "sources" in loc:
                kind = loc.pop(i)
                break
        else:
            kind = None
        where = ".".join(str(p) for p in loc) or "<top level>"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            if len(loc) == 1:
                allowed = _EXPECTED_FIELDS["registry"]
            elif len(loc) == 3 and loc[0] == "instruments":
                allowed = _EXPECTED_FIELDS["instrument"]
            else:
                allowed = _EXPECTED_FIELDS.get(kind or "", [])
            message = f"unknown field; expected one of: {', '.join(allowed)}"
        lines.append(f"  field '{where}': {message}")
    return "\n".join(lines)


def _absolute_sources(config: RegistryConfig, base_dir: Path) -> RegistryConfig:
    """Make relative `path:` sources absolute, relative to the file that names them."""
    data = config.model_dump(exclude_unset=True)
    for entry in data.get("instruments", {}).values():
        for source in entry.get("sources") or []:
            if "path" in source:
                source["path"] = str((base_dir / Path(source["path"]).expanduser()))
    return RegistryConfig.model_validate(data)


def parse_config(data: Any, source: str, base_dir: Path) -> RegistryConfig:
    """Validate one layer; the error names the file, each bad field and the expected form."""
    if data is None:  # an empty file: nothing to override
        data = {}
    if not isinstance(data, dict):
        raise RegistryConfigError(f"registry config {source}: expected a mapping with the keys "
                                  f"{', '.join(_EXPECTED_FIELDS['registry'])}; got {type(data).__name__}")
    try:
        config = RegistryConfig.model_validate(data)
    except ValidationError as e:
        raise RegistryConfigError(f"registry config {source} is invalid:\n{_format_config_errors(e)}\n"
                                  "See docs/plugins.md (section 'registry.yaml') for the form.") from None
    return _absolute_sources(config, base_dir)


def read_config_file(path: str | os.PathLike) -> RegistryConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise RegistryConfigError(f"registry config {path}: no such file. Fix the path given with --registry, "
                                  f"{ENV_REGISTRY} or user_file=")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RegistryConfigError(f"registry config {path}: not valid YAML ({e})") from None
    # Relative to the file's real location: the package default is a link in a checkout.
    return parse_config(data, str(path), path.resolve().parent)


def layer_configs(configs: Sequence[RegistryConfig]) -> RegistryConfig:
    """Stack configs, lowest first: each one replaces only the fields it set."""
    merged: dict[str, Any] = {"instruments": {}}
    for config in configs:
        data = config.model_dump(exclude_unset=True)
        for key, value in data.items():
            if key == "instruments":
                for name, entry in value.items():
                    merged["instruments"].setdefault(name, {}).update(entry)
            else:
                merged[key] = value
    return RegistryConfig.model_validate(merged)


def package_config_path() -> Path:
    return Path(str(resources.files("stage_stack") / "registry.yaml"))


# -- installed experts ------------------------------------------------------------------------

def _check_installed_file(value: str) -> str:
    check_relative(value)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}/[0-9a-f]{64}\.safetensors", value):
        raise ValueError(f"{value!r}: expected INSTRUMENT/SHA256.safetensors, the name `stage-stack install` gives "
                         "its copies")
    return value


class InstalledExpert(BaseModel):
    """One record of `installed.json`: an expert copied into the cache by `stage-stack install`."""

    model_config = ConfigDict(extra="forbid")
    instrument: str
    # relative to paths.experts_dir(), and only ever a name install wrote: the file is deleted
    # when the instrument gets another expert, so a hand-edited index must not name anything else
    file: Annotated[str, AfterValidator(_check_installed_file)]
    sha256: Sha256
    size: int
    source: str  # what the user installed it from
    installed_at: str
    license: str = "unknown"
    base_model: str = "none"

    @property
    def path(self) -> Path:
        return inside(paths.experts_dir(), self.file)


class InstalledIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    experts: dict[str, InstalledExpert] = Field(default_factory=dict)

    @classmethod
    def read(cls) -> "InstalledIndex":
        path = paths.experts_dir() / INSTALLED_INDEX
        if not path.is_file():
            return cls()
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, UnicodeDecodeError) as e:
            detail = _format_config_errors(e) if isinstance(e, ValidationError) else f"  {e}"
            raise RegistryConfigError(f"installed-experts index {path} is invalid:\n{detail}\n"
                                      "Move it aside and reinstall the experts with `stage-stack install`.") from None

    def write(self) -> None:
        atomic_write_text(paths.experts_dir() / INSTALLED_INDEX, self.model_dump_json(indent=2) + "\n")


@contextmanager
def installing():
    """Hold the lock of installed.json: every read-modify-write of the index (and of the expert
    copies it names) happens under it, so concurrent installs each keep their record. Waits."""
    folder = paths.experts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / INSTALLED_LOCK, f"the installed-experts index {folder / INSTALLED_INDEX}", wait=True):
        yield


def remove_orphan_copies(index: InstalledIndex) -> list[Path]:
    """Delete expert copies install wrote (INSTRUMENT/SHA256.safetensors) that no record names:
    left by an install killed between its copy and its index write. Call under `installing()`."""
    folder, named = paths.experts_dir(), {record.file for record in index.experts.values()}
    removed = []
    for path in sorted(folder.glob("*/*.safetensors")):
        rel = path.relative_to(folder).as_posix()
        if rel not in named and re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}/[0-9a-f]{64}\.safetensors", rel) \
                and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in sorted(folder.glob("*/.*.tmp")):
        if stale_temp(path.name):
            path.unlink(missing_ok=True)
    return removed


def _atomic_copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def expected_sha256(value: str | None, what: str) -> str | None:
    """A user-given sha256 (any case, surrounding spaces ignored); a malformed one is named as such."""
    if value is None:
        return None
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise StageStackError(f"--sha256 {value!r} for {what} is not a sha256: expected 64 hex digits, as "
                              "`sha256sum FILE` prints")
    return digest


def source_file(path_or_url: str | os.PathLike, kind: str, what: str) -> Path:
    """The local file to install from; a directory or a missing file is named as such."""
    src = local_file(path_or_url)
    if src.is_dir():
        found = sorted(p.name for p in src.glob("*.safetensors"))[:5]
        raise StageStackError(f"{src} is a directory; give the {kind} file itself"
                              + (f", e.g. {src / found[0]} (it holds {', '.join(found)})" if found else
                                 " (it holds no .safetensors file)"))
    if not src.is_file():
        raise StageStackError(f"{src}: no such file ({what})")
    return src


def local_file(path_or_url: str | os.PathLike) -> Path:
    """A user-given PATH_OR_URL as a local path (file:// URLs and paths only)."""
    text = str(path_or_url)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", text):
        try:
            return file_url_to_path(text)
        except ValueError as e:
            raise StageStackError(str(e)) from None
    return Path(text).expanduser()


def hub_cache_dirs() -> list[Path]:
    """Where a hub client keeps downloads (read only; stage-stack itself never downloads)."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    return [Path.home() / ".cache" / "huggingface" / "hub"]


def install_codec(path_or_url: str | os.PathLike, sha256: str | None = None) -> Path:
    """Check a standalone codec file and copy it to `paths.codec_dir()/<sha256>.safetensors`.

    Experts reference a shared codec by filename + sha256; `expert.resolve_codec_file` finds it
    under its digest, so two codecs that happen to share a file name never collide.
    """
    from .expert import build_empty, read_header, sha256_file
    from .errors import CheckpointKeyError
    from .models.codec import Codec, CodecConfig

    src = source_file(path_or_url, "codec", "a codec")
    sha256 = expected_sha256(sha256, str(src))
    header, entries = read_header(src)
    header = header or {}
    if json.loads(header.get("kind", "null")) != "codec" or "codec_config" not in header:
        raise ExpertFormatError(f"{src}: not a stage-stack codec file (its safetensors metadata needs "
                                "kind: \"codec\" and codec_config, as `stage_stack.expert.save_codec` writes). "
                                "An expert file is installed with `stage-stack install INSTRUMENT FILE`.")
    try:
        config = CodecConfig.from_dict(json.loads(header["codec_config"]))
    except (ValueError, TypeError) as e:
        raise ExpertFormatError(f"{src}: invalid codec_config in its metadata ({e})") from None
    expected = {k: tuple(v.shape) for k, v in build_empty(lambda: Codec(config)).model.state_dict().items()}
    present = {k: tuple(shape) for k, (_, shape) in entries.items()}
    mis_shaped = [(k, present[k], expected[k]) for k in expected if k in present and present[k] != expected[k]]
    if set(expected) != set(present) or mis_shaped:
        raise CheckpointKeyError(str(src), sorted(set(expected) - set(present)),
                                 sorted(set(present) - set(expected)), mis_shaped)
    digest = sha256_file(src)
    if sha256 is not None and digest != sha256:
        raise IntegrityError(f"{src}: sha256 is {digest}, expected {sha256}. The file is corrupt or another "
                             "version; get it again.")
    dest = paths.codec_dir() / f"{digest}.safetensors"
    if not (dest.is_file() and sha256_file(dest) == digest):
        _atomic_copy(src, dest)
    return dest


# -- the registry -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResolvedExpert:
    instrument: str
    path: Path
    sha256: str | None  # verified (or recorded at install) digest; None when the source is unpinned
    origin: str  # "override", "installed", "path", "url" or "hub"
    source: str  # human-readable: where it came from


@dataclasses.dataclass(frozen=True)
class InstrumentStatus:
    """One row of `stage-stack instruments`: the instrument, or why it cannot be used."""

    name: str
    instrument: Instrument | None
    state: str  # "enabled", "disabled" or "conflict"
    message: str = ""


class Registry:
    """Instruments from plugins + layered config, and the resolution of their experts."""

    def __init__(self, config: RegistryConfig, layers: list[str], plugins: Plugins,
                 override_sources: dict[str, list] | None = None) -> None:
        self.config = config
        self.layers = layers
        self.plugins = plugins
        self.config_problems: list[str] = []  # config entries that name nothing usable
        self._override_sources = override_sources or {}
        self._enabled: dict[str, Instrument] = {}
        self._disabled: dict[str, Instrument] = {}
        self._conflicts: dict[str, str] = {}
        self._digests: dict[tuple, str] = {}
        self._collect()

    @classmethod
    def load(cls, user_file: str | os.PathLike | None = None, overrides: dict | RegistryConfig | None = None,
             plugin_dirs: Iterable[str | os.PathLike] | None = None, plugins: Plugins | None = None,
             default_file: str | os.PathLike | None = None) -> "Registry":
        """Build the registry: package default < user file < overrides (see the module docstring).

        user_file None reads STAGE_STACK_REGISTRY (unset: no user file). plugin_dirs None reads
        STAGE_STACK_PLUGINS_DIR. `plugins` replaces plugin discovery (tests).
        """
        default_path = Path(default_file) if default_file is not None else package_config_path()
        configs, layers = [read_config_file(default_path)], [str(default_path)]
        if user_file is None and os.environ.get(ENV_REGISTRY):
            user_file = os.environ[ENV_REGISTRY]
        if user_file is not None:
            configs.append(read_config_file(user_file))
            layers.append(str(Path(user_file).expanduser()))
        override_sources: dict[str, list] = {}
        if overrides is not None:
            override = overrides if isinstance(overrides, RegistryConfig) else \
                parse_config(overrides, "overrides (Registry.load argument)", Path.cwd())
            configs.append(override)
            layers.append("overrides")
            override_sources = {name: list(entry.sources) for name, entry in override.instruments.items()
                                if entry.sources is not None}
        plugins = plugins if plugins is not None else get_plugins(plugin_dirs)
        return cls(layer_configs(configs), layers, plugins, override_sources)

    # -- building ------------------------------------------------------------------------------
    def _collect(self) -> None:
        registered = self._registrations()
        for name, entry in self.config.instruments.items():
            if name not in registered and entry.declares_instrument and entry.plugin in (None, CONFIG_PLUGIN):
                registered[name] = [Instrument(name=name, plugin=CONFIG_PLUGIN)]

        for name, candidates in registered.items():
            entry = self.config.instruments.get(name, InstrumentConfig())
            chosen = self._choose(name, candidates, entry)
            if chosen is not None:
                (self._enabled if entry.enabled else self._disabled)[name] = self._apply_config(chosen, entry)

        for name, entry in self.config.instruments.items():
            if name not in registered and entry.enabled and not entry.declares_instrument:
                self.config_problems.append(
                    f"registry config sets instruments.{name}, but no plugin registers {name!r} "
                    "(is its plugin installed and loading? see `stage-stack plugins`)")
        for name in self.config.chain or []:
            if name not in self._enabled:
                why = ("is disabled" if name in self._disabled else "has a conflict" if name in self._conflicts
                       else "is not registered by any plugin")
                self.config_problems.append(
                    f"registry config chain names {name!r}, which {why}; it is left out of the default chain")

    def _registrations(self) -> dict[str, list[Instrument]]:
        """{name: [Instrument, ...]} from every plugin's register_instruments hook."""
        per_plugin: dict[str, list[Instrument]] = {}

        def kwargs_for(info) -> dict[str, Any]:
            mine = per_plugin.setdefault(info.name, [])

            def register(instrument: Instrument) -> None:
                if not isinstance(instrument, Instrument):
                    raise TypeError("register() takes a stage_stack.registry.Instrument, "
                                    f"got {type(instrument).__name__}")
                if any(i.name == instrument.name for i in mine):
                    raise ValueError(f"instrument {instrument.name!r} registered twice by this plugin")
                mine.append(instrument.model_copy(update={"plugin": info.name}))
            return {"register": register}

        registered: dict[str, list[Instrument]] = {}
        # A plugin whose hook raised contributes nothing: half a registration is worse than none.
        for info in self.plugins.call_each("register_instruments", kwargs_for):
            for instrument in per_plugin[info.name]:
                registered.setdefault(instrument.name, []).append(instrument)
        return registered

    def _choose(self, name: str, candidates: list[Instrument], entry: InstrumentConfig) -> Instrument | None:
        plugins = [c.plugin for c in candidates]
        if entry.plugin is not None:
            match = [c for c in candidates if c.plugin == entry.plugin]
            if match:
                return match[0]
            self._conflicts[name] = (f"the registry config says instrument {name!r} comes from plugin "
                                     f"{entry.plugin!r} (instruments.{name}.plugin), but only "
                                     f"{', '.join(map(repr, plugins))} register(s) it. Fix instruments.{name}.plugin "
                                     "in your registry file (`stage-stack plugins` lists the plugin names).")
            return None
        if len(candidates) > 1:
            self._conflicts[name] = (f"instrument {name!r} is registered by {len(candidates)} plugins: "
                                     f"{' and '.join(map(repr, plugins))}. Say which one wins in your registry file "
                                     f"(--registry or {ENV_REGISTRY}):\n  instruments:\n    {name}:\n"
                                     f"      plugin: {plugins[-1]}")
            return None
        return candidates[0]

    @staticmethod
    def _apply_config(instrument: Instrument, entry: InstrumentConfig) -> Instrument:
        update = {key: getattr(entry, key) for key in
                  ("description", "default_prompt", "default_gain_db", "chain_position", "pitched", "license")
                  if getattr(entry, key) is not None}
        if entry.sources is not None:
            update["sources"] = tuple(entry.sources)
        return instrument.model_copy(update=update)

    @property
    def problems(self) -> list[str]:
        """Everything that did not work but did not stop the registry: broken plugins, conflicts, config."""
        return [str(f) for f in self.plugins.failures] + list(self._conflicts.values()) + self.config_problems

    # -- instruments ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._enabled, key=lambda n: (self._enabled[n].chain_position, n))

    @property
    def instruments(self) -> list[Instrument]:
        return [self._enabled[n] for n in self.names]

    def statuses(self) -> list[InstrumentStatus]:
        """Every instrument the plugins and configs name, usable or not: the enabled ones (in chain
        order), then the disabled ones and the name conflicts, each with a message saying why it
        cannot be used. `names`/`instruments` list only the usable ones; whether an enabled
        instrument's expert is installed is `resolve_expert` (what `stage-stack instruments` shows)."""
        rows = [InstrumentStatus(n, self._enabled[n], "enabled") for n in self.names]
        rows += [InstrumentStatus(n, i, "disabled", f"disabled by the registry config (instruments.{n}.enabled)")
                 for n, i in sorted(self._disabled.items())]
        rows += [InstrumentStatus(n, None, "conflict", msg) for n, msg in sorted(self._conflicts.items())]
        return rows

    def instrument(self, name: str) -> Instrument:
        if name in self._enabled:
            return self._enabled[name]
        if name in self._conflicts:
            raise InstrumentConflictError(self._conflicts[name])
        if name in self._disabled:
            raise UnknownInstrumentError(f"instrument {name!r} is disabled by the registry config "
                                         f"(instruments.{name}.enabled: false); set it to true to use it")
        known = ", ".join(self.names) or "none"
        raise UnknownInstrumentError(f"unknown instrument {name!r}; known instruments: {known}. "
                                     "Plugins add more (`stage-stack plugins`), or declare one in your registry file.")

    @property
    def default_chain(self) -> list[str]:
        if self.config.chain is None:
            return self.names
        return [name for name in self.config.chain if name in self._enabled]

    # -- experts -------------------------------------------------------------------------------
    def _digest(self, path: Path) -> str:
        from .expert import sha256_file

        stat = path.stat()
        key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256_file(path)
        return self._digests[key]

    def _verified(self, name: str, path: Path, sha256: str | None, what: str) -> None:
        if sha256 is not None and self._digest(path) != sha256:
            raise IntegrityError(f"{name}: {path} (from {what}) has sha256 {self._digest(path)}, but the registry "
                                 f"expects {sha256}. The file is corrupt or another version: replace it, or "
                                 f"install the right one with `stage-stack install {name} PATH_OR_URL`.")

    def _find_in_hub_caches(self, name: str, source: HubSource) -> Path | None:
        installed = paths.experts_dir() / name / f"{source.sha256}.safetensors"
        if installed.is_file():
            return installed
        owner, repo = source.hub.split("/", 1)
        for cache in hub_cache_dirs():
            for candidate in sorted((cache / f"models--{owner}--{repo}" / "snapshots").glob(f"*/{source.filename}")):
                if candidate.is_file() and self._digest(candidate) == source.sha256:
                    return candidate
        return None

    def _try_source(self, name: str, source: PathSource | UrlSource | HubSource) -> tuple[ResolvedExpert | None, str]:
        """(resolved, "") when the source has a local file, else (None, how to get it)."""
        if isinstance(source, HubSource):
            found = self._find_in_hub_caches(name, source)
            if found is not None:
                return ResolvedExpert(name, found, source.sha256, "hub", source.describe()), ""
            return None, (f"{source.hub}/{source.filename} (sha256 {source.sha256[:12]}...) is not in the local "
                          f"caches; stage-stack never downloads at run time. Get it with\n"
                          f"      huggingface-cli download {source.hub} {source.filename}\n"
                          f"    (its cache is read), or download it any other way and run\n"
                          f"      stage-stack install {name} PATH/{source.filename}")
        path = source.local_path if isinstance(source, UrlSource) else Path(source.path)
        kind = "url" if isinstance(source, UrlSource) else "path"
        if path.is_file():
            self._verified(name, path, source.sha256, source.describe())
            return ResolvedExpert(name, path, source.sha256, kind, source.describe()), ""
        get = getattr(source, "get", None) or \
            f"put the file there, or run\n      stage-stack install {name} PATH_OR_URL"
        return None, f"{path} does not exist; {get}"

    def resolve_expert(self, name: str) -> ResolvedExpert:
        """The local expert file for an instrument (see the module docstring for the order)."""
        instrument = self.instrument(name)
        misses: list[str] = []
        for source in self._override_sources.get(name, []):
            resolved, why = self._try_source(name, source)
            if resolved:
                return dataclasses.replace(resolved, origin="override")
            misses.append(why)
        record = InstalledIndex.read().experts.get(name)
        if record is not None:
            if record.path.is_file():
                return ResolvedExpert(name, record.path, record.sha256, "installed", record.source)
            misses.append(f"the installed copy {record.path} is gone; reinstall it with\n"
                          f"      stage-stack install {name} {record.source}")
        for source in instrument.sources:
            if source in self._override_sources.get(name, []):
                continue  # already tried first
            resolved, why = self._try_source(name, source)
            if resolved:
                return resolved
            misses.append(why)
        if not misses:
            misses.append(f"the instrument lists no expert source; install one with\n"
                          f"      stage-stack install {name} PATH_OR_URL")
        raise ExpertNotInstalledError(f"no expert is installed for {name!r} (plugin {instrument.plugin!r}):\n"
                                      + "\n".join(f"  - {m}" for m in misses))

    def expert_path(self, name: str) -> Path:
        return self.resolve_expert(name).path

    def is_installed(self, name: str) -> bool:
        try:
            self.resolve_expert(name)
        except ExpertNotInstalledError:
            return False
        return True

    def read_metadata(self, name: str) -> "ExpertMetadata":
        """The metadata of the instrument's expert, checked to be an expert for that instrument."""
        from .expert import read_metadata

        path = self.expert_path(name)
        metadata = read_metadata(path)
        check_instrument(name, metadata, path)
        return metadata

    def load_expert(self, name: str, device: str = "cpu", dtype: str = "float32",
                    codec_dirs: Sequence[str | os.PathLike] = (), load_text: bool = True) -> "Expert":
        """Resolve and load an instrument's expert (sha256 already verified when pinned)."""
        from .expert import load_expert, read_metadata

        path = self.expert_path(name)
        check_instrument(name, read_metadata(path), path)  # cheap, before the weights are read
        return load_expert(path, device=device, dtype=dtype, codec_dirs=codec_dirs, load_text=load_text)

    def check_compatible(self, metadata: Sequence["ExpertMetadata | Expert"]) -> None:
        check_compatible(metadata)

    def check_chain(self, names: Sequence[str]) -> None:
        """All these instruments' experts can be chained (IncompatibleExpertError naming two that cannot)."""
        check_compatible([self.read_metadata(n) for n in names])

    # -- install -------------------------------------------------------------------------------
    def install(self, name: str, path_or_url: str | os.PathLike, sha256: str | None = None,
                force: bool = False) -> InstalledExpert:
        """Verify an expert file and copy it into the cache as the instrument's expert.

        Checks: the sha256 (when given), the metadata, that it is an expert for `name`, that it
        loads, and (unless force) that its codec matches the other experts of the default chain.
        """
        from .expert import load_expert, read_metadata, resolve_codec_file, sha256_file

        self.instrument(name)
        src = source_file(path_or_url, "expert", f"installing an expert for {name!r}")
        sha256 = expected_sha256(sha256, str(src))
        digest = sha256_file(src)
        if sha256 is not None and digest != sha256:
            raise IntegrityError(f"{src}: sha256 is {digest}, expected {sha256}. The file is corrupt or another "
                                 "version; get it again.")
        metadata = read_metadata(src)
        check_instrument(name, metadata, src)
        if not metadata.codec.embedded:
            # A shared codec found beside the source file goes to the codec directory, where the
            # cached copy of the expert will look for it.
            codec_file = resolve_codec_file(metadata.codec, src)
            if codec_file.parent.absolute() != paths.codec_dir().absolute():
                install_codec(codec_file, sha256=metadata.codec.sha256)
        load_expert(src, device="cpu", load_text=False)  # every key and shape, and the codec, resolve
        if not force:
            for other in self.default_chain:
                if other == name:
                    continue
                try:
                    other_metadata = self.read_metadata(other)
                except StageStackError:  # not installed, or broken (`stage-stack doctor` reports it)
                    continue
                try:
                    check_compatible([other_metadata, metadata])
                except IncompatibleExpertError as e:
                    raise IncompatibleExpertError(f"{e}\nInstall a {name!r} expert built on the same codec, or "
                                                  "pass --force (force=True) to install it anyway; a chain "
                                                  "with both will be refused.") from None

        with installing():  # read, copy, write the index and drop the replaced copy as one step
            index = InstalledIndex.read()
            dest_rel = f"{name}/{digest}.safetensors"
            dest = paths.experts_dir() / dest_rel
            if not (dest.is_file() and sha256_file(dest) == digest):
                _atomic_copy(src, dest)
            faults.point("install:copied")
            previous = index.experts.get(name)
            record = InstalledExpert(
                instrument=name, file=dest_rel, sha256=digest, size=src.stat().st_size,
                source=str(path_or_url) if "://" in str(path_or_url) else str(src.absolute()),
                installed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                license=metadata.license, base_model=metadata.base_model)
            index.experts[name] = record
            index.write()
            faults.point("install:indexed")
            # Our copy of the replaced expert is dropped (the user's original file is never
            # touched), and so is any copy an install killed half-way left behind.
            if previous is not None and previous.file != dest_rel and previous.file not in \
                    {r.file for r in index.experts.values()}:
                previous.path.unlink(missing_ok=True)
            remove_orphan_copies(index)
        return record


def check_instrument(name: str, metadata: "ExpertMetadata", path: str | os.PathLike) -> None:
    if metadata.instrument != name:
        raise IncompatibleExpertError(
            f"{path} is an expert for {metadata.instrument!r} (its metadata field 'instrument'), but it is "
            f"used for the instrument {name!r}. Use a {name!r} expert, or install this one as "
            f"`stage-stack install {metadata.instrument} {path}`.")


def _codec_signature(metadata: "ExpertMetadata") -> dict[str, Any]:
    return {"sample_rate": metadata.sample_rate, "frame_rate": metadata.frame_rate,
            **{f"codec_config.{k}": v for k, v in metadata.codec_cfg.to_dict().items()}}


def check_compatible(metadata: Sequence["ExpertMetadata | Expert"]) -> None:
    """Every expert of a chain must use the same codec (config, sample rate and frame rate)."""
    metas = [getattr(m, "metadata", m) for m in metadata]
    if not metas:
        return
    first, want = metas[0], _codec_signature(metas[0])
    for other in metas[1:]:
        got = _codec_signature(other)
        diffs = [f"{key} {want[key]} vs {got[key]}" for key in want if want[key] != got[key]]
        if diffs:
            raise IncompatibleExpertError(
                f"the {first.instrument!r} and {other.instrument!r} experts cannot be chained: their codecs "
                f"differ ({'; '.join(diffs)}). Every expert in a chain must use the same codec.")
