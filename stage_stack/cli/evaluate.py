"""`stage-stack eval`: the quality protocol (stage_stack/evaluation.py) from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..evaluation import BEAT_TRIM_SECONDS, CONTEXT_SOURCES, EVAL_SEED_BASE
from . import cli

DEFAULT_INSTRUMENTS = ("drums", "bass", "keys")


class _Progress:
    """One tqdm bar per task, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if task not in self.bars:
            self.bars[task] = tqdm(total=total, desc=task, unit="song", leave=True)
        bar = self.bars[task]
        bar.update(done - bar.n)
        if done == total:
            bar.close()


def _bundled_experts() -> list[Path]:
    from ..instruments import WEIGHTS_DIR

    paths = [WEIGHTS_DIR / f"{name}.safetensors" for name in DEFAULT_INSTRUMENTS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise click.ClickException(f"the bundled demo experts are missing ({', '.join(missing)}). Pass expert files "
                                   "as arguments, or retrain the demo experts with configs/demo-*.yaml")
    return paths


@cli.command("eval")
@click.argument("experts", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ablation-drums", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A drums expert trained without click pairs, scored from a click next to the drums expert.")
@click.option("--tempos", "n_tempos", type=click.IntRange(min=1), default=20, show_default=True,
              help="Held-out songs, one per tempo spread over 80-160 BPM.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds generated per song.")
@click.option("--trim", "trim_seconds", type=float, default=BEAT_TRIM_SECONDS, show_default=True,
              help="Beats before this time are not scored (mir_eval's default).")
@click.option("--seed-base", type=int, default=EVAL_SEED_BASE, show_default=True,
              help="Song i has seed SEED_BASE + i; keep it clear of the training songs' seeds.")
@click.option("--cfg", "cfg_coef", type=float, default=None,
              help="Classifier-free guidance (default: each expert's own sampling, else 3).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sampling temperature (default: each expert's own, else 1).")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Sample from the k likeliest codes (0: all; default: each expert's own, else 250).")
@click.option("--no-drums-in-context", is_flag=True, help="Score drums from a click only.")
@click.option("--context-source", type=click.Choice(CONTEXT_SOURCES), default="song", show_default=True,
              help="Control for the in-context tasks: the song's own stems, the next held-out song's, or "
                   "silence (a control run claims no target).")
@click.option("--context-stems", help="The in-context tasks hear only these stems, comma-separated (e.g. keys). "
              "Default: what each expert was trained to hear (its metadata's hears), else every other stem.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full report (per-song scores) as JSON here.")
@click.option("--audio-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the generated stems here, one folder per task.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads (more than one thread on busy cores is slower).")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def eval_command(experts: tuple[Path, ...], ablation_drums: Path | None, n_tempos: int, duration: float,
                 trim_seconds: float, seed_base: int, cfg_coef: float, temperature: float, top_k: int,
                 no_drums_in_context: bool, context_source: str, context_stems: str | None, json_path: Path | None, audio_dir: Path | None, threads: int, no_progress: bool) -> None:
    """Score experts on held-out synthetic songs: beat F1 from a click, rhythmic F1, chord tones.

    EXPERTS are expert files (drums, bass, keys or lead; each is scored by its instrument).
    Without them the bundled demo experts are scored. See stage_stack/evaluation.py for the
    protocol and the targets.
    """
    import torch

    from ..errors import StageStackError
    from ..evaluation import EvalSettings, evaluate, parse_stems

    torch.set_num_threads(threads)
    try:
        settings = EvalSettings(n_tempos=n_tempos, duration=duration, seed_base=seed_base, trim_seconds=trim_seconds,
                                cfg_coef=cfg_coef, temperature=temperature, top_k=top_k,
                                drums_in_context=not no_drums_in_context, context_source=context_source,
                                context_stems=None if context_stems is None else
                                parse_stems(context_stems))
        report = evaluate(list(experts) or _bundled_experts(), ablation_drums=ablation_drums, settings=settings,
                          progress=_Progress(not no_progress), audio_dir=audio_dir)
    except StageStackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.table())
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        partial = json_path.with_name(json_path.name + ".partial")
        partial.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
        partial.replace(json_path)
        click.echo(f"wrote {json_path}")
