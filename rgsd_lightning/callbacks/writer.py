"""SyntheticSetWriter: writes generated images as a synthetic identity set (DESIGN §3).

Layout of a synthetic set folder::

    images/<identity>/<seed>.png     one PNG per generated image
    manifest.jsonl                   one row per image (path, identity, seed, sampler settings,
                                     generator hash, reward components ...), merged on rank 0
    card.json                        counts, per-identity statistics, generator provenance, audit result

Each rank writes its images (atomically, fsync'ed) and appends rows to its own ``manifest.rank<r>.jsonl``
shard right after every batch (fsync'ed), so a killed generation loses at most the batch in flight. Every
row records the size and SHA-256 of its PNG (``bytes``, ``sha256``). When generation starts again, the
requests already present (in the merged manifest or in any shard) whose image is intact are skipped:
intact means the file matches the recorded size and hash (a row without them, e.g. of an older set, must
decode). A missing, truncated or altered image is made again, so the set completes without duplicates,
gaps or broken files. At the end rank 0 merges the shards into ``manifest.jsonl`` and writes ``card.json``
(each atomically, the card after the manifest, everything computed before either is written).

Then, by default, the privacy audit runs (``evaluation.privacy``): every image's nearest real training
image and similarities go into its manifest row, the summary into ``card.json["audit"]``. The card keeps
an ``"audit"`` block only while every manifest row carries the audit's fields: a merge that adds or
replaces rows removes both the block and the per-row fields, so a failed audit leaves a set that says
"not audited" rather than a stale summary. With ``drop_near_copies`` the flagged images leave the manifest
(their files move to ``rejected/``, their keys to ``rejected/manifest.jsonl`` so a resumed generation does
not make them again).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from rgsd_lightning.callbacks.images import to_uint8
from rgsd_lightning.data.records import (
    IdentityRecord,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    write_manifest,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
CARD = "card.json"
REJECTED_MANIFEST = Path("rejected") / MANIFEST


def request_key(identity: str, seed: int) -> tuple[str, int]:
    """Requests are identified by (identity, seed): the same pair always gives the same image."""
    return (str(identity), int(seed))


def read_rows(path: Path) -> list[dict]:
    """Rows of a manifest or shard; a torn last line (interrupted append) is ignored."""
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


def image_intact(output_dir: Path, row: dict) -> bool:
    """Whether the row's image is on disk and whole: its recorded size and SHA-256 match (rows without
    them must decode)."""
    path = output_dir / row["path"]
    if not path.is_file():
        return False
    if row.get("sha256") is not None:
        if row.get("bytes") is not None and path.stat().st_size != int(row["bytes"]):
            return False
        return _sha256(path) == row["sha256"]
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError):  # what PIL raises for truncated or corrupt files
        return False
    return True


def completed_rows(output_dir: Path) -> dict[tuple[str, int], dict]:
    """Rows already written (merged manifest, then shards: a later row of a request wins) whose image is
    intact (:func:`image_intact`); the others are logged and left to be generated again."""
    rows: dict[tuple[str, int], dict] = {}
    for path in [output_dir / MANIFEST, *sorted(output_dir.glob("manifest.rank*.jsonl"))]:
        for row in read_rows(path):
            rows[request_key(row["identity"], row["seed"])] = row
    done = {key: row for key, row in rows.items() if image_intact(output_dir, row)}
    broken = [row["path"] for key, row in rows.items() if key not in done]
    if broken:
        log.warning(
            "synthetic set %s: %d listed image(s) missing or damaged (e.g. %s); they will be generated again",
            output_dir,
            len(broken),
            broken[:3],
        )
    return done


def encode_png(array: np.ndarray) -> bytes:
    """An (H, W, C) uint8 array as PNG bytes (C = 1 as grayscale)."""
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


class SyntheticSetWriter(BasePredictionWriter):
    """Write ``predict`` outputs as a synthetic set; resumable and sharded per rank.

    The module's ``predict_step`` returns a dict with ``images`` (B, C, H, W) in [-1, 1], ``identity``
    (list of names), ``seed`` (B,), and optionally ``request`` (B,), ``rewards`` (dict of (B,) tensors)
    and ``meta`` (dict of settings shared by the batch, e.g. sampler and generator hash).

    Args:
        output_dir: the synthetic set folder.
        card_extra: extra fields for card.json (e.g. the dataset the identities come from).
        audit: run the privacy audit against the datamodule's real training images at the end.
        audit_extractor: recognizer export for the audit's feature space (None: pixel space only).
        audit_thresholds: near-copy criteria (``NearCopyThresholds`` fields: pixel, feature,
            relative_alpha, baseline_quantile); None = the documented defaults.
        drop_near_copies: remove the images the audit flags from the set.
    """

    def __init__(
        self,
        output_dir: str,
        card_extra: dict[str, Any] | None = None,
        audit: bool = True,
        audit_extractor: str | None = None,
        audit_thresholds: dict[str, float | None] | None = None,
        drop_near_copies: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.card_extra = dict(card_extra or {})
        self.audit = audit
        self.audit_extractor = audit_extractor
        self.audit_thresholds = dict(audit_thresholds or {})
        self.drop_near_copies = drop_near_copies
        self.last_audit = None
        self._shard = None
        self._finished = True  # nothing to finish before a predict run has started

    # -- resume: tell the datamodule which requests are done before its loader is built
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self._finished = False
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero and any(self.output_dir.glob("manifest.rank*.jsonl")):
            self.merge()  # fold an interrupted run's shards (torn last lines dropped) into manifest.jsonl
        trainer.strategy.barrier("synthetic_writer_resume")
        done = set(completed_rows(self.output_dir))
        done |= {
            request_key(r["identity"], r["seed"]) for r in read_rows(self.output_dir / REJECTED_MANIFEST)
        }
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "completed_requests"):
            datamodule.completed_requests = set(done)
        if done:
            log.info("resuming synthetic set %s: %d images already written", self.output_dir, len(done))

    def _open_shard(self, rank: int):
        if self._shard is None:
            path = self.output_dir / f"manifest.rank{rank}.jsonl"
            self._shard = path.open("a", encoding="utf-8")
        return self._shard

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if prediction is None:
            return
        images = to_uint8(prediction["images"])
        identities = list(prediction["identity"])
        seeds = [int(s) for s in _as_list(prediction["seed"])]
        requests = _as_list(prediction.get("request", [None] * len(seeds)))
        rewards = {k: _as_list(v) for k, v in (prediction.get("rewards") or {}).items()}
        meta = dict(prediction.get("meta") or {})
        shard = self._open_shard(trainer.global_rank)
        for i, (identity, seed) in enumerate(zip(identities, seeds, strict=True)):
            rel = Path("images") / _safe(identity) / f"{seed:010d}.png"
            data = encode_png(images[i])
            atomic_write_bytes(self.output_dir / rel, data)
            row = {
                "path": str(rel),
                "identity": identity,
                "camera": -1,
                "source": "synthetic",
                "split": "train",
            }
            row.update(seed=seed, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            if requests[i] is not None:
                row["request"] = int(requests[i])
            row.update({k: float(v[i]) for k, v in rewards.items()})
            row.update(meta)
            shard.write(json.dumps(row) + "\n")
        shard.flush()
        os.fsync(shard.fileno())

    def on_predict_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Lightning skips the predict loop (and on_predict_end) when no request is left: merge and audit
        # anyway, so a rerun on a complete set still repairs its manifest and card. (Not reached on errors.)
        if stage == "predict" and not self._finished:
            self._finish(trainer, pl_module)

    def _finish(self, trainer, pl_module) -> None:
        self._finished = True
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        trainer.strategy.barrier("synthetic_writer_merge")
        if trainer.is_global_zero:
            self.merge(getattr(pl_module, "card_info", lambda: {})())
            datamodule = getattr(trainer, "datamodule", None)
            if self.audit and datamodule is not None and hasattr(datamodule, "split_records"):
                self.run_audit(datamodule.split_records("train"))
            elif self.audit:
                log.warning(
                    "privacy audit skipped: no IdentityDataModule to take the real training images from"
                )
        trainer.strategy.barrier("synthetic_writer_merged")

    def run_audit(self, real_records: list[IdentityRecord]):
        """Audit the merged set against the real training images; drop flagged images if configured."""
        from rgsd_lightning.evaluation.privacy import NearCopyThresholds, audit_synthetic_set, drop_flagged

        thresholds = NearCopyThresholds(**self.audit_thresholds)
        result = audit_synthetic_set(
            self.output_dir, real_records, extractor=self.audit_extractor, thresholds=thresholds
        )
        if self.drop_near_copies and result.flagged:
            flagged = {a.path for a in result.flagged}
            rows = [r for r in read_rows(self.output_dir / MANIFEST) if r["path"] in flagged]
            rejected = self.output_dir / REJECTED_MANIFEST
            previous = read_rows(rejected)
            rejected.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(rejected, "".join(json.dumps(r) + "\n" for r in previous + rows))
            drop_flagged(self.output_dir, result, move_files=True)
        self.last_audit = result
        return result

    def merge(self, module_info: dict[str, Any] | None = None) -> Path:
        """Merge shards into manifest.jsonl (deduplicated, sorted, intact images only) and write card.json;
        remove the shards.

        Everything is computed before anything is written; the manifest is written first, then the card.
        Unless every row carries the audit fields, the rows lose them and the card its ``"audit"`` block.
        """
        from rgsd_lightning.evaluation.privacy import AUDIT_FIELDS

        rows = completed_rows(self.output_dir)
        ordered = sorted(rows.values(), key=lambda r: (r["identity"], r.get("request", 0), r["seed"]))
        card_path = self.output_dir / CARD
        card = _read_card(card_path)
        if not all(all(k in r for k in AUDIT_FIELDS) for r in ordered):  # the audit no longer covers the set
            ordered = [{k: v for k, v in r.items() if k not in AUDIT_FIELDS} for r in ordered]
            card.pop("audit", None)
        records = [IdentityRecord.from_json(r, base_dir=self.output_dir) for r in ordered]
        card.update(self.card_extra)
        card.update(module_info or {})
        card.update(summarize(ordered))
        write_manifest(self.output_dir / MANIFEST, records)
        atomic_write_json(card_path, card)
        for shard in self.output_dir.glob("manifest.rank*.jsonl"):
            shard.unlink()
        return self.output_dir / MANIFEST


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Counts and per-identity reward statistics of a synthetic set (card.json body)."""
    counts = Counter(r["identity"] for r in rows)
    reward_keys = sorted({k for r in rows for k in ("total", "sem", "cov", "exp") if k in r})
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


def _read_card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix or remove it (it is rebuilt)") from err
    if not isinstance(card, dict):
        raise ValueError(f"{path}: card.json must hold a JSON object, got {type(card).__name__}")
    return card


def _as_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    return list(values)


def _safe(identity: str) -> str:
    """A folder name for an identity (path separators and dots are not allowed to escape the set)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in identity)
    return cleaned or "_"
