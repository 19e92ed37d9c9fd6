import json
import os

import pytest
from PIL import Image

from rgsd_lightning.data import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.data.images import BadImageError, load_image
from rgsd_lightning.io import atomic_write_text


def test_manifest_round_trip_keeps_fields_and_relative_paths(tmp_path):
    img_dir = tmp_path / "set" / "images" / "0001"
    img_dir.mkdir(parents=True)
    outside = tmp_path / "elsewhere.png"
    recs = [
        IdentityRecord(str(img_dir / "a.png"), "0001", 2, "synthetic", "train", {"seed": 7, "sem": 0.5}),
        IdentityRecord(str(outside), "0002", -1, "real", "gallery"),
    ]
    path = write_manifest(tmp_path / "set" / "manifest.jsonl", recs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["path"] == os.path.join("images", "0001", "a.png")  # stored relative to the set
    assert os.path.isabs(rows[1]["path"])  # outside the set: kept absolute
    assert rows[0]["seed"] == 7 and rows[0]["sem"] == 0.5
    back = read_manifest(path)
    assert back == recs
    assert back[0].extra == {"seed": 7, "sem": 0.5}
    assert back[0].path == str(img_dir / "a.png")


def test_bad_manifest_row_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"path": "a.png", "identity": "x"}\n{"path": "b.png"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_manifest(path)
    path.write_text('{"path": "a.png", "identity": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_manifest(path)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "missing.jsonl")


def test_record_validation():
    with pytest.raises(ValueError, match="source"):
        IdentityRecord("a.png", "x", source="fake")
    with pytest.raises(ValueError, match="identity"):
        IdentityRecord("a.png", "")
    with pytest.raises(ValueError, match="shadows"):
        IdentityRecord("a.png", "x", extra={"split": 1}).to_json()


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    atomic_write_text(path, "old\n")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left behind


def test_load_image_errors_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 6), (10, 20, 30)).save(good)
    assert load_image(good).size == (4, 6)
    assert load_image(good, "L").mode == "L"
    with pytest.raises(BadImageError, match="missing.png.*not found"):
        load_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="corrupt.png"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:-40])
    with pytest.raises(BadImageError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(BadImageError, match="<9 bytes>"):
        load_image(b"notimage!")
