"""Curation for `gcr score`: which images pass the score filters, and copying or moving them.

- A filter is `--min-overall X` and/or per-dimension minimums (`--min text_faithfulness=3`). An image
  passes only with a COMPLETE critique (every dimension of its task judged) whose overall, and each
  named dimension, reaches its minimum: an unscored, incomplete or failed critique never passes. A
  dimension the critic marked N/A (text rendering of an image with no text), or that the image's task
  does not have (image faithfulness of a text-to-image entry), is not applicable and does not fail it.
- `--copy-to DIR` / `--move-to DIR` put the passing images there, never overwriting a file: each keeps
  its file name, sanitized (a name from a manifest is user text) to letters, digits, '.', '-' and '_';
  when that name is taken (a file already there, or an image of the same name from another folder),
  `-2`, `-3` ... is added before the extension. Files are created exclusively (O_EXCL, or a hard link), so even a file that appears
  meanwhile is never replaced. Where each image went is recorded with its result, so running the
  same job again does not copy it twice.
"""
from __future__ import annotations

import errno
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .records import DIMENSIONS, EDIT

# What `--min NAME=V` accepts for each dimension: its name and the table's label (any case, - or _).
DIMENSION_NAMES = {"text_faithfulness": "text", "image_faithfulness": "image", "physical_quality": "quality",
                   "text_rendering": "rendering"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 120  # characters of a file name gcr makes (most file systems allow 255 bytes)


@dataclass(frozen=True)
class Filters:
    """The minimums an image must reach to pass; none set: every complete critique passes."""

    min_overall: float | None = None
    minimums: dict = field(default_factory=dict)   # dimension -> minimum score

    @property
    def active(self) -> bool:
        return self.min_overall is not None or bool(self.minimums)

    def passes(self, result: dict) -> bool:
        """Whether a scored result (gcr.scoring's record) reaches every minimum (see the module notes)."""
        if result.get("error") or not result.get("complete") or result.get("overall") is None:
            return False
        if self.min_overall is not None and result["overall"] < self.min_overall:
            return False
        scores = result.get("scores") or {}
        for dim, minimum in self.minimums.items():
            value = scores.get(dim)
            if value is not None and value < minimum:
                return False
        return True

    def describe(self) -> str:
        parts = ([f"overall >= {self.min_overall:g}"] if self.min_overall is not None else []) + \
            [f"{dim} >= {v:g}" for dim, v in self.minimums.items()]
        return ", ".join(parts) or "a complete critique"


def parse_filters(min_overall: float | None, minimums: list[str]) -> Filters:
    """`--min-overall` and the `--min NAME=VALUE` pairs, checked (UsageError names the fix)."""
    if min_overall is not None:
        _check_score("--min-overall", min_overall)
    parsed = {}
    for pair in minimums:
        name, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--min '{pair}' is not NAME=VALUE: write e.g. --min text_faithfulness=3.")
        dim = dimension(name)
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--min {name.strip()}: '{value}' is not a number: give a score from 1 to 4.") from None
        _check_score(f"--min {name.strip()}", number)
        parsed[dim] = number
    return Filters(min_overall, parsed)


def dimension(name: str) -> str:
    """A dimension by its name or its table label (`text_faithfulness`, `Text`, `physical-quality` ...)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    for dim, label in DIMENSION_NAMES.items():
        if key in (dim, label):
            return dim
    names = ", ".join(DIMENSIONS[EDIT])
    raise UsageError(f"--min: unknown dimension '{name.strip()}': use one of {names} (or Text, Image, Quality, "
                     "Rendering).")


def _check_score(flag: str, value: float) -> None:
    if not math.isfinite(value) or not 1.0 <= value <= 4.0:
        raise UsageError(f"{flag} must be a score from 1 to 4, not {value:g}.")


def check_destination(directory: Path, flag: str) -> None:
    """Before anything is scored: the folder can be made (or is one), so the end of a long job does
    not fail on it."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{flag} {directory} is a file, not a folder: give a folder to put the images in.")
    parent = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {directory} cannot be written ({parent} is not writable): choose another folder.")


def file_name(result: dict) -> str:
    """The name an image takes in the destination: its own file name, sanitized; never empty, never
    hidden, never a path."""
    image = Path(result["image"])
    suffix = _SAFE.sub("", image.suffix)[:16] or ".png"
    stem = _SAFE.sub("_", image.stem).strip("._-")[:MAX_NAME] or "image"
    return f"{stem}{suffix.lower()}"


def place(result: dict, directory: Path, move: bool) -> Path:
    """Copy (or move) the result's image into `directory` under a name no file has (see the module
    notes); return where it went."""
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(result["image"])
    name = Path(file_name(result))
    for n in range(1, 100_000):
        target = directory / (name.name if n == 1 else f"{name.stem}-{n}{name.suffix}")
        if move and _link(source, target):
            source.unlink()
            return target
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
                shutil.copyfileobj(data, out)
            shutil.copystat(source, target)
        except BaseException:
            target.unlink(missing_ok=True)  # no half-copied file left under a real name
            raise
        if move:
            source.unlink()
        return target
    raise UsageError(f"{directory} already holds 100,000 files named like {name}: choose another folder.")


def _link(source: Path, target: Path) -> bool:
    """A move without a copy where the file system allows: a hard link never replaces a file. False
    when the name is taken or links cannot be made here (another file system): copy instead."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
