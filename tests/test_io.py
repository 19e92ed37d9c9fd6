"""The one atomic writer (files and folders) and the image / figure savers of rgsd_lightning.io."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from rgsd_lightning.io import (
    atomic_file,
    atomic_folder,
    atomic_write_json,
    atomic_write_text,
    encode_png,
    save_figure,
    save_png,
)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "card.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_file(path) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("disk full")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert _names(path.parent) == ["card.json"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and _names(path.parent) == ["card.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        mode = stat.S_IMODE(atomic_write_text(tmp_path / "x.txt", "x").stat().st_mode)
    finally:
        os.umask(umask)
    assert mode == 0o644  # readable by the group, like a plain open(); not a private temp file's 0600


def test_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "weights").write_text("v2 (half)")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1" and _names(tmp_path) == ["export"]
    with atomic_folder(target) as tmp:
        (tmp / "other").write_text("v3")
    assert _names(target) == ["other"] and _names(tmp_path) == ["export"]


def test_folder_without_replace_fills_only_an_absent_or_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty, replace=False) as tmp:
        (tmp / "a").write_text("a")
    assert _names(empty) == ["a"]
    with pytest.raises(FileExistsError):
        with atomic_folder(empty, replace=False) as tmp:
            (tmp / "b").write_text("b")
    assert _names(empty) == ["a"] and _names(tmp_path) == ["empty"]


def test_png_round_trip_for_arrays_and_pil_images(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    gray = rgb[..., :1]
    assert np.array_equal(np.asarray(Image.open(save_png(rgb, tmp_path / "rgb.png"))), rgb)
    assert np.array_equal(np.asarray(Image.open(save_png(gray, tmp_path / "g.png"))), gray[..., 0])
    pil = Image.fromarray(rgb)
    assert encode_png(pil) == encode_png(rgb)


def test_figure_is_written_as_png_and_closed(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png", dpi=50)
    assert Image.open(path).size == (100, 50) and not plt.fignum_exists(fig.number)
    assert _names(tmp_path) == ["f.png"]
