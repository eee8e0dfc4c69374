"""The `stage-stack` command line. Each area adds its commands from its own module."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from ..errors import StageStackError
from ..plugins import PluginCommandGroup


@click.group(cls=PluginCommandGroup)
@click.version_option(package_name="stage-stack")
@click.option("--plugins-dir", "plugins_dirs", multiple=True, is_eager=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Load plugin files (*.py) from this directory (repeatable; default: $STAGE_STACK_PLUGINS_DIR).")
@click.option("--registry", "registry_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Your registry config, layered over the package default (default: $STAGE_STACK_REGISTRY).")
def cli(plugins_dirs: tuple[Path, ...], registry_file: Path | None) -> None:
    """Build arrangements one stem at a time with STAGE experts."""
    # Commands read these back from the root context (stage_stack.cli.registry.registry_from_context).


def user_errors(command):
    """Show a StageStackError (an error the user can act on) as one message and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StageStackError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def main() -> None:
    from . import convert  # noqa: F401  (registers commands on `cli`)
    from . import registry  # noqa: F401
    from . import arrange  # noqa: F401
    from . import train  # noqa: F401
    from . import evaluate  # noqa: F401
    from . import export  # noqa: F401
    from . import studio  # noqa: F401

    cli()
