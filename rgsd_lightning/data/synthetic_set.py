"""The synthetic-set format (DESIGN §3): written by generation, audited, imported, read by the datamodule.

Layout of a synthetic set folder::

    images/<identity>/<seed>.png     one PNG per generated image (identity made a safe folder name)
    manifest.jsonl                   one row per image: the record keys (path, identity, camera, source,
                                     split), seed, ``bytes`` + ``sha256`` of the PNG, sampler settings,
                                     generator fingerprint, reward components, audit fields
    manifest.rank<r>.jsonl           per-rank shards while a generation runs (merged into manifest.jsonl)
    card.json                        counts, per-identity statistics, generator provenance, audit summary
    rejected/                        images dropped as near copies; rejected/manifest.jsonl their rows

Rows are read tolerantly (:func:`read_rows`: a torn last line of an interrupted append is skipped); a row's
image is intact when it matches the recorded size and SHA-256 (:func:`image_intact`). Every file is written
atomically (:mod:`rgsd_lightning.io`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rgsd_lightning.data.images import BadImageError, load_image
from rgsd_lightning.data.records import read_manifest, relative_if_below, write_manifest
from rgsd_lightning.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
CARD = "card.json"
IMAGES = "images"
REJECTED = "rejected"
REJECTED_MANIFEST = Path(REJECTED) / MANIFEST
AUDIT_FIELDS = ("nn_real_pixel", "sim_pixel", "nn_real_feature", "sim_feature", "near_copy")
"""The fields the privacy audit adds to every row (all present, or none)."""
REWARD_KEYS = ("total", "sem", "cov", "exp")


# ------------------------------------------------------------------------------------------ names
def manifest_path(entry: str | os.PathLike) -> Path:
    """The manifest of a set folder, or a manifest file given directly; FileNotFoundError if there is none."""
    path = Path(entry)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest at {path} (expected a synthetic set folder or a .jsonl manifest)"
        )
    return path


def shard_path(set_dir: str | os.PathLike, rank: int) -> Path:
    """The manifest shard a rank appends its rows to during generation."""
    return Path(set_dir) / f"manifest.rank{rank}.jsonl"


def shard_paths(set_dir: str | os.PathLike) -> list[Path]:
    """The manifest shards present in a set folder, sorted."""
    return sorted(Path(set_dir).glob("manifest.rank*.jsonl"))


def safe_name(name: str) -> str:
    """A folder name for an identity (path separators and dots are not allowed to escape the set)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cleaned or "_"


def image_path(identity: str, seed: int) -> Path:
    """Where generation puts the image of ``(identity, seed)``, relative to the set folder."""
    return Path(IMAGES) / safe_name(identity) / f"{seed:010d}.png"


def set_relative(path: str | os.PathLike, set_dir: str | os.PathLike) -> str:
    """A path as rows and audit results name it: relative to the set folder when it lies below it."""
    return relative_if_below(path, set_dir)


# ------------------------------------------------------------------------------------------ rows
def request_key(identity: str, seed: int) -> tuple[str, int]:
    """Requests are identified by (identity, seed): the same pair always gives the same image."""
    return (str(identity), int(seed))


def integrity_fields(data: bytes) -> dict[str, Any]:
    """The row fields that let a resumed generation check an image: its size and SHA-256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a manifest or shard ([] when absent); a torn last line (interrupted append) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("ignoring a torn last line in %s (interrupted write)", path)
                continue
            raise ValueError(f"{path}:{i + 1}: malformed manifest row") from None
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_intact(set_dir: str | os.PathLike, row: dict) -> bool:
    """Whether the row's image is on disk and whole: its recorded size and SHA-256 match (rows without
    them must decode)."""
    path = Path(set_dir) / row["path"]
    if not path.is_file():
        return False
    if row.get("sha256") is not None:
        if row.get("bytes") is not None and path.stat().st_size != int(row["bytes"]):
            return False
        return _sha256(path) == row["sha256"]
    try:
        load_image(path)
    except BadImageError:  # truncated or corrupt
        return False
    return True


def completed_rows(set_dir: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """Rows already written (merged manifest, then shards: a later row of a request wins) whose image is
    intact (:func:`image_intact`); the others are logged and left to be generated again."""
    set_dir = Path(set_dir)
    rows: dict[tuple[str, int], dict] = {}
    for path in [set_dir / MANIFEST, *shard_paths(set_dir)]:
        for row in read_rows(path):
            rows[request_key(row["identity"], row["seed"])] = row
    done = {key: row for key, row in rows.items() if image_intact(set_dir, row)}
    broken = [row["path"] for key, row in rows.items() if key not in done]
    if broken:
        log.warning(
            "synthetic set %s: %d listed image(s) missing or damaged (e.g. %s); they will be generated again",
            set_dir,
            len(broken),
            broken[:3],
        )
    return done


def append_rejected(set_dir: str | os.PathLike, rows: list[dict]) -> Path:
    """Add rows to ``rejected/manifest.jsonl`` (a resumed generation does not make their requests again)."""
    path = Path(set_dir) / REJECTED_MANIFEST
    previous = read_rows(path)
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in previous + rows))


# ------------------------------------------------------------------------------------------ card
def read_card(set_dir: str | os.PathLike) -> dict[str, Any]:
    """The set's card.json ({} when absent); malformed JSON raises naming the file (it is left as is)."""
    path = Path(set_dir) / CARD
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix or remove it (it is not overwritten)") from err
    if not isinstance(card, dict):
        raise ValueError(f"{path}: card.json must hold a JSON object, got {type(card).__name__}")
    return card


def write_card(set_dir: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write the set's card.json atomically."""
    return atomic_write_json(Path(set_dir) / CARD, card)


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Counts and per-identity reward statistics of a synthetic set (card.json body)."""
    counts = Counter(r["identity"] for r in rows)
    reward_keys = sorted({k for r in rows for k in REWARD_KEYS if k in r})
    stats: dict[str, Any] = {}
    for key in reward_keys:
        values = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        stats[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    per_identity = {}
    for identity in sorted(counts):
        entry: dict[str, Any] = {"count": counts[identity]}
        for key in reward_keys:
            vals = [r[key] for r in rows if r["identity"] == identity and key in r]
            if vals:
                entry[f"{key}_mean"] = float(np.mean(vals))
        per_identity[identity] = entry
    return {
        "num_images": len(rows),
        "num_identities": len(counts),
        "reward_stats": stats,
        "per_identity": per_identity,
    }


# ------------------------------------------------------------------------------------------ dropping
class FlaggedImages(Protocol):
    """What :func:`drop_flagged` reads of an audit result (``evaluation.privacy.AuditResult``)."""

    synthetic_dir: Path

    @property
    def flagged(self) -> Sequence[Any]:
        """The flagged images; each has ``path``, relative to the set folder as in the manifest."""
        ...


def drop_flagged(
    synthetic_dir: str | os.PathLike, result: FlaggedImages, *, move_files: bool = False
) -> list[str]:
    """Remove the rows flagged by ``result`` from the set's manifest (and optionally move their images).

    The new manifest is written first (atomically); then, with ``move_files``, each flagged image is
    moved to ``rejected/<its path under the set>``. ``card.json`` counts are refreshed and
    ``card["audit"]["dropped"]`` records what was dropped. Rows already absent are ignored.

    Args:
        synthetic_dir: the synthetic set folder that ``result`` audited.
        result: the audit result naming the flagged images.
        move_files: move the flagged images to ``rejected/`` instead of leaving them unlisted in place.

    Returns:
        The manifest paths of the dropped rows.
    """
    synthetic_dir = Path(synthetic_dir)
    if os.path.abspath(synthetic_dir) != os.path.abspath(result.synthetic_dir):
        raise ValueError(f"the audit result is for {result.synthetic_dir}, not for {synthetic_dir}")
    manifest = synthetic_dir / MANIFEST
    records = read_manifest(manifest)
    card = read_card(synthetic_dir)
    flagged = {a.path for a in result.flagged}
    keep, dropped = [], []
    for rec in records:
        (dropped if set_relative(rec.path, synthetic_dir) in flagged else keep).append(rec)
    if not dropped:
        return []
    write_manifest(manifest, keep)
    moved_to = None
    if move_files:
        moved_to = REJECTED
        for rec in dropped:
            src = Path(rec.path)
            if src.is_file():
                dst = synthetic_dir / REJECTED / set_relative(src, synthetic_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dst))
    if (synthetic_dir / CARD).is_file() or card:
        card.update(summarize([r.to_json(relative_to=synthetic_dir) for r in keep]))
        audit = card.setdefault("audit", {})
        previous = audit.get("dropped", {}).get("count", 0) if isinstance(audit.get("dropped"), dict) else 0
        audit["dropped"] = {"count": previous + len(dropped), "moved_to": moved_to}
        write_card(synthetic_dir, card)
    return [set_relative(r.path, synthetic_dir) for r in dropped]


def best_per_identity(records: Sequence[Any], key: str, keep: float) -> list[Any]:
    """The ``keep`` share of each identity's synthetic records with the highest ``key`` (at least one per
    identity), in their original order: a reward-ranked filter (best-of-N by the reward the set recorded).

    Args:
        records: ``IdentityRecord``s whose ``extra`` holds ``key`` (generation with a reward extractor writes
            ``sem``, ``cov``, ``exp`` and ``total`` per image).
        key: the manifest column to rank by (higher is better).
        keep: share kept per identity, in (0, 1]; 1 keeps everything.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"synthetic_keep must lie in (0, 1], got {keep}")
    if keep == 1.0:
        return list(records)
    scores = []
    for r in records:
        value = (r.extra or {}).get(key)
        if value is None or not np.isfinite(float(value)):
            raise ValueError(
                f"synthetic image {r.path} has no finite {key!r} to rank by: sets record the reward "
                "components (sem, cov, exp, total) when generated with a reward_extractor"
            )
        scores.append(float(value))
    by_identity: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_identity.setdefault(r.identity, []).append(i)
    kept: set[int] = set()
    for idx in by_identity.values():
        n = max(1, int(round(keep * len(idx))))
        kept.update(sorted(idx, key=lambda i: (-scores[i], i))[:n])
    return [r for i, r in enumerate(records) if i in kept]
