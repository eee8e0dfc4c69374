"""Registry commands: `plugins`, `instruments`, `doctor`, `install`, `install-codec`, `new-plugin`."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import click

from . import cli, user_errors
from .. import __version__, paths
from ..errors import ExpertNotInstalledError, StageStackError
from ..plugins import Plugins, get_plugins
from ..registry import INSTALLED_INDEX, InstalledIndex, Registry, install_codec
from ..scaffold import write_plugin

MIN_TORCH = (2, 4)


def registry_from_context(ctx: click.Context | None = None) -> Registry:
    """The registry for this invocation, from the global --registry and --plugins-dir options."""
    root = (ctx or click.get_current_context()).find_root()
    return Registry.load(user_file=root.params.get("registry_file"),
                         plugin_dirs=root.params.get("plugins_dirs") or None)


def plugins_from_context(ctx: click.Context | None = None) -> Plugins:
    root = (ctx or click.get_current_context()).find_root()
    return get_plugins(root.params.get("plugins_dirs") or None)




def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


# -- plugins ----------------------------------------------------------------------------------

def plugin_rows(plugins: Plugins) -> list[dict]:
    errors: dict[str, list[str]] = {}
    for failure in plugins.failures:
        errors.setdefault(failure.plugin, []).append(
            f"{failure.stage}: {type(failure.error).__name__}: {failure.error}")
    rows = [{"name": info.name, "version": info.version, "source": info.source, "location": info.location,
             "hooks": plugins.hooks(info.name), "errors": errors.pop(info.name, [])} for info in plugins.infos]
    for failure in plugins.failures:  # failures of things that never became a plugin (a missing dir, ...)
        if failure.plugin in errors:
            rows.append({"name": failure.plugin, "version": None, "source": failure.source,
                         "location": failure.location, "hooks": [], "errors": errors.pop(failure.plugin)})
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List plugins: name, version, hooks and source (and the error of any that failed)."""
    loaded = plugins_from_context(ctx)
    # Run every hook once, so a plugin that fails inside one is listed with its error.
    try:
        registry_from_context(ctx)
    except StageStackError as e:
        _warn(f"the registry could not be built: {e}")
    loaded.call_each("register_commands", lambda info: {"cli": click.Group()})
    rows = plugin_rows(loaded)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    def source(row):
        return {"built-in": "built-in", "entry point": f"entry point {row['location']}"}.get(row["source"],
                                                                                           row["location"])

    click.echo(_table(["NAME", "VERSION", "HOOKS", "SOURCE"],
                      [[r["name"], r["version"] or "-", ", ".join(r["hooks"]) or "-", source(r)] for r in rows]))
    for row in rows:
        for error in row["errors"]:
            click.echo(f"FAILED {row['name']} ({row['location']}): {error}", err=True)


# -- instruments ------------------------------------------------------------------------------

def instrument_rows(registry: Registry) -> list[dict]:
    rows = []
    for status in registry.statuses():
        inst = status.instrument
        row = {"name": status.name, "plugin": inst.plugin if inst else None, "status": status.state,
               "installed": False, "expert": None, "origin": None, "sha256": None,
               "license": inst.license if inst else None,
               "sources": [s.describe() for s in inst.sources] if inst else [],
               "description": inst.description if inst else None,
               "default_prompt": inst.default_prompt if inst else None,
               "default_gain_db": inst.default_gain_db if inst else None,
               "chain_position": inst.chain_position if inst else None,
               "message": status.message or None}
        if status.state == "enabled":
            try:
                resolved = registry.resolve_expert(status.name)
                metadata = registry.read_metadata(status.name)
            except ExpertNotInstalledError as e:
                row.update(status="not installed", message=str(e))
            except StageStackError as e:
                row.update(status="broken", message=str(e))
            else:
                row.update(status="installed", installed=True, expert=str(resolved.path), origin=resolved.origin,
                           sha256=resolved.sha256, license=metadata.license)
        rows.append(row)
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@user_errors
def instruments(ctx: click.Context, as_json: bool) -> None:
    """List instruments: name, plugin, expert source, whether it is installed, and license."""
    registry = registry_from_context(ctx)
    rows = instrument_rows(registry)
    if as_json:
        click.echo(json.dumps({"default_chain": registry.default_chain, "layers": registry.layers,
                               "instruments": rows, "problems": registry.problems}, indent=2))
        return

    def source(row):
        if row["installed"]:
            return f"{row['origin']}: {row['expert']}"
        return " | ".join(row["sources"]) or "(none)"

    click.echo(_table(["NAME", "PLUGIN", "STATUS", "LICENSE", "EXPERT SOURCE"],
                      [[r["name"], r["plugin"] or "-", r["status"], r["license"] or "-", source(r)] for r in rows]))
    click.echo(f"default chain: {', '.join(registry.default_chain) or '(empty)'}")
    missing = [r["name"] for r in rows if r["status"] == "not installed"]
    if missing:
        click.echo(f"not installed: {', '.join(missing)}; get one with "
                   f"`stage-stack install {missing[0]} PATH_OR_URL` (--json says why each is missing)")
    for row in rows:
        if row["status"] in ("broken", "conflict"):
            _warn(f"{row['name']}: {row['message']}")
    for problem in registry.problems:
        _warn(problem)


# -- doctor -----------------------------------------------------------------------------------

class Report:
    """Collects doctor's checks; any FAIL makes the exit status non-zero."""

    def __init__(self) -> None:
        self.failed = 0

    def line(self, status: str, what: str, detail: str = "") -> None:
        if status == "FAIL":
            self.failed += 1
        click.echo(f"[{status:^4}] {what}" + (f": {detail}" if detail else ""))


def _check_beat_tracker(report: Report) -> None:
    """The bundled beat tracker (Layer.beats "heard"): a warning, not a failure, when missing."""
    from ..beat_tracking import DEFAULT_BEAT_TRACKER, load_beat_tracker

    try:
        tracker = load_beat_tracker()
    except (FileNotFoundError, ValueError) as e:
        report.line("warn", "beat tracker", f"{e}; drums over a mix then hear the mix (Layer.beats 'own')")
        return
    params = sum(p.numel() for p in tracker.parameters())
    report.line("ok", "beat tracker", f"{DEFAULT_BEAT_TRACKER} ({params:,} parameters)")


def _check_native_kernels(report: Report) -> None:
    """The C decode kernels (stage_stack.native): a warning when they cannot be built or run here,
    since decoding then keeps torch's kernels (slower, not wrong); what this machine chose."""
    from .. import native
    from ..machine import kernel_choices

    built = native.load()
    if not (built.linear_bf16 and built.avx512):
        report.line("warn", "native kernels", f"{built.reason}; decoding uses torch's kernels")
        return
    k = kernel_choices()
    report.line("ok", "native kernels", f"{built.path.name}; chosen here: bf16 products {k.bf16_decode_linear}, "
                                        f"int8 products {k.int8_decode}, int8-cache attention "
                                        f"{k.decode_attention_int8}")


def _check_torch(report: Report) -> bool:
    try:
        import torch
    except Exception as e:
        report.line("FAIL", "torch", f"cannot be imported ({type(e).__name__}: {e}); pip install 'torch>=2.4'")
        return False
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_TORCH:
        report.line("FAIL", "torch", f"{torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}; upgrade it")
    else:
        report.line("ok", "torch", torch.__version__)
    report.line("ok", "cpu", f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report.line("ok", "cuda", f"{len(names)} device(s): {', '.join(names)}")
    else:
        report.line("-", "cuda", f"not available (torch CUDA build: {torch.version.cuda or 'none'}); "
                                 "experts run on the CPU")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        report.line("ok", "mps", "available")
    return True


def _check_cache(report: Report) -> None:
    for directory in (paths.experts_dir(), paths.codec_dir()):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
                pass
        except OSError as e:
            report.line("FAIL", "cache", f"{directory} is not writable ({e}); fix its permissions or set "
                                         "STAGE_STACK_HOME to a writable directory")
            return
    report.line("ok", "cache", f"{paths.home()} is writable")


def _check_installed(report: Report) -> None:
    from ..expert import read_metadata, resolve_codec_file, sha256_file
    from ..registry import check_instrument

    try:
        index = InstalledIndex.read()
    except StageStackError as e:
        report.line("FAIL", "installed experts", str(e))
        return
    if not index.experts:
        report.line("-", "installed experts", f"none in {paths.experts_dir() / INSTALLED_INDEX}")
    for name, record in sorted(index.experts.items()):
        what = f"installed expert {name}"
        if not record.path.is_file():
            report.line("FAIL", what, f"{record.path} is missing; reinstall with `stage-stack install {name} "
                                      f"{record.source}`")
            continue
        digest = sha256_file(record.path)
        if digest != record.sha256:
            report.line("FAIL", what, f"{record.path} has sha256 {digest}, recorded {record.sha256}; reinstall with "
                                      f"`stage-stack install {name} {record.source}`")
            continue
        try:
            metadata = read_metadata(record.path)
            check_instrument(name, metadata, record.path)
            if not metadata.codec.embedded:
                resolve_codec_file(metadata.codec, record.path)
        except StageStackError as e:
            report.line("FAIL", what, str(e))
            continue
        report.line("ok", what, f"sha256 {digest[:12]}..., {metadata.sample_rate} Hz, license {metadata.license}")


def _check_instruments(report: Report, registry: Registry) -> None:
    for row in instrument_rows(registry):
        what = f"instrument {row['name']}"
        if row["status"] == "installed":
            if row["origin"] == "installed":
                continue  # checked above with its recorded sha256
            pinned = f"sha256 verified ({row['sha256'][:12]}...)" if row["sha256"] else \
                "sha256 not pinned (add `sha256:` to its registry.yaml source to detect a changed file)"
            report.line("ok" if row["sha256"] else "-", what, f"{row['origin']} {row['expert']}; {pinned}")
        elif row["status"] == "not installed":
            # The first reason is enough here; `stage-stack instruments --json` has all of them.
            reason = row["message"].splitlines()[1].strip().removeprefix("- ").split(";")[0]
            in_chain = row["name"] in registry.default_chain
            report.line("warn" if in_chain else "-", what, f"not installed ({reason}); get one with "
                                                           f"`stage-stack install {row['name']} PATH_OR_URL`")
        elif row["status"] in ("broken", "conflict"):
            report.line("FAIL", what, row["message"])
    chain = [n for n in registry.default_chain if registry.is_installed(n)]
    if len(chain) > 1:
        try:
            registry.check_chain(chain)
            # Same codec config, not the same weights: each expert encodes its context with its
            # own codec (the demo drums, bass and keys embed three), which is all chaining needs.
            report.line("ok", "default chain", f"{', '.join(chain)} can be chained (one codec config; each "
                                               "expert hears through its own codec weights)")
        except StageStackError as e:
            report.line("FAIL", "default chain", str(e))


def _check_codecs(report: Report) -> None:
    from ..expert import sha256_file

    for path in sorted(paths.codec_dir().glob("*.safetensors")):
        if re.fullmatch(r"[0-9a-f]{64}", path.stem) and sha256_file(path) != path.stem:
            report.line("FAIL", f"codec {path.name}", "its content does not match its sha256 name; reinstall it "
                                                      "with `stage-stack install-codec FILE`")
        else:
            report.line("ok", f"codec {path.name[:16]}...")


@cli.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check torch, the devices, the cache, plugins and each installed expert's integrity."""
    report = Report()
    report.line("ok", "stage-stack", f"{__version__} on Python {sys.version.split()[0]}")
    torch_ok = _check_torch(report)
    _check_cache(report)
    try:
        registry = registry_from_context(ctx)
    except StageStackError as e:
        report.line("FAIL", "registry config", str(e))
        registry = None
    if registry is not None:
        report.line("ok", "registry config", " < ".join(registry.layers))
        plugins = registry.plugins
        plugins.call_each("register_commands", lambda info: {"cli": click.Group()})
        loaded = [i for i in plugins.infos if plugins.manager.has_plugin(i.name)]
        report.line("ok", "plugins", f"{len(loaded)} loaded")
        for failure in plugins.failures:
            report.line("FAIL", f"plugin {failure.plugin}", f"{failure.stage}: {type(failure.error).__name__}: "
                                                            f"{failure.error} ({failure.location})")
        for problem in registry.config_problems:
            report.line("warn", "registry", problem)
    if torch_ok:
        _check_installed(report)
        if registry is not None:
            _check_instruments(report, registry)
        _check_codecs(report)
        _check_beat_tracker(report)
        _check_native_kernels(report)
    if report.failed:
        click.echo(f"{report.failed} problem(s) found.", err=True)
        ctx.exit(1)
    click.echo("No problems found.")


# -- install ----------------------------------------------------------------------------------

@cli.command()
@click.argument("instrument")
@click.argument("path_or_url")
@click.option("--sha256", help="Refuse the file unless its sha256 is this.")
@click.option("--force", is_flag=True, help="Install even if its codec differs from the default chain's experts.")
@click.pass_context
@user_errors
def install(ctx: click.Context, instrument: str, path_or_url: str, sha256: str | None, force: bool) -> None:
    """Verify an expert file (a path or file:// URL) and install it as INSTRUMENT's expert."""
    record = registry_from_context(ctx).install(instrument, path_or_url, sha256=sha256, force=force)
    click.echo(f"Installed {instrument}: {record.path} (sha256 {record.sha256[:12]}..., "
               f"{record.size / 1e6:.1f} MB, license {record.license})")


@cli.command("install-codec")
@click.argument("path_or_url")
@click.option("--sha256", help="Refuse the file unless its sha256 is this (the one experts reference).")
@user_errors
def install_codec_command(path_or_url: str, sha256: str | None) -> None:
    """Verify a shared codec file and copy it to the codec directory (experts reference it by sha256)."""
    dest = install_codec(path_or_url, sha256=sha256)
    click.echo(f"Installed codec {Path(path_or_url).name}: {dest}")


# -- new-plugin -------------------------------------------------------------------------------

@cli.command("new-plugin")
@click.argument("name")
@click.option("--instrument", help="The instrument it registers (default: NAME).")
@click.option("--dir", "parent", default=".", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where to create the stage-stack-NAME directory.")
@click.option("--license", "license_", default="MIT", show_default=True, help="License of the expert weights.")
@click.option("--base-model", default="facebook/musicgen-small", show_default=True)
@click.option("--description", help="One line for `stage-stack instruments`.")
@user_errors
def new_plugin(name: str, instrument: str | None, parent: Path, license_: str, base_model: str,
               description: str | None) -> None:
    """Write a plugin package for a new instrument: pyproject, module, model card, test."""
    root = write_plugin(name, parent, instrument=instrument, license=license_, base_model=base_model,
                        description=description)
    for path in sorted(p for p in root.rglob("*")):
        click.echo(f"  {path}" + ("/" if path.is_dir() else ""))
    click.echo(f"\nNext: put the expert in the weights/ folder, then\n  cd {root} && pip install -e '.[test]' "
               f"&& pytest\n  stage-stack instruments\nSee docs/plugins.md.")
