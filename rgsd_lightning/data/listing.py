"""Folder listing shared by the dataset parsers (``sources``, ``pairs``): natural order, hidden files skipped.

Names starting with ``.`` (macOS ``._x.jpg`` forks, ``.DS_Store``) are never listed; a missing folder fails
with a ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from rgsd_lightning.data.images import is_image_file

PathLike = str | os.PathLike

_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple:
    """Sort key putting ``2.pgm`` before ``10.pgm`` and ``s2`` before ``s10`` (ties broken by the name)."""
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def visible_entries(folder: Path) -> list[str]:
    """Non-hidden names inside ``folder`` (unsorted: callers sort)."""
    return [n for n in os.listdir(folder) if not n.startswith(".")]


def image_names(folder: Path, exclude: Callable[[str], bool] | None = None) -> list[str]:
    """Image file names directly inside ``folder``, in natural order."""
    names = [n for n in visible_entries(folder) if is_image_file(n) and (folder / n).is_file()]
    if exclude is not None:
        names = [n for n in names if not exclude(n)]
    return sorted(names, key=natural_key)


def name_excluded(path: PathLike, patterns: Sequence[str]) -> bool:
    """True when the file name of ``path`` matches one of the fnmatch ``patterns`` (e.g. ``*_Ambient*``)."""
    name = os.path.basename(path)
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def existing_dir(root: PathLike, what: str) -> Path:
    """``root`` as an absolute path (``~`` expanded); FileNotFoundError naming ``what`` if not a folder."""
    path = Path(os.path.abspath(os.path.expanduser(root)))
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path
