"""`stage-stack convert ...`: import upstream checkpoints as expert files."""

from __future__ import annotations

from pathlib import Path

import click

from . import cli, user_errors

MUSICGEN_LICENSE = "CC-BY-NC-4.0"


def _refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise click.ClickException(f"{out} already exists; choose another output path or pass --force to replace it.")


@cli.group()
def convert() -> None:
    """Import upstream checkpoints (STAGE, MusicGen) as stage-stack expert files."""


existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
output_file = click.Path(dir_okay=False, path_type=Path)


@convert.command("stage")
@click.argument("src", type=existing_file)
@click.argument("out", type=output_file)
@click.option("--instrument", required=True, help="The stem this expert generates, e.g. drums or bass.")
@click.option("--license", "license_", default=None, help="License of the weights (default: the importer's).")
@click.option("--base-model", default=None, help="Model the checkpoint was fine-tuned from.")
@click.option("--description", default=None, help="One line shown by `stage-stack list`.")
@click.option("--default-prompt", default=None, help="Text description used when none is given.")
@click.option("--embed-codec/--reference-codec", default=None,
              help="Store the codec inside the expert, or beside it referenced by sha256 (default: embed only small codecs).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@user_errors
def convert_stage(src: Path, out: Path, instrument: str, license_, base_model, description, default_prompt,
                  embed_codec, force: bool) -> None:
    """Convert an official STAGE checkpoint (stage-drums.safetensors, ...) into an expert file."""
    from ..convert.stage import convert_stage_checkpoint

    _refuse_overwrite(out, force)
    given = {"license": license_, "base_model": base_model, "description": description,
             "default_prompt": default_prompt, "embed_codec": embed_codec}
    path = convert_stage_checkpoint(src, out, instrument=instrument, **{k: v for k, v in given.items() if v is not None})
    click.echo(f"wrote {path}")


def _musicgen_options(command):
    options = [
        click.option("--instrument", default="base", show_default=True, help="Instrument name recorded in the expert."),
        click.option("--license", "license_", default=MUSICGEN_LICENSE, show_default=True,
                     help="License of the weights (MusicGen's are CC-BY-NC 4.0)."),
        click.option("--base-model", default="facebook/musicgen-small", show_default=True,
                     help="Name of the MusicGen recorded as the base model."),
        click.option("--embed-codec", is_flag=True,
                     help="Store the codec inside the expert instead of beside it (referenced by sha256)."),
        click.option("--seed", default=0, show_default=True, help="Seed of the new SEP embedding rows."),
        click.option("--force", is_flag=True, help="Replace OUT if it exists."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _report(result) -> None:
    click.echo(f"wrote {result.expert}")
    for path in (result.codec_file, result.text_encoder_file):
        if path is not None:
            click.echo(f"wrote {path} (referenced by the expert; keep it beside the expert or in the codec / "
                       "text-encoder directory)")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


@convert.command("musicgen-hf")
@click.argument("model_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=output_file)
@_musicgen_options
@user_errors
def convert_musicgen_hf_command(model_dir: Path, out: Path, instrument, license_, base_model, embed_codec, seed,
                                force) -> None:
    """MusicGen in transformers format (a folder with config.json + model.safetensors) -> a base expert.

    The expert gets MusicGen's weights plus a new SEP row per embedding table and a zeroed PAD
    row: a starting point for STAGE fine-tuning, not a finished expert.
    """
    from ..convert.musicgen import convert_musicgen_hf

    _report(convert_musicgen_hf(model_dir, out, instrument=instrument, base_model=base_model, license=license_,
                                embed_codec=embed_codec, seed=seed, overwrite=force))


@convert.command("musicgen-audiocraft")
@click.argument("state_dict_bin", type=existing_file)
@click.argument("compression_bin", type=existing_file)
@click.argument("out", type=output_file)
@_musicgen_options
@click.option("--pad-mode", type=click.Choice(["reflect", "constant", "from-config"]), default="reflect",
              show_default=True, help="Codec padding: STAGE uses reflect; from-config keeps audiocraft's xp.cfg value.")
@user_errors
def convert_musicgen_audiocraft_command(state_dict_bin: Path, compression_bin: Path, out: Path, instrument, license_,
                                        base_model, embed_codec, seed, force, pad_mode) -> None:
    """MusicGen in audiocraft format (state_dict.bin + compression_state_dict.bin) -> a base expert.

    The expert gets MusicGen's weights plus a new SEP row per embedding table and a zeroed PAD
    row: a starting point for STAGE fine-tuning, not a finished expert.
    """
    from ..convert.musicgen import convert_musicgen_audiocraft

    _report(convert_musicgen_audiocraft(
        state_dict_bin, compression_bin, out, instrument=instrument, base_model=base_model, license=license_,
        embed_codec=embed_codec, seed=seed, pad_mode=None if pad_mode == "from-config" else pad_mode,
        overwrite=force))


@cli.command()
@click.argument("src", type=existing_file)
@click.argument("out", type=output_file)
@click.option("--instrument", required=True, help="The new instrument name, e.g. guitar.")
@click.option("--description", default=None, help="A new one-line description.")
@click.option("--default-prompt", default=None, help="A new default text prompt.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@user_errors
def relabel(src: Path, out: Path, instrument: str, description, default_prompt, force: bool) -> None:
    """Copy the expert SRC to OUT for another instrument (same weights, new metadata).

    For a contributor who trained or fine-tuned an expert on one stem and wants to ship it as a
    new instrument: `stage-stack relabel keys.safetensors organ.safetensors --instrument organ`,
    then `stage-stack install organ organ.safetensors`.
    """
    from ..expert import read_metadata, relabel_expert

    if out.resolve() == src.resolve():
        raise click.ClickException("OUT is SRC; write the relabelled expert to a new file")
    _refuse_overwrite(out, force)
    old = read_metadata(src).instrument
    relabel_expert(src, out, instrument, description=description, default_prompt=default_prompt)
    click.echo(f"wrote {out}: the {old!r} expert relabelled as {instrument!r}")
