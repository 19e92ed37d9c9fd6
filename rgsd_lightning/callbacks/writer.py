"""SyntheticSetWriter: writes generated images as a synthetic identity set (DESIGN §3).

The set's layout, row fields and card are :mod:`rgsd_lightning.data.synthetic_set`.

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

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from rgsd_lightning.data.records import IdentityRecord, write_manifest
from rgsd_lightning.data.synthetic_set import (
    AUDIT_FIELDS,
    MANIFEST,
    REJECTED_MANIFEST,
    append_rejected,
    completed_rows,
    drop_flagged,
    image_path,
    integrity_fields,
    read_card,
    read_rows,
    request_key,
    shard_path,
    shard_paths,
    summarize,
    write_card,
)
from rgsd_lightning.io import atomic_write_bytes, encode_png, to_uint8

log = logging.getLogger(__name__)


class SyntheticSetWriter(BasePredictionWriter):
    """Write ``predict`` outputs as a synthetic set; resumable and sharded per rank.

    The module's ``predict_step`` returns a dict with ``images`` (B, C, H, W) in [-1, 1], ``identity``
    (list of names), ``seed`` (B,), and optionally ``request`` (B,), ``rewards`` (dict of (B,) tensors)
    and ``meta`` (dict of settings shared by the batch, e.g. sampler and generator hash), and ``per_image``
    (dict of per-image values, e.g. each image's start image when generating from images).

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
        if trainer.is_global_zero and shard_paths(self.output_dir):
            self.merge()  # fold an interrupted run's shards (torn last lines dropped) into manifest.jsonl
        trainer.strategy.barrier("synthetic_writer_resume")
        done = set(completed_rows(self.output_dir))
        rejected = read_rows(self.output_dir / REJECTED_MANIFEST)
        done |= {request_key(r["identity"], r["seed"]) for r in rejected}
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "completed_requests"):
            datamodule.completed_requests = set(done)
        if done:
            log.info("resuming synthetic set %s: %d images already written", self.output_dir, len(done))

    def _open_shard(self, rank: int):
        if self._shard is None:
            self._shard = shard_path(self.output_dir, rank).open("a", encoding="utf-8")
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
        per_image = dict(prediction.get("per_image") or {})
        shard = self._open_shard(trainer.global_rank)
        for i, (identity, seed) in enumerate(zip(identities, seeds, strict=True)):
            rel = image_path(identity, seed)
            data = encode_png(images[i])
            atomic_write_bytes(self.output_dir / rel, data)
            row = {
                "path": str(rel),
                "identity": identity,
                "camera": -1,
                "source": "synthetic",
                "split": "train",
            }
            row.update(seed=seed, **integrity_fields(data))
            if requests[i] is not None:
                row["request"] = int(requests[i])
            row.update({k: float(v[i]) for k, v in rewards.items()})
            row.update(meta)
            row.update({k: v[i] for k, v in per_image.items()})
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
        from rgsd_lightning.evaluation.privacy import NearCopyThresholds, audit_synthetic_set

        thresholds = NearCopyThresholds(**self.audit_thresholds)
        result = audit_synthetic_set(
            self.output_dir, real_records, extractor=self.audit_extractor, thresholds=thresholds
        )
        if self.drop_near_copies and result.flagged:
            flagged = {a.path for a in result.flagged}
            rows = [r for r in read_rows(self.output_dir / MANIFEST) if r["path"] in flagged]
            append_rejected(self.output_dir, rows)
            drop_flagged(self.output_dir, result, move_files=True)
        self.last_audit = result
        return result

    def merge(self, module_info: dict[str, Any] | None = None) -> Path:
        """Merge shards into manifest.jsonl (deduplicated, sorted, intact images only) and write card.json;
        remove the shards.

        Everything is computed before anything is written; the manifest is written first, then the card.
        Unless every row carries the audit fields, the rows lose them and the card its ``"audit"`` block.
        """
        rows = completed_rows(self.output_dir)
        ordered = sorted(rows.values(), key=lambda r: (r["identity"], r.get("request", 0), r["seed"]))
        card = read_card(self.output_dir)
        if not all(all(k in r for k in AUDIT_FIELDS) for r in ordered):  # the audit no longer covers it
            ordered = [{k: v for k, v in r.items() if k not in AUDIT_FIELDS} for r in ordered]
            card.pop("audit", None)
        records = [IdentityRecord.from_json(r, base_dir=self.output_dir) for r in ordered]
        card.update(self.card_extra)
        card.update(module_info or {})
        card.update(summarize(ordered))
        write_manifest(self.output_dir / MANIFEST, records)
        write_card(self.output_dir, card)
        for shard in shard_paths(self.output_dir):
            shard.unlink()
        return self.output_dir / MANIFEST


def _as_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    return list(values)
