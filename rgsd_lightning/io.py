"""Writing into run folders: one atomic writer for files and folders, PNG images, image grids, figures.

Everything the library writes (manifests, cards, JSON and YAML files, images, weights, export folders) goes
through :func:`atomic_file` or :func:`atomic_folder`: the content is written into a temporary sibling, then
renamed over the target, so a reader sees either the previous version or the whole new one, and an
interrupted write leaves the previous version untouched (temporary siblings are hidden: ``.<name>.…``).

The run folder of a Lightning run is :func:`run_dir`; sample grids go to ``<run>/samples/``
(:func:`log_grid`). torch is imported where a tensor is made, so ``rgsd_lightning.data`` (which writes
manifests through this module) imports without it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


# ------------------------------------------------------------------------------------------ atomic writes
def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the new file to; on success it is flushed to disk and
    renamed over ``path``, on error it is removed and ``path`` is untouched. Parent folders are created.

    The temporary name does not end in the target's suffix: pass the format explicitly to writers that
    guess it from the name (``img.save(tmp, format="PNG")``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; on success it is renamed to ``path``.

    An existing ``path`` is replaced when ``replace`` (moved aside, the new folder renamed in, the old one
    removed; if the rename fails the old one is put back). Otherwise only an absent or empty ``path`` is
    filled, else FileExistsError (also when another writer published ``path`` in the meantime). On any
    error the temporary folder is removed.
    """
    target = Path(path).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if replace and target.exists():
            old = _sibling(target, "old")
            try:
                os.rename(target, old)
            except FileNotFoundError:  # another writer moved it first
                old = None
        try:
            os.rename(tmp, target)  # POSIX: also over an empty folder
        except OSError as err:
            if old is not None:
                os.rename(old, target)
                raise
            if not target.exists():
                raise
            raise FileExistsError(f"{target} exists and is not empty") from err
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_file`); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as an indented JSON document atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------ images
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 (C = 1 squeezed to grayscale by callers)."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """An (H, W, C) uint8 array (C = 1 as grayscale) or a PIL image as PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray | Image.Image, path: str | os.PathLike) -> Path:
    """Write an (H, W, C) uint8 array or a PIL image as PNG, atomically; returns the path."""
    return atomic_write_bytes(path, encode_png(image))


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    """Write a matplotlib figure as PNG atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def image_grid(rows: list[list[torch.Tensor]], pad: int = 2) -> torch.Tensor:
    """Rows of (C, H, W) images in [-1, 1] -> one (C, H', W') grid, one row per list entry."""
    import torch
    from torchvision.utils import make_grid

    if not rows or not any(len(r) for r in rows):
        raise ValueError("image_grid needs at least one image")
    ncol = max(len(r) for r in rows)
    c, h, w = next(img for r in rows for img in r).shape
    blank = -torch.ones(c, h, w)
    flat = []
    for row in rows:
        row = [img.detach().float().cpu() for img in row]
        flat += row + [blank] * (ncol - len(row))
    return make_grid(torch.stack(flat), nrow=ncol, padding=pad, pad_value=1.0)


# ------------------------------------------------------------------------------------------ run folders
def run_dir(trainer) -> Path:
    """The run folder (the logger's log_dir, else default_root_dir).

    Under DDP ``trainer.log_dir`` is a broadcast from rank 0: call this on EVERY rank, before any
    rank-0-only branch, or the ranks deadlock.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_grid(trainer, grid: torch.Tensor, name: str, step: int, directory: str | os.PathLike) -> Path | None:
    """Save the grid as ``<directory>/samples/<name>_<step>.png`` and log it (TensorBoard), rank 0 only."""
    if not trainer.is_global_zero:
        return None
    path = Path(directory) / "samples" / f"{name.replace('/', '_')}_{step:07d}.png"
    save_png(to_uint8(grid.unsqueeze(0))[0], path)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(name, ((grid.clamp(-1, 1) + 1) / 2), global_step=step)
    return path
