"""Dataset parsers: folders in, :class:`IdentityRecord` lists out (verification pairs: :mod:`.pairs`).

Every parser lists files and parses names; none decodes an image, so all of them are cheap enough to run
in a DataModule constructor. Bad input fails with a ``ValueError`` or ``FileNotFoundError`` naming the
file, folder or line. Paths in the returned records are absolute. Hidden files and folders (names
starting with ``.``, e.g. macOS ``._x.jpg`` forks) and non-image files (``Thumbs.db``) are ignored.

Supported layouts:

* Market-1501 and the Market-style "cuhk03-np" release (person ReID: train / query / gallery);
* one folder per identity (CASIA-WebFace extracted, ORL ``s1/1.pgm``, Yale B ``yaleB01/*.png``);
* an unlabelled image tree (a prior corpus such as PETA crops);
* face verification pairs (LFW ``pairs.txt``, insightface ``.bin``, RFW groups, pairs drawn from records)
  are in :mod:`rgsd_lightning.data.pairs`; the folder listing helpers in :mod:`rgsd_lightning.data.listing`.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgsd_lightning.data.images import is_image_file
from rgsd_lightning.data.listing import PathLike, existing_dir, image_names, natural_key, visible_entries
from rgsd_lightning.data.records import IdentityRecord

__all__ = [
    "CUHK03_VARIANTS",
    "MARKET_SPLITS",
    "read_market1501",
    "read_cuhk03np",
    "read_identity_folders",
    "read_unlabelled_images",
]

MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
CUHK03_VARIANTS = ("labeled", "detected")
# <pid>_c<camera>[s<sequence>]{_<field>}.<ext>: Market-1501 0002_c1s1_000451_03.jpg, cuhk03-np 0001_c1_1.png;
# the whole name must match, so a copy such as "0002_c1s1_000451_03 (copy).jpg" is not taken as another image
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:s\d+)?(?:_[0-9A-Za-z]+)*\.[0-9A-Za-z]+$")


# ------------------------------------------------------------------------------------------------- ReID
def _find_split_root(root: Path, needed: Sequence[str]) -> Path:
    """``root`` itself, or its single subfolder holding the split folders (``Market-1501-v15.09.15/``)."""
    if any((root / n).is_dir() for n in needed):
        return root
    nested = [root / n for n in sorted(visible_entries(root)) if (root / n).is_dir()]
    nested = [d for d in nested if any((d / n).is_dir() for n in needed)]
    if len(nested) == 1:
        return nested[0]
    where = f"; several subfolders hold them: {[d.name for d in nested]}" if nested else ""
    raise FileNotFoundError(f"{root}: none of the folders {list(needed)} found{where}")


def _read_market_split(folder: Path, split: str, extra: dict[str, Any]) -> list[IdentityRecord]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{split} folder not found: {folder}")
    names = sorted(n for n in visible_entries(folder) if is_image_file(n) and (folder / n).is_file())
    if not names:
        raise ValueError(f"{split} folder holds no images: {folder}")
    records = []
    for name in names:
        match = _MARKET_NAME.match(name)
        if match is None:
            raise ValueError(
                f"{folder / name}: file name does not match '<pid>_c<camera>[s<seq>]_<frame>..._<n>.<ext>' "
                "(e.g. 0002_c1s1_000451_03.jpg); remove copies and other files from the split folder"
            )
        pid, cam = int(match.group(1)), int(match.group(2))
        if cam < 1:
            raise ValueError(f"{folder / name}: camera numbers start at 1, got c{match.group(2)}")
        if pid < -1:
            raise ValueError(
                f"{folder / name}: person id must be -1 (junk), 0 (distractor) or positive, got {pid}"
            )
        if pid == -1 or (pid == 0 and split != "gallery"):
            continue  # junk everywhere; distractors only make sense as gallery non-matches
        records.append(IdentityRecord(str(folder / name), f"{pid:04d}", cam - 1, "real", split, dict(extra)))
    if not records:
        raise ValueError(f"{split} folder holds only junk (-1) or distractor (0000) images: {folder}")
    return records


def _read_market_layout(root: Path, extra: dict[str, Any]) -> dict[str, list[IdentityRecord]]:
    base = _find_split_root(root, list(MARKET_SPLITS.values()))
    return {split: _read_market_split(base / sub, split, extra) for split, sub in MARKET_SPLITS.items()}


def read_market1501(root: PathLike) -> dict[str, list[IdentityRecord]]:
    """Market-1501 records ``{'train', 'query', 'gallery'}`` from ``bounding_box_train``, ``query``,
    ``bounding_box_test`` under ``root`` (or under its single subfolder holding them).

    ``0002_c1s1_000451_03.jpg`` gives identity ``"0002"`` and camera 0. ``-1`` junk images are dropped
    everywhere; ``0000`` distractors are kept in the gallery only. Records are sorted by file name.

    Args:
        root: the extracted dataset folder.
    """
    return _read_market_layout(existing_dir(root, "Market-1501"), {})


def read_cuhk03np(root: PathLike, variant: str) -> dict[str, list[IdentityRecord]]:
    """CUHK03-NP records from the Market-style release ``root/{labeled,detected}/{bounding_box_train,...}``.

    Parsing is that of :func:`read_market1501`; every record carries ``extra['cuhk03_variant']``.

    Args:
        root: the ``cuhk03-np`` folder (or a folder whose single subfolder is it).
        variant: ``"labeled"`` (hand-drawn boxes) or ``"detected"`` (DPM boxes); no default on purpose.
    """
    if variant not in CUHK03_VARIANTS:
        raise ValueError(f"CUHK03-NP variant must be one of {CUHK03_VARIANTS}, got {variant!r}")
    base = _find_split_root(existing_dir(root, "CUHK03-NP"), [variant])
    folder = base / variant
    if not folder.is_dir():
        raise FileNotFoundError(f"CUHK03-NP {variant} folder not found: {folder}")
    return _read_market_layout(folder, {"cuhk03_variant": variant})


# ---------------------------------------------------------------------------------------- identity folders
def read_identity_folders(
    root: PathLike,
    *,
    train_per_identity: int | None = None,
    seed: int | None = None,
    min_images: int = 1,
    exclude: Callable[[str], bool] | None = None,
) -> list[IdentityRecord]:
    """Records from one subfolder per identity (CASIA ``0000045/001.jpg``, ORL ``s1/1.pgm``, Yale B).

    Identities and files come in natural order (``s2`` before ``s10``, ``2.pgm`` before ``10.pgm``);
    only image files directly inside an identity folder count; files directly in ``root`` are ignored.
    Camera is -1. The identity string is the folder name.

    Args:
        root: folder holding the identity folders.
        train_per_identity: ``None``: every record is ``"train"``; ``k``: k images per identity are
            ``"train"`` and the rest ``"test"``, so every identity needs at least k + 1 images.
        seed: ``None``: the first k images (natural order) are train; an int: the k train images are drawn
            per identity by a NumPy Generator seeded with ``(seed, crc32(identity))``, so the draw is
            deterministic, independent of listing order and of which other identities exist.
        min_images: an identity folder with fewer images raises (a folder with none always raises).
        exclude: skip files whose name makes it return True (e.g. Yale's ``*_Ambient.png``); an identity
            whose every image it skips is left out (e.g. ``yaleB2*``: a split of the identities).
    """
    base = existing_dir(root, "identity")
    if train_per_identity is not None and (isinstance(train_per_identity, bool) or train_per_identity < 1):
        raise ValueError(f"train_per_identity must be a positive int or None, got {train_per_identity!r}")
    if seed is not None and train_per_identity is None:
        raise ValueError("seed only selects the train images of a split: give train_per_identity too")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    needed = max(1, min_images, 0 if train_per_identity is None else train_per_identity + 1)
    folders = sorted((n for n in visible_entries(base) if (base / n).is_dir()), key=natural_key)
    if not folders:
        raise ValueError(f"{base}: no identity folders found")
    records: list[IdentityRecord] = []
    for identity in folders:
        names = image_names(base / identity, exclude)
        if not names and exclude is not None and image_names(base / identity, None):
            continue  # every image excluded: the identity is left out, not a data error
        if len(names) < needed:
            why = (
                f" (train_per_identity={train_per_identity} needs >= {needed})" if train_per_identity else ""
            )
            raise ValueError(
                f"identity folder {base / identity} holds {len(names)} images, fewer than {needed}{why}"
            )
        train = _train_indices(len(names), identity, train_per_identity, seed)
        for i, name in enumerate(names):
            split = "train" if train is None or i in train else "test"
            records.append(IdentityRecord(str(base / identity / name), identity, -1, "real", split))
    if not records:
        raise ValueError(f"{base}: exclude leaves out every image of every identity")
    return records


def _train_indices(n: int, identity: str, k: int | None, seed: int | None) -> set[int] | None:
    if k is None:
        return None
    if seed is None:
        return set(range(k))
    rng = np.random.default_rng([seed, zlib.crc32(identity.encode("utf-8"))])
    return {int(i) for i in rng.choice(n, size=k, replace=False)}


def read_unlabelled_images(root: PathLike, *, identity: str = "unlabelled") -> list[IdentityRecord]:
    """Every image below ``root`` (recursive, natural order of the relative path), split ``"prior"``.

    Args:
        root: folder of an unlabelled prior corpus (e.g. PETA crops).
        identity: the identity string given to every record.
    """
    base = existing_dir(root, "image")
    found: list[tuple[tuple, str]] = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and is_image_file(name):
                rel = os.path.relpath(os.path.join(folder, name), base)
                found.append((tuple(natural_key(p) for p in Path(rel).parts), rel))
    if not found:
        raise ValueError(f"{base}: no images found")
    return [IdentityRecord(str(base / rel), identity, -1, "real", "prior") for _, rel in sorted(found)]
