"""`stage-stack train`, `train-codec`, `train-beats` and `demo`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from . import cli, user_errors


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("train-codec")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run in the config's run_dir from its newest checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@click.option("-v", "--verbose", is_flag=True, help="Log losses and metrics.")
@user_errors
def train_codec_command(config: Path, resume: bool, no_progress: bool, verbose: bool) -> None:
    """Train a small EnCodec on a multi-stem dataset (see configs/demo-codec.yaml)."""
    from ..training.codec_train import train_codec
    from ..training.config import CodecTrainConfig, load_config

    _logging(verbose)
    try:
        result = train_codec(load_config(config, CodecTrainConfig), resume=resume, progress=not no_progress)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the last step was checkpointed: rerun with --resume") from None
    if result.output is None:
        click.echo(f"stopped at step {result.steps}; continue with --resume")
        return
    click.echo(f"codec: {result.output} ({result.steps} steps, {result.seconds:.0f} s this session)")
    for kind, m in result.metrics.items():
        click.echo(f"  {kind:6s} SI-SNR {m['si_snr_db']:7.2f} dB   mel distance {m['mel_distance']:.3f}")


@cli.command("train-beats")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-progress", is_flag=True, help="No progress lines (for logs).")
@user_errors
def train_beats_command(config: Path, no_progress: bool) -> None:
    """Train the beat tracker a drums layer hears the beat with (see configs/beat-tracker.yaml)."""
    from ..training.beat_train import BeatTrainConfig, train_beat_tracker
    from ..training.config import load_config

    output = train_beat_tracker(load_config(config, BeatTrainConfig), progress=not no_progress)
    click.echo(f"beat tracker: {output}")


@cli.command("train")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run in the config's run_dir from its newest checkpoint "
              "(a finished run is exported again: the way to refresh its model card after editing `export`).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@click.option("-v", "--verbose", is_flag=True, help="Log every logged step.")
@user_errors
def train_command(config: Path, resume: bool, no_progress: bool, verbose: bool) -> None:
    """Train an expert with the STAGE recipe (see configs/demo-drums.yaml).

    Runs on the CPU or a GPU; for several GPUs start it with
    `accelerate launch -m stage_stack train CONFIG.yaml`.
    """
    from ..training.config import TrainConfig, load_config
    from ..training.train import train

    _logging(verbose)
    try:
        result = train(load_config(config, TrainConfig), resume=resume, progress=not no_progress,
                       command=f"stage-stack train {config}")
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the last completed step was checkpointed: rerun with --resume") from None
    if result.output is None:
        click.echo(f"stopped at step {result.step}; continue with --resume")
        return
    click.echo(f"expert: {result.output} ({result.step} steps, {result.seconds / 60:.1f} min this session)")
    for key, value in result.metrics.items():
        click.echo(f"  {key}: {value:.4f}")


@cli.command("demo")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: stems/<layer>.wav, mix.wav and manifest.json.")
@click.option("--bpm", type=float, default=120.0, show_default=True, help="Tempo of the click the drums follow.")
@click.option("--duration", type=float, default=12.0, show_default=True, help="Seconds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@user_errors
def demo_command(out: Path, bpm: float, duration: float, seed: int, quiet: bool) -> None:
    """Drums from a click, then keys, then bass, with the bundled demo experts (offline)."""
    from ..arranger import Arranger
    from ..instruments import WEIGHTS_DIR
    from .arrange import ProgressBars

    layers = ["drums", "keys", "bass"]  # the registry's default chain: keys set the harmony, bass follows it
    experts = {name: WEIGHTS_DIR / f"{name}.safetensors" for name in layers}
    missing = [str(p) for p in experts.values() if not p.is_file()]
    if missing:
        raise click.ClickException(f"the bundled demo experts are missing ({', '.join(missing)}); they ship in the "
                                   "repository's instruments/weights/. Reinstall stage-stack from the repository, "
                                   "or retrain them with configs/demo-*.yaml (see instruments/weights/*.md)")
    # The Arranger's default click mode, as `stage-stack arrange` uses it: the drums hear the
    # click (the first layer of a song without context always does), keys and bass the mix so far.
    arranger = Arranger(experts=experts)
    bars = ProgressBars(quiet)  # the same bars as `stage-stack arrange`: layers, then decoding steps
    try:
        song = arranger.arrange(layers, bpm=bpm, duration=duration, seed=seed, out=out, callback=bars)
    finally:
        bars.close()
    click.echo(f"wrote {out}: " + ", ".join(f"stems/{name}.wav" for name in song.layers) + ", mix.wav")
