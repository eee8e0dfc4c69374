"""Does a pitched expert play its song's pitches, and can it go on playing them?

`quality.py` scores chord tones; this script separates why a pitched expert misses them. On
held-out songs made as quality.py makes them (seeds SEED_BASE + i, tempos spread over 80-160 BPM
for the N songs asked; the context is the stems the expert was trained to hear, else every other
stem; quality.py's sampling), through the public Arranger:

  key following   cosine between the generated stem's pitch-class profile (mean chroma) and the
                  song's real stem's, minus its mean cosine with the other songs' real stems.
                  Around 0: what it plays does not depend on the song's key.
  static          mean cosine between the generated profiles of different songs (the real
                  stems' own value beside it). Near 1: it plays the same pitches whatever it hears.
  transposition   the same generation over the context pitch-shifted by +SHIFT semitones: the
                  rotation that best maps the first profile onto the second. A follower turns by
                  SHIFT; a static expert by 0.
  continuation    in each of the expert's windows, the real stem's first PROMPT seconds of codes
                  are the prompt and the expert plays the rest over the time-aligned context:
                  chord tones of what it plays after the prompt, beside the real stem's own codes
                  over the same spans. Low: the expert cannot go on playing a real part, with
                  the answer in its prompt, so listening is not what it misses.
  chords named    an expert with a chord stream (`chord_classes`): the share of frames whose
                  generated chord token is the song's chord (and its root), over the context
                  and over the context shifted +SHIFT (against the song's chords moved by
                  SHIFT); chance is ~1/48 (1/12 for the root). And "over its song's chords":
                  the chord stream given the song's real chords (generate(given=)), the audio
                  sampled: chord tones of what it plays when naming the chord is not its job.

    python benchmarks/pitch_following.py instruments/weights/keys.safetensors
    python benchmarks/pitch_following.py instruments/weights/bass.safetensors --songs 10
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

from stage_stack.arranger import Arranger, Layer  # noqa: E402
from stage_stack.evaluation import (EVAL_SEED_BASE, NOTE_ANALYSIS, STEMS, _librosa,  # noqa: E402
                                   held_out_songs, stem_chord_tones, stems_context)
from stage_stack.expert import load_expert  # noqa: E402
from stage_stack.generation import SamplingParams, generate  # noqa: E402
from stage_stack.longform import expert_window_seconds  # noqa: E402
from stage_stack.chords import NO_CHORD, transpose  # noqa: E402
from stage_stack.layout import UNFILLED, audio_codes, with_chord_row  # noqa: E402
from stage_stack.pipeline import _encode, render_stem  # noqa: E402
from stage_stack.training.data import augment  # noqa: E402
from stage_stack.training.token_cache import chord_class_frames  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def profile(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean chroma (12,), unit length: which pitch classes a stem sounds, and how much."""
    chroma = _librosa().feature.chroma_cqt(y=np.asarray(audio, dtype=np.float32), sr=sample_rate, tuning=0.0)
    mean = chroma.mean(axis=1)
    return mean / (np.linalg.norm(mean) + 1e-12)


def best_rotation(before: np.ndarray, after: np.ndarray) -> int:
    """The r in 0..11 (semitones up) for which np.roll(before, r) is most like `after`."""
    return int(np.argmax([float(np.dot(np.roll(before, r), after)) for r in range(12)]))


def pitch_shift(audio: np.ndarray, sample_rate: int, semitones: int) -> np.ndarray:
    """Training's own pitch shift (Rubber Band, `training.data.augment`): the shifted context
    sounds as the pitch-shifted variants the experts were trained on did (stop 30 used librosa's)."""
    return augment(np.asarray(audio, dtype=np.float32)[None], sample_rate, pitch=semitones)[0, : audio.size]


def continuation(expert, song, context: np.ndarray, instrument: str, prompt_seconds: float,
                 params: SamplingParams) -> tuple[float, float]:
    """(chord-tone share of the expert's continuations, of the real codes), over the same spans."""
    sr, hop = expert.sample_rate, expert.codec.config.hop_length
    _, target_s = expert_window_seconds(expert.metadata.training)
    window, prompt = int(round(target_s * sr / hop)), int(round(prompt_seconds * sr / hop))
    if not 0 < prompt < window:
        raise SystemExit(f"--prompt must be more than 0 and less than the expert's {target_s:g} s window")
    n = song.stems[instrument].size
    wave = torch.from_numpy(song.stems[instrument].astype(np.float32))[None, None]
    config = expert.lm.config
    with torch.inference_mode():
        real = expert.codec.encode(wave)  # [1, K, frames]
        if config.chord_classes:  # the real part's chords are its past too
            classes = chord_class_frames(song.metadata.chords, 0, real.shape[-1], expert.frame_rate, 1.0, 0)
            real = with_chord_row(real, config, torch.from_numpy(classes)[None])
    played, coded = np.zeros(n, np.float32), np.zeros(n, np.float32)
    generator = torch.Generator().manual_seed(song.metadata.seed)
    for start in range(0, real.shape[-1] - window + 1, window):
        span = slice(start * hop, (start + window) * hop)
        with torch.inference_mode():
            ctx_codes = _encode(expert, context[span])
            out = generate(expert.lm, ctx_codes, window, prompt=real[..., start:start + prompt], params=params,
                           generator=generator)
            ours = expert.codec.decode(audio_codes(out, config))[0, 0].float().numpy()
            theirs = expert.codec.decode(audio_codes(real[..., start:start + window], config))[0, 0].float().numpy()
        keep = slice((start + prompt) * hop, min(n, (start + window) * hop))
        length = keep.stop - keep.start
        played[keep], coded[keep] = ours[prompt * hop:][:length], theirs[prompt * hop:][:length]
    shares = [stem_chord_tones(a, sr, song.metadata.chords, instrument).share or 0.0 for a in (played, coded)]
    return shares[0], shares[1]


def over_given_chords(expert, song, context: np.ndarray, instrument: str, params: SamplingParams) -> float:
    """Chord-tone share of what an expert with a chord stream plays, window by window over
    `context`, when its chord stream is the song's real chords (the audio streams sampled)."""
    sr, hop = expert.sample_rate, expert.codec.config.hop_length
    _, target_s = expert_window_seconds(expert.metadata.training)
    window = int(round(target_s * sr / hop))
    config = expert.lm.config
    frames = context.size // hop
    classes = torch.from_numpy(chord_class_frames(song.metadata.chords, 0, frames, expert.frame_rate, 1.0, 0))
    played = np.zeros(context.size, np.float32)
    generator = torch.Generator().manual_seed(song.metadata.seed)
    for start in range(0, frames - window + 1, window):
        unfilled = torch.full((1, config.n_q, window), UNFILLED)
        given = with_chord_row(unfilled, config, classes[None, start:start + window])
        with torch.inference_mode():
            out = generate(expert.lm, _encode(expert, context[start * hop:(start + window) * hop]), window,
                           params=params, generator=generator, given=given)
            audio = expert.codec.decode(audio_codes(out, config))[0, 0].float().numpy()
        played[start * hop:(start + window) * hop] = audio[:window * hop]
    return stem_chord_tones(played, sr, song.metadata.chords, instrument).share or 0.0


def named_chords(expert, song, context: np.ndarray, params: SamplingParams, shift: int) -> dict[str, float]:
    """An expert with a chord stream, over `context` (moved `shift` semitones): the share of frames
    whose chord token is the song's chord moved by `shift`, and whose root is its root."""
    result = render_stem(expert, context, expert.sample_rate, context.size / expert.sample_rate, params=params,
                         seed=song.metadata.seed)
    named = result.codes[0, 0].numpy()
    truth = chord_class_frames(song.metadata.chords, 0, named.size, expert.frame_rate, 1.0, 0)
    truth = np.array([transpose(int(c), shift) for c in truth])
    known = truth != NO_CHORD
    return {"chord": float(np.mean(named[known] == truth[known])),
            "root": float(np.mean(named[known] // 4 == truth[known] // 4))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("expert", type=Path, help="a bass or keys expert file")
    parser.add_argument("--songs", type=int, default=10, help="held-out songs (default 10)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per song (default 10)")
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE, help="song i has seed SEED_BASE + i")
    parser.add_argument("--shift", type=int, default=3, help="semitones the context is shifted by (default 3)")
    parser.add_argument("--prompt", type=float, default=1.0, help="seconds of real codes that start each "
                                                                  "continuation window (default 1)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance coefficient (default: the expert's own sampling, as the Arranger uses it)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: the expert's own sampling)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default benchmarks/results/pitch_following_<instrument>.json)")
    args = parser.parse_args(argv)
    if not 1 <= args.shift <= 11:
        parser.error("--shift must be 1 to 11 semitones")
    if args.songs < 2:
        parser.error("--songs must be at least 2 (key following compares songs)")
    torch.set_num_threads(args.threads)

    expert = load_expert(args.expert, dtype="fp32")
    instrument = expert.instrument
    if NOTE_ANALYSIS.get(instrument) is None:
        parser.error(f"{args.expert}: a {instrument!r} expert plays no pitches to follow; give a bass or keys expert")
    machine = machine_info()
    print(f"{machine['cpu']}, torch {machine['torch']} ({args.threads} thread(s)), "
          f"load {machine['load_average_1_5_15min']}")
    sr = expert.sample_rate
    stems = tuple(expert.metadata.hears) if expert.metadata.hears else None
    if stems and set(stems) - set(STEMS):
        parser.error(f"{args.expert}: hears {list(stems)}, which the synthetic songs do not all have")
    given = {k: v for k, v in (("cfg_coef", args.cfg), ("temperature", args.temperature)) if v is not None}
    params = replace(expert.metadata.sampling_params(), **given)  # what quality.py and the Arranger use
    chords = bool(expert.lm.config.chord_classes)
    arranger = Arranger(experts={instrument: expert}, device_map="cpu")
    songs = held_out_songs(args.songs, args.duration, sr, args.seed_base)
    started = time.perf_counter()

    def play(context: np.ndarray, seed: int) -> np.ndarray:
        song = arranger.arrange([Layer(instrument, params=params, seed=seed)], context, click="none",
                                context_sample_rate=sr, duration=args.duration, seed=seed)
        return song.stems[instrument]

    rows = []
    for i, song in enumerate(songs):
        context, heard = stems_context(song, instrument, stems)
        n = int(args.duration * sr)
        played = play(context[:n], song.metadata.seed)
        shifted = play(pitch_shift(context[:n], sr, args.shift), song.metadata.seed)
        ours, coded = continuation(expert, song, context[:n], instrument, args.prompt, params)
        generated, after_shift = profile(played, sr), profile(shifted, sr)
        rows.append({"seed": song.metadata.seed, "key": song.metadata.key, "heard": heard,
                     "generated": generated, "shifted": after_shift,
                     "real": profile(song.stems[instrument][:n], sr),
                     "rotation": best_rotation(generated, after_shift), "continuation": ours,
                     "continuation_real_coded": coded})
        if chords:
            rows[-1]["over_song_chords"] = over_given_chords(expert, song, context[:n], instrument, params)
            rows[-1]["named"] = named_chords(expert, song, context[:n], params, 0)
            rows[-1]["named_shifted"] = named_chords(expert, song, pitch_shift(context[:n], sr, args.shift), params,
                                                     args.shift)
        print(f"  song {i + 1}/{len(songs)} ({song.metadata.key}): turned by {rows[-1]['rotation']}, "
              f"continuation {ours:.2f} (real codes {coded:.2f})", file=sys.stderr, flush=True)

    def cos(a, b):
        return float(np.dot(a, b))

    own = [cos(r["generated"], r["real"]) for r in rows]
    others = [np.mean([cos(r["generated"], s["real"]) for s in rows if s is not r]) for r in rows]
    pairs = [(a, b) for a in range(len(rows)) for b in range(a + 1, len(rows))]
    static = float(np.mean([cos(rows[a]["generated"], rows[b]["generated"]) for a, b in pairs]))
    static_real = float(np.mean([cos(rows[a]["real"], rows[b]["real"]) for a, b in pairs]))
    turned = [r["rotation"] for r in rows]
    summary = {
        "key_following": float(np.mean(np.subtract(own, others))),
        "own_song_cosine": float(np.mean(own)), "other_songs_cosine": float(np.mean(others)),
        "static": static, "static_real": static_real,
        "turned_by_shift": float(np.mean([t == args.shift for t in turned])),
        "turned_by_0": float(np.mean([t == 0 for t in turned])),
        "continuation": float(np.mean([r["continuation"] for r in rows])),
        "continuation_real_coded": float(np.mean([r["continuation_real_coded"] for r in rows])),
    }
    if chords:
        for key in ("named", "named_shifted"):
            summary[key] = {m: float(np.mean([r[key][m] for r in rows])) for m in ("chord", "root")}
        summary["over_song_chords"] = float(np.mean([r["over_song_chords"] for r in rows]))
    print(f"\n{args.expert} ({instrument}), {len(rows)} songs x {args.duration:g} s, over {rows[0]['heard']}; "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| measure | expert | real stem |")
    print("|---|---|---|")
    print(f"| key following: profile cosine, own song minus other songs | {summary['key_following']:+.3f} "
          f"({summary['own_song_cosine']:.3f} - {summary['other_songs_cosine']:.3f}) | |")
    print(f"| static: profile cosine between songs | {static:.3f} | {static_real:.3f} |")
    print(f"| context +{args.shift} semitones: profile turned by {args.shift} / by 0 | "
          f"{summary['turned_by_shift']:.2f} / {summary['turned_by_0']:.2f} | |")
    print(f"| continuation after a {args.prompt:g} s real prompt, chord-tone share | {summary['continuation']:.3f} | "
          f"{summary['continuation_real_coded']:.3f} (its own codes) |")
    if chords:
        a, b = summary["named"], summary["named_shifted"]
        print(f"| chords named by its chord stream: chord / root (chance ~0.02 / 0.08) | {a['chord']:.3f} / "
              f"{a['root']:.3f}; context +{args.shift}: {b['chord']:.3f} / {b['root']:.3f} | |")
        print(f"| chord tones over its song's real chords (its chord stream given) | "
              f"{summary['over_song_chords']:.3f} | |")
    output = args.output or RESULTS / f"pitch_following_{instrument}.json"
    command = "python benchmarks/pitch_following.py " + " ".join(argv or sys.argv[1:])
    payload = {"benchmark": "pitch_following", "command": command, "machine": machine, "expert": str(args.expert),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "summary": summary,
               "songs": [{k: (v.round(4).tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
                         for r in rows]}
    print(f"wrote {write_json(output, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
