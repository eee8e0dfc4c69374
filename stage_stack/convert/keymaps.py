"""Shared pieces of the checkpoint importers.

An importer describes, for every StageLM tensor, which source tensors it is made of (a `KeyMap`),
then checks the source against that description in one pass, so a bad checkpoint produces one
`CheckpointKeyError` that names every missing, unexpected and mis-shaped key at once, and only
then builds the tensors.

A `Piece` names one source tensor with the full shape it must have, and optionally the rows it
contributes: MusicGen's fused attention projections are sliced (audiocraft's cross-attention
`in_proj_weight` gives our `q` and `kv`), while split ones are concatenated (transformers'
`q_proj`, `k_proj`, `v_proj` give our `qkv`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from ..errors import CheckpointKeyError


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of source tensor `key` (all rows when `rows` is None); `shape` is the
    full shape the source tensor must have."""

    key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor[self.rows[0] : self.rows[1]]


KeyMap = dict[str, list[Piece]]  # StageLM key -> pieces, concatenated along dim 0 in order


def expected_shapes(key_map: KeyMap) -> dict[str, tuple[int, ...]]:
    """Every source key the map reads, with the shape it must have."""
    shapes: dict[str, tuple[int, ...]] = {}
    for pieces in key_map.values():
        for piece in pieces:
            if shapes.setdefault(piece.key, piece.shape) != piece.shape:
                raise AssertionError(f"key map reads {piece.key} with two different shapes")
    return shapes


def check_keys(source: str, present: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise one CheckpointKeyError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(k for k in expected if k not in present)
    unexpected = sorted(k for k in present if k not in expected)
    mis_shaped = [(k, tuple(present[k]), tuple(expected[k])) for k in sorted(expected)
                  if k in present and tuple(present[k]) != tuple(expected[k])]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError(source, missing, unexpected, mis_shaped)


def assemble(key_map: KeyMap, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build the StageLM state dict; `get` fetches one source tensor by key."""
    state = {}
    for ours, pieces in key_map.items():
        parts = [piece.take(get(piece.key)) for piece in pieces]
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return state


def indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by group 1 of `pattern` (full match) over `keys`."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.fullmatch(key))})


def count(keys: Iterable[str], pattern: str) -> int:
    """How many numbered entries (layers, codebooks) there are: the highest index + 1.

    A gap (say layer 3 absent) is then reported by `check_keys` as missing keys rather than
    silently shortening the model.
    """
    found = indices(keys, pattern)
    return found[-1] + 1 if found else 0


def describe_validation_error(source: str, error: ValidationError) -> str:
    fields = "\n".join(f"  field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
                       for err in error.errors())
    return f"{source}: unsupported or invalid configuration:\n{fields}"
