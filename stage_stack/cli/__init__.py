"""The `stage-stack` command line. Each area adds its commands from its own module."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="stage-stack")
def cli() -> None:
    """Build arrangements one stem at a time with STAGE experts."""


def main() -> None:
    from . import convert  # noqa: F401  (registers commands on `cli`)

    cli()
