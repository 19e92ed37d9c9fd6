"""Face verification pairs: LFW ``pairs.txt``, insightface ``.bin``, RFW groups, pairs drawn from records.

A :class:`VerificationPairs` holds unique image sources (paths or encoded bytes) and index pairs into them.
Like the record parsers of :mod:`rgsd_lightning.data.sources`, nothing
decodes an image, and bad input fails with a ``ValueError`` or ``FileNotFoundError`` naming the file or line.
An insightface ``.bin`` is read with an unpickler that refuses every global, so a file can never run code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rgsd_lightning.data.listing import PathLike, existing_dir, visible_entries
from rgsd_lightning.data.records import IdentityRecord
from rgsd_lightning.io import atomic_write_bytes, atomic_write_json

_PAIRS_FORMAT = "rgsd-verification-pairs"


# ------------------------------------------------------------------------------------- verification pairs
@dataclass(frozen=True, eq=False)
class VerificationPairs:
    """A face verification set: unique image sources and index pairs into them.

    Attributes:
        name: set name (``"lfw"``, ``"African"``...).
        images: image sources, file paths or encoded bytes.
        pairs: int64 ``(N, 2)`` indices into ``images``.
        issame: bool ``(N,)``, True for a genuine pair.
        group: demographic group (RFW) or None.
    """

    name: str
    images: list[str | bytes]
    pairs: np.ndarray
    issame: np.ndarray
    group: str | None = None

    def __post_init__(self) -> None:
        pairs = np.asarray(self.pairs)
        issame = np.asarray(self.issame)
        if pairs.size == 0:
            pairs = pairs.reshape(0, 2)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or (pairs.size and pairs.dtype.kind not in "iu"):
            raise ValueError(
                f"pairs {self.name!r}: pairs must be an integer (N, 2) array, got {pairs.dtype} {pairs.shape}"
            )
        if issame.shape != (len(pairs),):
            raise ValueError(
                f"pairs {self.name!r}: issame must have shape ({len(pairs)},), got {issame.shape}"
            )
        if (
            issame.size
            and issame.dtype != bool
            and (issame.dtype.kind not in "iu" or not np.isin(issame, (0, 1)).all())
        ):
            raise ValueError(f"pairs {self.name!r}: issame must hold bools (or 0/1), got {issame.dtype}")
        if pairs.size and (pairs.min() < 0 or pairs.max() >= len(self.images)):
            raise ValueError(f"pairs {self.name!r}: pair indices must lie in [0, {len(self.images)})")
        object.__setattr__(self, "images", list(self.images))
        object.__setattr__(self, "pairs", pairs.astype(np.int64))
        object.__setattr__(self, "issame", issame.astype(bool))

    def __len__(self) -> int:
        return len(self.pairs)


def read_pairs_txt(
    pairs_path: PathLike,
    root: PathLike,
    *,
    name: str | None = None,
    path_template: str = "{name}/{name}_{index:04d}{ext}",
    ext: str = ".jpg",
) -> VerificationPairs:
    """Verification pairs from an LFW-style ``pairs.txt``.

    An optional first line of 1-2 integers (``10 300``: 10 folds of 300 genuine + 300 impostor pairs;
    ``1100``: 1100 genuine + 1100 impostor) is checked against the number of pair lines. Then
    ``name i j`` is a genuine pair and ``name1 i name2 j`` an impostor pair; blank lines are skipped.
    Every image must exist; images used by several pairs appear once in ``images``.

    Args:
        pairs_path: the pairs file.
        root: image folder the template is relative to.
        name: set name; defaults to the pairs file's stem.
        path_template: image path below ``root`` from ``name``, ``index`` and ``ext``.
        ext: image extension passed to the template.
    """
    pairs_path = Path(pairs_path)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs file not found: {pairs_path}")
    base = existing_dir(root, "image")
    index: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    issame: list[bool] = []
    header: list[int] | None = None
    first = True
    for lineno, line in enumerate(pairs_path.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if first and 1 <= len(tokens) <= 2 and all(re.fullmatch(r"\d+", t) for t in tokens):
            header, first = [int(t) for t in tokens], False
            continue
        first = False
        if len(tokens) == 3:
            names = (tokens[0], tokens[0])
            numbers = (tokens[1], tokens[2])
        elif len(tokens) == 4:
            names = (tokens[0], tokens[2])
            numbers = (tokens[1], tokens[3])
        else:
            raise ValueError(
                f"{pairs_path}:{lineno}: expected 'name i j' or 'name1 i name2 j', got {line.strip()!r}"
            )
        if not all(re.fullmatch(r"\d+", n) for n in numbers):
            raise ValueError(f"{pairs_path}:{lineno}: image numbers must be integers, got {line.strip()!r}")
        ids = []
        for person, number in zip(names, numbers, strict=True):
            path = str(base / path_template.format(name=person, index=int(number), ext=ext))
            if path not in index:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{pairs_path}:{lineno}: image not found: {path}")
                index[path] = len(index)
            ids.append(index[path])
        pairs.append((ids[0], ids[1]))
        issame.append(len(tokens) == 3)
    if not pairs:
        raise ValueError(f"{pairs_path}: no pairs found")
    if header is not None:
        expected = 2 * int(np.prod(header))
        if expected != len(pairs):
            raise ValueError(
                f"{pairs_path}: header {' '.join(map(str, header))} announces {expected} pairs, "
                f"file holds {len(pairs)}"
            )
    return VerificationPairs(
        name or pairs_path.stem, list(index), np.array(pairs, dtype=np.int64), np.array(issame, dtype=bool)
    )


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so only built-in containers and scalars can load."""

    def find_class(self, module: str, name: str) -> Any:
        """Refuse ``module.name``: no global is ever imported."""
        hint = ""
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes with protocol < 3
            hint = " (bytes pickled by Python 3 with protocol < 3: re-save it with pickle protocol >= 3)"
        raise pickle.UnpicklingError(
            f"the file contains a disallowed object {module}.{name}; "
            f".bin files may only contain bytes, lists and bools{hint}"
        )


def read_verification_bin(path: PathLike, *, name: str | None = None) -> VerificationPairs:
    """Verification pairs from an insightface ``.bin`` (pickle of ``(bins, issame_list)``), safely.

    The pickle is loaded by an unpickler that refuses every global, so a crafted file cannot run code.
    Structure checked: a 2-tuple/list; ``bins`` a list of 2N non-empty bytes; ``issame`` a list of N
    bools (ints 0/1 from old writers are accepted too). Pair i is ``(bins[2i], bins[2i+1])``; images
    are kept in file order, not de-duplicated. Images are not decoded here.

    Args:
        path: the ``.bin`` file.
        name: set name; defaults to the file's stem (``lfw``, ``cfp_fp``...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification .bin not found: {path}")
    try:
        with path.open("rb") as fh:
            obj = _NoGlobalsUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: {err}") from err
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as err:
        raise ValueError(f"{path}: not a readable .bin pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pair (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, list | tuple) or not isinstance(issame, list | tuple):
        raise ValueError(
            f"{path}: bins and issame_list must be lists, got {type(bins).__name__}, {type(issame).__name__}"
        )
    for i, item in enumerate(bins):
        if not isinstance(item, bytes | bytearray) or not item:
            raise ValueError(f"{path}: image {i} must be non-empty encoded bytes, got {type(item).__name__}")
    for i, flag in enumerate(issame):
        if not (isinstance(flag, bool) or (type(flag) is int and flag in (0, 1))):
            raise ValueError(f"{path}: issame[{i}] must be a bool, got {flag!r}")
    if not issame or len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair, >= 1 pair)"
        )
    n = len(issame)
    return VerificationPairs(
        name or path.stem,
        [bytes(b) for b in bins],
        np.arange(2 * n, dtype=np.int64).reshape(n, 2),
        np.array([bool(f) for f in issame], dtype=bool),
    )


def write_verification_bin(path: PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-style ``.bin`` (pickle of ``(bins, issame_list)``) atomically.

    Args:
        path: destination file.
        images: 2N encoded images; pair i is ``(images[2i], images[2i+1])``.
        issame: N flags, True for a genuine pair.
    """
    if not all(isinstance(b, bytes | bytearray) and b for b in images):
        raise ValueError(f"{path}: images must be non-empty encoded bytes")
    if not all(isinstance(f, bool | np.bool_) for f in issame):
        raise ValueError(f"{path}: issame must hold bools")
    bins = [bytes(b) for b in images]
    flags = [bool(f) for f in issame]
    if len(bins) != 2 * len(flags):
        raise ValueError(f"{path}: {len(bins)} images for {len(flags)} pairs (need exactly 2 per pair)")
    buf = io.BytesIO()
    pickle.dump((bins, flags), buf, protocol=4)
    atomic_write_bytes(path, buf.getvalue())


def read_rfw_groups(
    root: PathLike, *, groups: Sequence[str] | None = None, ext: str = ".jpg"
) -> dict[str, VerificationPairs]:
    """RFW test sets, one :class:`VerificationPairs` per group, from the raw release layout.

    Pairs from ``root/txts/<Group>/<Group>_pairs.txt`` (LFW-style lines, read by :func:`read_pairs_txt`),
    images at ``root/data/<Group>/<name>/<name>_<idx:04d><ext>``.

    Args:
        root: the RFW ``test`` folder holding ``txts/`` and ``data/``.
        groups: groups to read; default every subfolder of ``root/txts``, sorted.
        ext: image extension.
    """
    base = existing_dir(root, "RFW")
    txts = existing_dir(base / "txts", "RFW txts")
    if groups is None:
        groups = sorted(n for n in visible_entries(txts) if (txts / n).is_dir())
        if not groups:
            raise ValueError(f"{txts}: no group folders found")
    out = {}
    for group in groups:
        pairs_file = txts / group / f"{group}_pairs.txt"
        if not pairs_file.is_file():
            raise FileNotFoundError(f"RFW pairs file not found: {pairs_file}")
        pairs = read_pairs_txt(
            pairs_file, existing_dir(base / "data" / group, "RFW image"), name=group, ext=ext
        )
        out[group] = dataclasses.replace(pairs, group=group)
    return out


# -------------------------------------------------------------------------------------- pairs from records
def make_pairs(
    records: Sequence[IdentityRecord],
    *,
    num_pairs: int,
    seed: int = 0,
    n_folds: int = 10,
    name: str = "pairs",
) -> VerificationPairs:
    """A balanced genuine/impostor pair list drawn from identity records, laid out like LFW.

    Every record takes part whatever its split (filter first). ``num_pairs`` must be a multiple of
    ``2 * n_folds``; fold f is a contiguous block of ``num_pairs / n_folds`` pairs, genuine first, then
    impostor. Genuine pairs are spread as evenly as capacity allows over identities with >= 2 images;
    impostor pairs take two distinct identities uniformly, then one image of each. No unordered pair
    repeats. The draw depends only on ``seed`` and the set of (identity, path), not on record order.

    Args:
        records: the labelled images.
        num_pairs: total number of pairs.
        seed: seed of the NumPy Generator.
        n_folds: number of folds.
        name: set name.
    """
    if n_folds < 1 or num_pairs < 1 or num_pairs % (2 * n_folds):
        raise ValueError(
            f"num_pairs ({num_pairs}) must be a positive multiple of 2 * n_folds ({2 * n_folds})"
        )
    owner: dict[str, str] = {}
    for r in records:
        if owner.setdefault(r.path, r.identity) != r.identity:
            raise ValueError(f"image {r.path} is labelled both {owner[r.path]!r} and {r.identity!r}")
    by_id: dict[str, list[str]] = {}
    for path, identity in owner.items():
        by_id.setdefault(identity, []).append(path)
    identities = sorted(by_id)
    members = [sorted(by_id[i]) for i in identities]
    rng = np.random.default_rng(seed)
    half = num_pairs // 2
    genuine = _genuine_pairs(members, half, rng)
    impostor = _impostor_pairs(members, half, rng)
    per_fold = half // n_folds
    ordered = []
    for f in range(n_folds):
        block = slice(f * per_fold, (f + 1) * per_fold)
        ordered += [(a, b, True) for a, b in genuine[block]] + [(a, b, False) for a, b in impostor[block]]
    index: dict[tuple[int, int], int] = {}
    pairs = [[index.setdefault(a, len(index)), index.setdefault(b, len(index))] for a, b, _ in ordered]
    images = [members[i][j] for i, j in index]
    return VerificationPairs(name, images, np.array(pairs), np.array([s for *_, s in ordered]))


_ImageRef = tuple[int, int]  # (identity index, image index within the identity)


def _genuine_pairs(
    members: list[list[str]], count: int, rng: np.random.Generator
) -> list[tuple[_ImageRef, _ImageRef]]:
    capacity = np.array([len(m) * (len(m) - 1) // 2 for m in members], dtype=np.int64)
    if capacity.sum() < count:
        raise ValueError(
            f"too few images for {count} genuine pairs: {int((capacity > 0).sum())} identities have "
            f">= 2 images, allowing {int(capacity.sum())} distinct genuine pairs"
        )
    quota = np.zeros(len(members), dtype=np.int64)
    order = rng.permutation(len(members))
    left = count
    while left:  # water-filling: equal shares, capped by each identity's capacity
        open_ = [i for i in order if quota[i] < capacity[i]]
        share = left // len(open_)
        if share == 0:
            quota[open_[:left]] += 1
            break
        for i in open_:
            add = min(share, capacity[i] - quota[i])
            quota[i] += add
            left -= add
    out = []
    for i in np.flatnonzero(quota):
        n = len(members[i])
        starts = np.array([a * n - a * (a + 1) // 2 for a in range(n)])  # triu pair index of (a, a+1)
        for t in rng.choice(int(capacity[i]), size=int(quota[i]), replace=False):
            a = int(np.searchsorted(starts, t, side="right") - 1)
            out.append(((int(i), a), (int(i), int(a + 1 + t - starts[a]))))
    return [out[k] for k in rng.permutation(len(out))]


def _impostor_pairs(
    members: list[list[str]], count: int, rng: np.random.Generator
) -> list[tuple[_ImageRef, _ImageRef]]:
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    possible = (int(sizes.sum()) ** 2 - int((sizes**2).sum())) // 2
    if possible < count:
        raise ValueError(f"too few identities/images for {count} impostor pairs ({possible} possible)")
    seen: set[tuple[_ImageRef, _ImageRef]] = set()
    out = []
    for _ in range(50 * count + 1000):
        if len(out) == count:
            break
        i, j = rng.choice(len(members), size=2, replace=False)
        a, b = (int(i), int(rng.integers(sizes[i]))), (int(j), int(rng.integers(sizes[j])))
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            out.append((a, b))
    if len(out) < count:
        raise ValueError(
            f"could not draw {count} distinct impostor pairs: identities too few or too unbalanced"
        )
    return out


# ----------------------------------------------------------------------------------------- JSON pair files
def save_pairs(path: PathLike, pairs: VerificationPairs) -> None:
    """Save path-based pairs as a JSON document (atomic); paths below its folder are stored relative.

    Args:
        path: destination ``.json`` file.
        pairs: the pairs; their images must be file paths (bytes images raise ``ValueError``).
    """
    path = Path(path)
    base = os.path.abspath(path.parent)
    images = []
    for i, image in enumerate(pairs.images):
        if not isinstance(image, str | os.PathLike):
            raise ValueError(
                f"{path}: image {i} of {pairs.name!r} is {type(image).__name__}; "
                "only path-based pairs can be saved"
            )
        rel = os.path.relpath(os.path.abspath(image), base)
        images.append(
            rel if rel != os.pardir and not rel.startswith(os.pardir + os.sep) else os.path.abspath(image)
        )
    doc = {
        "format": _PAIRS_FORMAT,
        "version": 1,
        "name": pairs.name,
        "group": pairs.group,
        "images": [Path(p).as_posix() if not os.path.isabs(p) else p for p in images],
        "pairs": pairs.pairs.tolist(),
        "issame": pairs.issame.tolist(),
    }
    atomic_write_json(path, doc)


def load_pairs(path: PathLike) -> VerificationPairs:
    """Load pairs saved by :func:`save_pairs`; relative image paths resolve against the JSON's folder.

    Args:
        path: the ``.json`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON document ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != _PAIRS_FORMAT:
        raise ValueError(f"{path}: not a pairs file written by save_pairs (format {_PAIRS_FORMAT!r})")
    missing = [k for k in ("name", "images", "pairs", "issame") if k not in doc]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    base = os.path.abspath(path.parent)
    images = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in doc["images"]]
    try:
        return VerificationPairs(
            str(doc["name"]),
            images,
            np.array(doc["pairs"], dtype=np.int64),
            np.array(doc["issame"]),
            doc.get("group"),
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err
