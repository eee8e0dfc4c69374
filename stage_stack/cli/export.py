"""`stage-stack export`: stems, mix, click and a MIDI tempo map for a DAW (stage_stack.export)."""

from __future__ import annotations

from pathlib import Path

import click

from . import cli, user_errors
from ..export import DEFAULT_EXPORT_RATE, EXPORT_RATES, FORMATS


@cli.command("export")
@click.argument("song", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="wav", show_default=True,
              help="wav: 32-bit float with the tempo in an ACID chunk; flac: 24-bit, tempo in the comment tag.")
@click.option("--rate", type=click.Choice([str(r) for r in EXPORT_RATES]), default=str(DEFAULT_EXPORT_RATE),
              show_default=True, help="Sample rate of every exported file (Hz).")
@click.option("--stereo", is_flag=True, help="Two identical channels instead of mono.")
@click.option("--zip", "as_zip", is_flag=True, help="Write one zip archive (default SONG/export.zip).")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="The export folder (default SONG/export/) or, with --zip, the zip file.")
@user_errors
def export_command(song: Path, fmt: str, rate: str, stereo: bool, as_zip: bool, out: Path | None) -> None:
    """Export SONG's stems, mix, click (audio and MIDI) and manifest, sample-aligned, for a DAW."""
    from ..export import ExportOptions, export_song

    target = export_song(song, out, ExportOptions(format=fmt, rate=int(rate), stereo=stereo), zip_file=as_zip)
    click.echo(f"wrote {target}")
