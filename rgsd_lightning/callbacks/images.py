"""Image grids: build, save as PNG in the run folder, and send to the logger when it can show images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 (C = 1 squeezed to grayscale by callers)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, C) uint8 array as PNG atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def image_grid(rows: list[list[torch.Tensor]], pad: int = 2) -> torch.Tensor:
    """Rows of (C, H, W) images in [-1, 1] -> one (C, H', W') grid, one row per list entry."""
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
