"""Arranging from the command line: `arrange`, `add`, `pick`, `redo`, `remove`, `mix`, `show`, `arrange-batch`.

    stage-stack arrange --bpm 120 --add drums,bass -o out/          # a new song from a click
    stage-stack arrange --context mix.wav --add bass,keys -o out/   # on top of a mix
    stage-stack arrange --from out/manifest.json -o again/          # reproduce a song
    stage-stack add out/ keys --candidates 3
    stage-stack pick out/ keys 2
    stage-stack redo out/ bass --seed 7 --downstream
    stage-stack remove out/ keys
    stage-stack mix out/ --gain bass=-3
    stage-stack show out/
    stage-stack history out/                # the states `undo` goes back to
    stage-stack undo out/                   # restore the state before the last change
    stage-stack prune out/                  # delete old takes and the history
    accelerate launch -m stage_stack arrange-batch jobs.jsonl

Layers are written `instrument` or `name=instrument` (a second keys layer: `pad=keys`).
Experts come from the registry (`stage-stack instruments`); `--expert NAME=FILE` overrides one.

Every command that writes holds the song's lock for its whole run: a second writer fails at once
("song X is being changed by process N"), or queues behind it with `--wait`. Stems and mixes
edited by hand are not overwritten unless `--force` is given.
"""

from __future__ import annotations

import functools
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from . import cli
from ..errors import InputError, StageStackError
from ..expert import FORMAT_ALIASES, WEIGHT_FORMATS
from ..mixing import CLICK_MODES


# -- parsing helpers --------------------------------------------------------------------------

def _pairs(values: tuple[str, ...], what: str, example: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise click.BadParameter(f"{value!r}: expected {what}, e.g. {example}")
        out[key.strip()] = rest.strip()
    return out


def parse_layers(text: str) -> list[tuple[str, str | None]]:
    """'drums,bass,pad=keys' -> [("drums", None), ("bass", None), ("keys", "pad")]."""
    layers = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, instrument = item.partition("=")
        layers.append((instrument.strip(), name.strip()) if sep else (item, None))
    return layers


def parse_device_map(value: str | None):
    if value is None or value in ("auto", "cpu") or "=" not in value:
        return value or "auto"
    return _pairs(tuple(v for v in value.split(",") if v), "INSTRUMENT=DEVICE", "drums=cuda:0,bass=cuda:1")


def _float(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{what}: {value!r} is not a number") from None


@contextmanager
def user_errors():
    """Errors a user can act on become click's `Error: ...` (exit status 1); warnings print as `warning:`."""
    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {message}", err=True)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except StageStackError as e:
        raise click.ClickException(str(e)) from None
    finally:
        warnings.showwarning = previous


class ProgressBars:
    """tqdm bars: one over the layers, one over the generation steps of the current layer."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.layers = self.steps = None
        self.current: tuple[int, str] | None = None

    def __call__(self, progress) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if self.layers is None or self.layers.total != progress.layers:
            if self.layers is not None:
                self.layers.close()
            self.layers = tqdm(total=progress.layers, desc="layers", unit="layer", position=0, dynamic_ncols=True)
        key = (progress.index, progress.layer)
        if key != self.current:
            if self.steps is not None:
                self.steps.close()
                self.layers.update(1)
            self.current = key
            self.steps = tqdm(total=progress.steps, desc=f"  {progress.layer}", unit="step", position=1, leave=False,
                              dynamic_ncols=True)
        if self.steps.total != progress.steps:
            self.steps.total = progress.steps
        self.steps.update(progress.step - self.steps.n)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.layers.update(1)
        if self.layers is not None:
            self.layers.close()
        self.layers = self.steps = self.current = None


# -- building the arranger --------------------------------------------------------------------

def arranger_options(command):
    options = [
        click.option("--expert", "experts", multiple=True, metavar="INSTRUMENT=FILE",
                     help="Use this expert file for an instrument (repeatable); wins over the registry."),
        click.option("--device-map", default=None,
                     help="auto (GPUs by free memory, else CPU; the default), cpu, a device (cuda:1), or "
                          "INSTRUMENT=DEVICE,..."),
        click.option("--max-memory", multiple=True, metavar="DEVICE=SIZE",
                     help="Memory budget per device, e.g. cuda:0=20GiB; least recently used experts are unloaded."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(("auto",) + WEIGHT_FORMATS + tuple(FORMAT_ALIASES)),
                     help="LM weight format: auto (per device, the measured best: int8 on a CPU with native "
                          "bf16, bf16 on a GPU, else fp32), fp32, bf16, fp16, or int8 / int4 (weight-only, "
                          "quantized at load time, CPU). benchmarks/README.md has the numbers."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(command):
    """--temperature, --top-k and --cfg, passed to the command as one `sampling` (SamplingParams or None)."""
    @functools.wraps(command)
    def wrapper(*args, temperature, top_k, cfg, **kwargs):
        from ..generation import SamplingParams

        given = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("cfg_coef", cfg)) if v is not None}
        try:
            sampling = SamplingParams(**given) if given else None
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return command(*args, sampling=sampling, **kwargs)

    defaults = SAMPLING_DEFAULTS
    options = [
        click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True),
                     help=f"Sampling temperature (default {defaults['temperature']:g}; lower is more conservative)."),
        click.option("--top-k", "top_k", type=click.IntRange(min=0),
                     help=f"Sample from the k most likely tokens (default {defaults['top_k']}; 0 = all)."),
        click.option("--cfg", type=click.FloatRange(min=0.0),
                     help=f"Classifier-free guidance strength (default {defaults['cfg_coef']:g}; 1 = none)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 250, "cfg_coef": 3.0}  # generation.SamplingParams' defaults


def make_arranger(ctx: click.Context, experts: tuple[str, ...], device_map: str | None, max_memory: tuple[str, ...],
                  dtype: str, **extra):
    from ..arranger import Arranger
    from .registry import registry_from_context

    return Arranger(_pairs(experts, "INSTRUMENT=FILE", "drums=drums.safetensors"),
                    registry=registry_from_context(ctx), device_map=parse_device_map(device_map),
                    max_memory=_pairs(max_memory, "DEVICE=SIZE", "cuda:0=20GiB") or None, dtype=dtype, **extra)


def writer_options(command, force: bool = True):
    """--wait (queue behind another writer of the song) and --force (overwrite hand edits)."""
    command = click.option("--wait", is_flag=True,
                           help="If another process is changing the song, wait for it instead of failing.")(command)
    if force:
        command = click.option("--force", is_flag=True,
                               help="Overwrite stems/mix files that were edited by hand since stage-stack wrote them.")(command)
    return command


@contextmanager
def song_lock(directory: Path, wait: bool):
    from ..arrangement import Arrangement

    with Arrangement(directory).lock(wait):
        yield


def _finish(song, quiet: bool, bars: ProgressBars) -> None:
    bars.close()
    if not quiet:
        click.echo(song.summary())
        stale = song.stale
        if stale:
            click.echo(f"note: {', '.join(stale)} heard an earlier version of the layers before them; "
                       f"`stage-stack redo {song.path} LAYER` regenerates one", err=True)


def _layer_names(text: str) -> tuple[str, ...]:
    """'keys+bass' -> ("keys", "bass"); '' -> () (what --hears takes)."""
    return tuple(name.strip() for name in text.split("+") if name.strip())


def _hears_of(values: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """('bass=keys', 'lead=keys+bass', 'pad=') -> {"bass": ("keys",), "lead": ("keys", "bass"), "pad": ()}."""
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r}: expected LAYER=A+B, e.g. bass=keys (LAYER= to hear no layer)")
        out[key.strip()] = _layer_names(rest)
    return out


def _build_layers(instruments: tuple[str, ...], add: str | None, candidates: tuple[str, ...],
                  prompts: tuple[str, ...], gains: tuple[str, ...], click_mode: str | None, sampling=None,
                  hears: tuple[str, ...] = (), chords: tuple[str, ...] = (), beats: tuple[str, ...] = ()):
    from ..layer import Layer

    pairs = [entry for item in instruments for entry in parse_layers(item)] + parse_layers(add or "")
    if not pairs:
        return []
    prompt_of = _pairs(prompts, "LAYER=TEXT", "keys='warm electric piano'")
    gain_of = {k: _float(v, "--gain") for k, v in _pairs(gains, "LAYER=DB", "bass=-3").items()}
    hears_of = _hears_of(hears)
    chords_of = _pairs(chords, "LAYER=heard|own", "keys=own")
    beats_of = _pairs(beats, "LAYER=heard|own", "drums=own")
    default_candidates, candidates_of = 1, {}
    for value in candidates:
        if "=" in value:
            key, _, n = value.partition("=")
            candidates_of[key] = n
        else:
            default_candidates = value
    layers = []
    for instrument, name in pairs:
        key = name or instrument
        try:
            n = int(candidates_of.get(key, default_candidates))
        except ValueError:
            raise click.BadParameter(f"--candidates for {key!r} must be an integer") from None
        layers.append(Layer(instrument, name=name, prompt=prompt_of.get(key), gain_db=gain_of.get(key), candidates=n,
                            click=click_mode, params=sampling, hears=hears_of.get(key), chords=chords_of.get(key),
                            beats=beats_of.get(key)))
    known = {layer.key for layer in layers}
    for option, values in (("--prompt", prompt_of), ("--gain", gain_of), ("--candidates", candidates_of),
                           ("--hears", hears_of), ("--chords", chords_of), ("--beats", beats_of)):
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{option} names layer(s) {', '.join(unknown)} that are not arranged; "
                             f"layers: {', '.join(sorted(known))}")
    return layers


# -- commands ---------------------------------------------------------------------------------

@cli.command()
@click.argument("instruments", nargs=-1)
@click.option("--add", "add", metavar="LAYERS", help="Comma-separated layers, e.g. drums,bass,pad=keys.")
@click.option("-c", "--context", type=click.Path(dir_okay=False, path_type=Path),
              help="The mix to arrange on (any sample rate; stereo is downmixed). Default: none, start from a click.")
@click.option("--bpm", type=float, help="Tempo of the click (30-300). Default without a context: 120.")
@click.option("--duration", type=float, help="Seconds. Default: the context's length, else 10.")
@click.option("--seed", type=int, default=0, show_default=True, help="Layer i uses seed + i.")
@click.option("--click", "click_mode", type=click.Choice(CLICK_MODES),
              help="What each expert hears: the mix (none), mix+click, or the click alone. Default: none, as "
                   "the experts were trained; the first layer of a song without context always hears the click.")
@click.option("--candidates", multiple=True, metavar="N|LAYER=N", help="Variations per layer (all are kept).")
@click.option("--prompt", "prompts", multiple=True, metavar="LAYER=TEXT", help="Text prompt for a layer.")
@click.option("--gain", "gains", multiple=True, metavar="LAYER=DB", help="Mix gain of a layer in dB.")
@click.option("--hears", "hears", multiple=True, metavar="LAYER=A+B",
              help="The earlier layers a layer hears, '+'-separated (e.g. bass=keys; LAYER= for none). Default: "
                   "what its expert was trained to hear, else all of them.")
@click.option("--chords", "chords", multiple=True, metavar="LAYER=heard|own",
              help="Where a chord-stream expert's chords come from: heard in what it hears, or its own. Default: "
                   "heard when it hears a context or a pitched layer, else its own.")
@click.option("--beats", "beats", multiple=True, metavar="LAYER=heard|own",
              help="Whether a layer hears a click on the beats heard in its mix instead of the mix. Default: "
                   "heard for an unpitched instrument (the drums) over pitched material, else own.")
@click.option("--sample-rate", type=int, help="The song's rate (4000-384000 Hz). Default: the context's, else the experts'.")
@click.option("--from", "from_manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Reproduce the arrangement this manifest.json describes.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The arrangement directory. Running the same command again resumes it.")
@arranger_options
@writer_options
@sampling_options
@click.pass_context
def arrange(ctx, instruments, add, context, bpm, duration, seed, click_mode, candidates, prompts, gains, hears,
            chords, beats, sample_rate, from_manifest, out, experts, device_map, max_memory, dtype, quiet, wait, force,
            sampling):
    """Generate an arrangement layer by layer into OUT (manifest.json, stems/, mix.wav)."""
    bars = ProgressBars(quiet)
    with user_errors(), song_lock(out, wait):
        arranger = make_arranger(ctx, experts, device_map, max_memory, dtype, sample_rate=sample_rate)
        if from_manifest is not None:
            if instruments or add or context or sampling or hears or chords or beats:
                raise InputError("--from reproduces a manifest as it is; leave out layers, --context and the "
                                 "sampling options")
            song = arranger.reproduce(from_manifest, out=out, callback=bars, wait=wait)
            return _finish(song, quiet, bars)
        layers = _build_layers(instruments, add, candidates, prompts, gains, click_mode, sampling, hears, chords,
                               beats)
        if not layers:
            chain = arranger.registry.default_chain if arranger.registry is not None else []
            if not chain:
                raise InputError("name the layers to arrange, e.g. --add drums,bass")
            layers = _build_layers(tuple(chain), None, candidates, prompts, gains, click_mode, sampling, hears,
                                   chords, beats)
            if not quiet:
                click.echo(f"layers: {', '.join(chain)} (the registry's default chain)", err=True)
        song, pending = arranger.prepare(layers, context, bpm=bpm, duration=duration, seed=seed, click=click_mode,
                                         out=out, wait=wait)
        if song.layers and not quiet:
            click.echo(f"resuming {out}: {len(song.layers)} layer(s) done, {len(pending)} to go", err=True)
        for position, layer in enumerate(pending):
            arranger.run_layer(song, layer, bars, position=(position, len(pending)), force=force)
        _finish(song, quiet, bars)


def _open(directory: Path, wait: bool = False):
    from ..song import Song

    return Song.open(directory, wait=wait)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("layer")
@click.option("--prompt", help="Text prompt for the layer.")
@click.option("--seed", type=int, help="Default: the song's seed + the layer's position.")
@click.option("--gain", type=float, help="Mix gain in dB.")
@click.option("--candidates", type=int, default=1, show_default=True)
@click.option("--click", "click_mode", type=click.Choice(CLICK_MODES), help="Default: the song's click mode.")
@click.option("--hears", metavar="A+B", help="The earlier layers it hears, '+'-separated (e.g. keys; '' for none). "
              "Default: what its expert was trained to hear, else all of them.")
@click.option("--chords", type=click.Choice(["heard", "own"]),
              help="A chord-stream expert's chords: heard in what it hears, or its own. Default: heard when it "
                   "hears a context or a pitched layer.")
@click.option("--beats", type=click.Choice(["heard", "own"]),
              help="Hear a click on the beats heard in the mix instead of the mix. Default: heard for an "
                   "unpitched instrument (the drums) over pitched material.")
@arranger_options
@writer_options
@sampling_options
@click.pass_context
def add(ctx, directory, layer, prompt, seed, gain, candidates, click_mode, hears, chords, beats, experts,
        device_map, max_memory, dtype, quiet, wait, force, sampling):
    """Add LAYER (`instrument` or `name=instrument`) to the arrangement in DIRECTORY."""
    from ..layer import Layer

    bars = ProgressBars(quiet)
    with user_errors(), song_lock(directory, wait):
        parsed = parse_layers(layer)
        if len(parsed) != 1:
            raise InputError(f"add takes one layer (`instrument` or `name=instrument`), got {layer!r}")
        (instrument, name), = parsed
        song = _open(directory, wait)
        arranger = make_arranger(ctx, experts, device_map, max_memory, dtype)
        arranger.adopt_experts(song.manifest)
        arranger.add(song, Layer(instrument, name=name, prompt=prompt, seed=seed, gain_db=gain, candidates=candidates,
                                 click=click_mode, params=sampling,
                                 hears=None if hears is None else _layer_names(hears), chords=chords,
                                 beats=beats),
                     callback=bars, force=force)
        _finish(song, quiet, bars)


@cli.command(context_settings={"ignore_unknown_options": True})  # `pick song drums -1` is a number, not an option
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("layer")
@click.argument("candidate", type=int)
@click.option("-q", "--quiet", is_flag=True)
@writer_options
def pick(directory, layer, candidate, quiet, wait, force):
    """Make CANDIDATE (from 0) the stem LAYER uses; re-renders the mix."""
    with user_errors(), song_lock(directory, wait):
        song = _open(directory, wait).pick(layer, candidate, force=force)
        _finish(song, quiet, ProgressBars(True))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("layer")
@click.option("--seed", type=int, help="Default: a new random seed (recorded in the manifest).")
@click.option("--prompt", help="A new text prompt.")
@click.option("--downstream", is_flag=True, help="Also regenerate the layers after it, so they hear the new take.")
@arranger_options
@writer_options
@click.pass_context
def redo(ctx, directory, layer, seed, prompt, downstream, experts, device_map, max_memory, dtype, quiet, wait, force):
    """Regenerate LAYER with a new seed or prompt (and optionally the layers after it).

    The old take stays on disk: `stage-stack undo` goes back to it, `stage-stack prune` deletes it.
    """
    bars = ProgressBars(quiet)
    with user_errors(), song_lock(directory, wait):
        song = _open(directory, wait)
        song.manifest.index(layer)  # unknown layer: fail before loading anything
        arranger = make_arranger(ctx, experts, device_map, max_memory, dtype)
        arranger.adopt_experts(song.manifest)
        arranger.redo(song, layer, seed=seed, prompt=prompt, downstream=downstream, callback=bars, force=force)
        _finish(song, quiet, bars)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("layer")
@click.option("-q", "--quiet", is_flag=True)
@writer_options
def remove(directory, layer, quiet, wait, force):
    """Remove LAYER; re-renders the mix. Its takes stay on disk until `stage-stack prune` (`undo` brings it back)."""
    with user_errors(), song_lock(directory, wait):
        song = _open(directory, wait).remove(layer, force=force)
        _finish(song, quiet, ProgressBars(True))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--gain", "gains", multiple=True, metavar="LAYER=DB", help="New mix gain of a layer in dB.")
@click.option("-q", "--quiet", is_flag=True)
@writer_options
def mix(directory, gains, quiet, wait, force):
    """Re-render mix.wav (optionally with new gains; the layers after a re-gained one become stale)."""
    with user_errors(), song_lock(directory, wait):
        song = _open(directory, wait)
        song.remix({k: _float(v, "--gain") for k, v in _pairs(gains, "LAYER=DB", "bass=-3").items()}, force=force)
        _finish(song, quiet, ProgressBars(True))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest.")
def show(directory, as_json):
    """Describe the arrangement in DIRECTORY (reads only its manifest)."""
    from ..arrangement import Arrangement
    from ..song import describe

    with user_errors():
        store = Arrangement(directory)
        if not store.exists():
            raise InputError(f"{directory}: not an arrangement (no manifest.json)")
        manifest = store.read_manifest()
        click.echo(manifest.model_dump_json(indent=2) if as_json else describe(manifest, store.path, files=True))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def history(directory):
    """List the states of the arrangement in DIRECTORY, newest first (`undo` goes back one)."""
    from ..song import history as song_history

    with user_errors():
        revisions = song_history(directory)
        for revision in revisions:
            click.echo(revision.line())
        if len(revisions) == 1:
            click.echo("nothing to undo", err=True)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("-q", "--quiet", is_flag=True)
@writer_options
def undo(directory, quiet, wait, force):
    """Restore the arrangement in DIRECTORY to the state before its last change."""
    from ..song import undo as song_undo

    with user_errors():
        song = song_undo(directory, wait=wait, force=force)
        _finish(song, quiet, ProgressBars(True))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@writer_options
def prune(directory, wait, force):
    """Delete the takes the arrangement no longer uses, and its history (`undo` then has nothing to go back to)."""
    from ..song import prune as song_prune

    with user_errors():
        removed = song_prune(directory, wait=wait, force=force)
        click.echo(f"removed {len(removed)} file(s)" + "".join(f"\n  {rel}" for rel in removed))


@cli.command("arrange-batch")
@click.argument("jobs_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path),
              help="Where the gathered manifests go (default: JOBS.manifests.json).")
@click.option("--cpu", is_flag=True, help="Run on the CPU even when GPUs are visible.")
@click.option("--no-pipeline", is_flag=True, help="Run each process's songs one after another.")
@arranger_options
@click.pass_context
def arrange_batch(ctx, jobs_file, summary, cpu, no_pipeline, experts, device_map, max_memory, dtype, quiet):
    """Arrange every job of JOBS_FILE (one JSON object per line), sharded over processes.

    Run it under `accelerate launch -m stage_stack arrange-batch jobs.jsonl` (or torchrun) to use
    several processes/GPUs; each process uses its own device unless --device-map says otherwise.
    A line: {"layers": ["drums", "bass"], "bpm": 120, "duration": 20, "seed": 1, "out": "song1"}.
    """
    from ..batch import run_distributed

    with user_errors():
        report = run_distributed(
            jobs_file, lambda device: make_arranger(ctx, experts, device_map or device, max_memory, dtype),
            cpu=cpu, summary=summary, pipeline=not no_pipeline)
        if report is None:
            return
        if not quiet:
            click.echo(f"{len(report['jobs'])} job(s) on {report['processes']} process(es); "
                       f"manifests: {report['summary_path']}")
        for row in report["jobs"]:
            if "error" in row:
                click.echo(f"job {row['index']} ({row['out']}) failed: {row['error']}", err=True)
        if report["failed"]:
            sys.exit(1)
