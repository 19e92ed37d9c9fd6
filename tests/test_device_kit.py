"""The device kit (benchmarks/device/): what the GPU runs carry must stand in for what the CPU runs use."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.device.shim import faiss as faiss_shim
from benchmarks.device.shrink import main as shrink_main
from benchmarks.device.shrink import shrink_folder
from rgsd_lightning.data.images import BadImageError, load_image
from rgsd_lightning.data.transforms import generator_transform

DEVICE = Path(__file__).resolve().parents[1] / "benchmarks" / "device"


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth RGB image (a resize of noise), so bicubic resampling has structure to keep."""
    small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("channels", [1, 3])
def test_shrunk_images_read_back_as_the_originals_do(tmp_path, channels):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    originals = {"a": _photo(rng, 200, 200), "b": _photo(rng, 112, 92), "c": _photo(rng, 64, 128)}
    originals["a"].save(src / "a.jpg", quality=95)
    originals["b"].convert("L").save(src / "b.pgm")
    originals["c"].save(src / "c.png")
    (src / "notes.txt").write_text("not an image")
    assert shrink_folder(src, tmp_path / "dst", size=32, channels=channels) == 3
    transform, mode = generator_transform(32, channels, hflip=False), "L" if channels == 1 else "RGB"
    for stem, suffix in (("a", ".jpg"), ("b", ".pgm"), ("c", ".png")):
        expected = transform(load_image(src / f"{stem}{suffix}", mode))  # what the data module reads
        with Image.open(tmp_path / "dst" / f"{stem}.png") as image:
            assert image.size == (32, 32) and image.mode == mode
        got = transform(load_image(tmp_path / "dst" / f"{stem}.png", mode))
        # the PNG stores the 8-bit image the transform's PIL steps make; resizing it to its own size keeps it
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_shrink_refuses_a_missing_folder_clashing_stems_and_unreadable_images(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        shrink_folder(tmp_path / "absent", tmp_path / "dst")
    src = tmp_path / "src"
    src.mkdir()
    _photo(np.random.default_rng(1), 40, 40).save(src / "x.jpg")
    _photo(np.random.default_rng(2), 40, 40).save(src / "x.png")
    with pytest.raises(ValueError, match="same stem"):
        shrink_folder(src, tmp_path / "dst")
    (src / "x.png").unlink()
    assert shrink_main([str(src), str(tmp_path / "dst"), "--size", "16"]) == 0
    assert "1 images" in capsys.readouterr().out
    assert Image.open(tmp_path / "dst" / "x.png").size == (16, 16)
    (src / "y.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadImageError, match="y.jpg"):
        shrink_folder(src, tmp_path / "dst2")


def test_faiss_stand_in_searches_as_faiss_does():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    real, shim = faiss.IndexFlatIP(24), faiss_shim.IndexFlatIP(24)
    for index in (real, shim):
        index.add(base[:100])
        index.add(base[100:])
    assert shim.ntotal == real.ntotal == 300
    scores, ids = real.search(queries, 7)
    shim_scores, shim_ids = shim.search(queries, 7)
    np.testing.assert_array_equal(shim_ids, ids)  # continuous scores: no ties
    np.testing.assert_allclose(shim_scores, scores, rtol=1e-5, atol=1e-5 * np.abs(scores).max())
    assert shim_ids.dtype == np.int64


@pytest.mark.parametrize("script", ["kit.sh", "setup.sh", "faces_gpu.sh"])
def test_device_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(DEVICE / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
