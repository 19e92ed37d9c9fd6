"""Provenance of artifacts: fingerprints of folders and weights, and the provenance.json record."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rgsd_lightning.assets import resolve_builtin

_EDGE = 1 << 20  # bytes read from each end of a large file


def folder_fingerprint(path: str | os.PathLike) -> str:
    """A sha256 fingerprint of a folder (or file): relative names, sizes and content.

    Files up to 2 MiB are hashed whole; larger ones by their size plus their first and last MiB, so a
    2.7 GB checkpoint is fingerprinted in milliseconds. It identifies an artifact; it is not a
    cryptographic guarantee against a crafted collision.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint a missing path: {root}")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        digest.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= 2 * _EDGE:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                digest.update(fh.read(_EDGE))
    return digest.hexdigest()


def tensor_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors (name, dtype, shape and bytes), e.g. a module's trained weights."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def parent_record(source: str | os.PathLike | None) -> dict[str, Any]:
    """``{"parent": source, "parent_fingerprint": ...}`` for a local folder or a ``builtin:<name>`` export
    (named as given, fingerprinted from its shipped folder); hub ids are named only."""
    if source is None:
        return {"parent": None, "parent_fingerprint": None}
    path = Path(resolve_builtin(source))
    return {"parent": str(source), "parent_fingerprint": folder_fingerprint(path) if path.exists() else None}


def provenance(stage: str, *, parent: str | os.PathLike | None, config: dict[str, Any], **extra: Any) -> dict:
    """The provenance.json record of an export: stage, parent artifact + fingerprint, config, versions."""
    from rgsd_lightning import __version__

    record: dict[str, Any] = {"stage": stage, **parent_record(parent), "config": config}
    record.update(
        seed=os.environ.get("PL_GLOBAL_SEED"),
        library_version=__version__,
        torch_version=torch.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    record.update(extra)
    return record
