"""Paths read from files (manifest.json, installed.json): relative, normalized and confined.

A path that comes from a file may be hand-edited or come from someone else's song, so it is
never trusted to name a location by itself: `RelativePath` (a pydantic type) accepts only a
plain relative POSIX path without `..`, and `inside(base, rel)` resolves it and refuses one
that leaves `base` through a symlink. Every file the library deletes or overwrites because a
file said so goes through both.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from .errors import StageStackError


class PathEscapeError(StageStackError):
    """A path read from a file points outside the directory it must stay in."""


def check_relative(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a relative path, got an empty one")
    if "\\" in value or "\x00" in value:
        raise ValueError(f"{value!r}: expected a relative POSIX path ('/' separators, no backslashes or NULs)")
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        raise ValueError(f"{value!r}: an absolute path; expected a path relative to its directory")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError(f"{value!r}: contains '..'; expected a path inside its directory")
    if posixpath.normpath(value) != value or "." in parts:
        raise ValueError(f"{value!r}: not normalized; expected {posixpath.normpath(value)!r}")
    return value


RelativePath = Annotated[str, AfterValidator(check_relative)]


def inside(base: str | os.PathLike, rel: str) -> Path:
    """`base / rel`, refused (PathEscapeError) if `rel` is not a plain relative path or if the
    result, with symlinks followed, is not inside `base`."""
    try:
        check_relative(rel)
    except ValueError as e:
        raise PathEscapeError(f"{base}: refusing the path {e}") from None
    base = Path(base)
    path = base / rel
    real_base, real = os.path.realpath(base), os.path.realpath(path)
    if os.path.commonpath([real_base, real]) != real_base:
        raise PathEscapeError(f"{path}: resolves to {real}, outside {real_base}; refusing to touch it")
    return path
