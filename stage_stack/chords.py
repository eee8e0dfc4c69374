"""The chord vocabulary of an expert's chord stream (`StageLMConfig.chord_classes`).

An expert with a chord stream generates, before each frame's audio codes, a token that names
the chord of that frame: one of 12 roots x 4 triad qualities, or "no chord". The stream is never
decoded; the audio codes that follow read it as their own past. Training takes the labels from
each song's metadata.json chords (`training.token_cache.chord_class_frames`).

    class = 4 * root + quality       quality 0 major, 1 minor, 2 diminished, 3 augmented
    NO_CHORD = 48                     a frame outside every annotated chord

A seventh chord is named by its triad (the synthetic band's maj7, m7, 7 and m7b5 voice their
triad plus one tone). Other pitch-class sets take the quality their third and fifth point to:
a minor third makes it minor, a flat fifth without a major third diminished, a sharp fifth with a
major third augmented, everything else major (a suspended or power chord keeps its root).
"""

from __future__ import annotations

from collections.abc import Sequence

QUALITIES = ("", "m", "dim", "aug")
ROOT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
NO_CHORD = 4 * 12
CHORD_CLASSES = NO_CHORD + 1  # what an expert's chord stream may generate


def chord_class(root: int, pitch_classes: Sequence[int]) -> int:
    """The class of a chord given its root and pitch classes (0..11, C = 0)."""
    if not 0 <= root <= 11:
        raise ValueError(f"a chord root is a pitch class 0..11, got {root}")
    intervals = {(pc - root) % 12 for pc in pitch_classes}
    if 3 in intervals and 4 not in intervals:
        quality = 2 if 6 in intervals and 7 not in intervals else 1
    elif 4 in intervals and 8 in intervals and 7 not in intervals:
        quality = 3
    else:
        quality = 0
    return 4 * root + quality


def transpose(cls: int, semitones: int) -> int:
    """A chord class moved by `semitones` (NO_CHORD stays)."""
    if cls == NO_CHORD:
        return cls
    return 4 * ((cls // 4 + semitones) % 12) + cls % 4


def chord_name(cls: int) -> str:
    """"C", "Ebm", "Bdim", ... or "N" for NO_CHORD."""
    if not 0 <= cls < CHORD_CLASSES:
        raise ValueError(f"a chord class is 0..{CHORD_CLASSES - 1}, got {cls}")
    return "N" if cls == NO_CHORD else ROOT_NAMES[cls // 4] + QUALITIES[cls % 4]


def chord_pitch_classes(cls: int) -> tuple[int, ...]:
    """The triad's pitch classes of a class (empty for NO_CHORD)."""
    if cls == NO_CHORD:
        return ()
    root, quality = divmod(cls, 4)
    third, fifth = ((4, 7), (3, 7), (3, 6), (4, 8))[quality]
    return (root, (root + third) % 12, (root + fifth) % 12)
