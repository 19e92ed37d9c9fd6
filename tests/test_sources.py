"""Dataset parsers: Market / CUHK03-NP, identity folders, LFW pairs, insightface .bin, RFW, pair files."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rgsd_lightning.data import sources
from rgsd_lightning.data.images import load_image
from rgsd_lightning.data.pairs import (
    VerificationPairs,
    load_pairs,
    make_pairs,
    read_pairs_txt,
    read_rfw_groups,
    read_verification_bin,
    save_pairs,
    write_verification_bin,
)
from rgsd_lightning.data.records import IdentityRecord
from rgsd_lightning.data.sources import (
    read_cuhk03np,
    read_identity_folders,
    read_market1501,
    read_unlabelled_images,
)


def _img(path: Path, value: int = 0) -> Path:
    """A real 4x3 image file (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if path.suffix == ".pgm" else "RGB"
    Image.new(mode, (4, 3), color=value if mode == "L" else (value, 0, 0)).save(path)
    return path


def _encoded(value: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color=(value, 255 - value, 7)).save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- Market
MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000551_01.jpg",
        "0007_c3s3_077419_03.png",  # any image extension
        "0000_c1s1_000000_01.jpg",  # distractor in train: dropped
        "-1_c1s1_000000_02.jpg",  # junk: dropped
    ],
    "query": ["0002_c5s1_000001_00.jpg", "0007_c6s4_000002_00.jpg", "-1_c2s1_000003_00.jpg"],
    "bounding_box_test": [
        "0002_c1s2_000100_01.jpg",
        "0007_c4s2_000200_01.jpg",
        "0000_c3s1_000300_01.jpg",  # distractor: kept in gallery
        "-1_c2s1_000400_01.jpg",
        "Thumbs.db",  # non-image: ignored
    ],
}


def _make_market(base: Path) -> Path:
    for folder, names in MARKET_FILES.items():
        for name in names:
            if name.endswith(".db"):
                (base / folder).mkdir(parents=True, exist_ok=True)
                (base / folder / name).write_bytes(b"\x00junk")
            else:
                _img(base / folder / name)
    return base


def _expected_market(folder: Path, split: str) -> list[tuple[str, str, int, str]]:
    """Independent parse: pid before '_c', camera digit after it; drop -1, drop 0 outside the gallery."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".db"):
            continue
        pid_text, rest = name.split("_c", 1)
        pid = int(pid_text)
        if pid == -1 or (pid == 0 and split != "gallery"):
            continue
        out.append((str(folder / name), f"{pid:04d}", int(rest[0]) - 1, split))
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_market1501_parses_names_cameras_junk_and_distractors(tmp_path: Path, nested: bool) -> None:
    base = _make_market(tmp_path / "Market-1501-v15.09.15" if nested else tmp_path)
    data = read_market1501(tmp_path)
    assert set(data) == {"train", "query", "gallery"}
    for split, folder in sources.MARKET_SPLITS.items():
        got = [(r.path, r.identity, r.camera, r.split) for r in data[split]]
        assert got == _expected_market(base / folder, split)
        assert all(r.source == "real" and os.path.isabs(r.path) for r in data[split])
    assert [r.identity for r in data["train"]] == ["0002", "0002", "0007"]
    assert [r.camera for r in data["train"]] == [0, 1, 2]
    assert "0000" in {r.identity for r in data["gallery"]}
    assert "0000" not in {r.identity for r in data["train"] + data["query"]}


def test_market1501_bad_inputs_name_the_file_or_folder(tmp_path: Path) -> None:
    base = _make_market(tmp_path / "m")
    bad = _img(base / "query" / "person7_cam1.jpg")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        read_market1501(base)
    bad.unlink()

    (base / "bounding_box_test").rename(base / "gallery_moved")
    with pytest.raises(FileNotFoundError, match=re.escape(str(base / "bounding_box_test"))):
        read_market1501(base)
    (base / "gallery_moved").rename(base / "bounding_box_test")

    for f in (base / "query").iterdir():
        f.unlink()
    (base / "query" / "notes.txt").write_text("no images here")
    with pytest.raises(
        ValueError, match=r"query folder holds no images: .*" + re.escape(str(base / "query"))
    ):
        read_market1501(base)

    with pytest.raises(FileNotFoundError, match="none of the folders"):
        read_market1501(tmp_path / "m" / "bounding_box_train")  # a folder with no split folders
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        read_market1501(tmp_path / "absent")


def test_market1501_split_with_only_junk_is_an_error(tmp_path: Path) -> None:
    base = _make_market(tmp_path)
    for f in (base / "query").iterdir():
        f.unlink()
    _img(base / "query" / "-1_c1s1_000001_00.jpg")
    with pytest.raises(ValueError, match=r"query folder holds only junk"):
        read_market1501(base)


def test_cuhk03np_both_variants(tmp_path: Path) -> None:
    root = tmp_path / "cuhk03-np"
    names = {
        "labeled": (
            ["0001_c1_1.png", "0001_c2_6.png"],
            ["0003_c1_1.png"],
            ["0003_c2_7.png", "0004_c2_8.png"],
        ),
        "detected": (["0002_c2_3.png"], ["0005_c2_1.png"], ["0005_c1_2.png"]),
    }
    for variant, (train, query, gallery) in names.items():
        for folder, files in zip(
            ("bounding_box_train", "query", "bounding_box_test"), (train, query, gallery), strict=True
        ):
            for name in files:
                _img(root / variant / folder / name)
    for variant, (train, query, gallery) in names.items():
        data = read_cuhk03np(root, variant)
        for split, files in zip(("train", "query", "gallery"), (train, query, gallery), strict=True):
            assert [Path(r.path).name for r in data[split]] == files
            assert all(r.extra["cuhk03_variant"] == variant for r in data[split])
            assert all(Path(r.path).parts[-3] == variant for r in data[split])
    labeled = read_cuhk03np(root, "labeled")
    assert [(r.identity, r.camera) for r in labeled["train"]] == [("0001", 0), ("0001", 1)]
    assert read_cuhk03np(tmp_path, "detected")["train"][0].identity == "0002"  # single nested folder
    with pytest.raises(ValueError, match="variant must be one of"):
        read_cuhk03np(root, "Labeled")
    (root / "detected").rename(root / "det")
    with pytest.raises(FileNotFoundError, match="detected"):
        read_cuhk03np(root, "detected")


# ------------------------------------------------------------------------------------- identity folders
def _make_orl(root: Path, people: tuple[str, ...] = ("s1", "s2", "s3")) -> Path:
    for person in people:
        for i in range(1, 11):
            _img(root / person / f"{i}.pgm", value=i)
    (root / "README").write_text("ORL faces")  # a file at the top level: ignored
    return root


def test_identity_folders_natural_order_and_first_k_split(tmp_path: Path) -> None:
    root = _make_orl(tmp_path / "orl", ("s1", "s2", "s3", "s10"))
    records = read_identity_folders(root)
    assert [r.identity for r in records[::10]] == ["s1", "s2", "s3", "s10"]
    assert [Path(r.path).name for r in records[:10]] == [f"{i}.pgm" for i in range(1, 11)]
    assert all(r.split == "train" and r.camera == -1 and r.source == "real" for r in records)
    split = read_identity_folders(root, train_per_identity=3)
    for person in ("s1", "s2", "s3", "s10"):
        mine = [r for r in split if r.identity == person]
        assert [Path(r.path).stem for r in mine if r.split == "train"] == ["1", "2", "3"]
        assert [Path(r.path).stem for r in mine if r.split == "test"] == [str(i) for i in range(4, 11)]


def _train_names(records: list[IdentityRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        if r.split == "train":
            out.setdefault(r.identity, []).append(Path(r.path).name)
    return out


def test_identity_folders_seeded_split_is_deterministic_and_listing_independent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _make_orl(tmp_path / "orl")
    first = read_identity_folders(root, train_per_identity=4, seed=7)
    assert [(r.path, r.split) for r in first] == [
        (r.path, r.split) for r in read_identity_folders(root, train_per_identity=4, seed=7)
    ]
    drawn = _train_names(first)
    assert all(len(v) == 4 for v in drawn.values()) and len(drawn) == 3
    assert Counter(r.split for r in first) == {"train": 12, "test": 18}
    first_k = {"1.pgm", "2.pgm", "3.pgm", "4.pgm"}
    assert any(set(v) != first_k for v in drawn.values()), "the seeded draw is just the first k"
    seeds = [_train_names(read_identity_folders(root, train_per_identity=4, seed=s)) for s in range(4)]
    assert len({json.dumps(d, sort_keys=True) for d in seeds}) > 1, "the seed has no effect"

    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": sorted(real_listdir(p), reverse=True))
    assert _train_names(read_identity_folders(root, train_per_identity=4, seed=7)) == drawn
    monkeypatch.undo()

    _make_orl(root, ("s0", "s4"))  # more identities do not change the draw of the existing ones
    grown = _train_names(read_identity_folders(root, train_per_identity=4, seed=7))
    assert {k: grown[k] for k in drawn} == drawn


def test_identity_folders_errors_and_exclude(tmp_path: Path) -> None:
    root = _make_orl(tmp_path / "orl")
    (root / "s4").mkdir()
    (root / "s4" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(ValueError, match=re.escape(str(root / "s4")) + r" holds 0 images"):
        read_identity_folders(root)
    (root / "s4" / "Thumbs.db").unlink()
    (root / "s4").rmdir()
    with pytest.raises(ValueError, match=re.escape(str(root / "s1")) + r" holds 10 images, fewer than 11"):
        read_identity_folders(root, min_images=11)
    with pytest.raises(ValueError, match=r"holds 10 images, fewer than 11 \(train_per_identity=10"):
        read_identity_folders(root, train_per_identity=10)
    with pytest.raises(ValueError, match="give train_per_identity"):
        read_identity_folders(root, seed=3)
    with pytest.raises(ValueError, match="train_per_identity must be a positive int"):
        read_identity_folders(root, train_per_identity=0)
    kept = read_identity_folders(root, exclude=lambda name: name.startswith("1"))  # drops 1.pgm and 10.pgm
    assert [Path(r.path).name for r in kept if r.identity == "s2"] == [f"{i}.pgm" for i in range(2, 10)]
    # an identity whose every image is excluded is left out (a split of the identities by file name) ...
    for i in range(1, 11):
        (root / "s2" / f"{i}.pgm").rename(root / "s2" / f"s2_{i}.pgm")
    kept = read_identity_folders(root, train_per_identity=1, exclude=lambda name: name.startswith("s2_"))
    assert sorted({r.identity for r in kept}) == ["s1", "s3"] and len(kept) == 20
    # ... but a folder without any image is still an error, and so is excluding everything
    (root / "s5").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(root / "s5")) + r" holds 0 images"):
        read_identity_folders(root, exclude=lambda name: name.startswith("s2_"))
    (root / "s5").rmdir()
    with pytest.raises(ValueError, match="exclude leaves out every image of every identity"):
        read_identity_folders(root, exclude=lambda name: True)


def test_unlabelled_images_recursive_sorted(tmp_path: Path) -> None:
    root = tmp_path / "peta"
    for rel in ("b/10.png", "b/2.png", "a/x.jpg", "top.bmp", ".hidden/skip.png", "a/._fork.jpg"):
        _img(root / rel)
    (root / "a" / "labels.txt").write_text("ignored")
    records = read_unlabelled_images(root, identity="peta")
    assert [os.path.relpath(r.path, root) for r in records] == ["a/x.jpg", "b/2.png", "b/10.png", "top.bmp"]
    assert {(r.identity, r.split, r.camera) for r in records} == {("peta", "prior", -1)}
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty")) + ": no images"):
        read_unlabelled_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        read_unlabelled_images(tmp_path / "missing")


# ------------------------------------------------------------------------------------------- LFW pairs
def _make_lfw(root: Path) -> Path:
    for name, count in (("Alice_A", 3), ("Bob_B", 2), ("Carol_C", 1)):
        for i in range(1, count + 1):
            _img(root / "lfw" / name / f"{name}_{i:04d}.jpg", value=10 * i)
    return root / "lfw"


LFW_LINES = [
    "Alice_A\t1\t2",
    "Bob_B 1 2",
    "Alice_A\t1\tBob_B\t2",
    "Alice_A 3 Carol_C 1",
]


def test_read_pairs_txt_same_and_different_lines_with_header(tmp_path: Path) -> None:
    images = _make_lfw(tmp_path)
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("2 1\n" + "\n".join(LFW_LINES) + "\n\n")
    got = read_pairs_txt(pairs_file, images)
    assert isinstance(got, VerificationPairs) and got.name == "pairs" and got.group is None and len(got) == 4
    rel = [os.path.relpath(p, images) for p in got.images]
    assert rel == [
        "Alice_A/Alice_A_0001.jpg",
        "Alice_A/Alice_A_0002.jpg",
        "Bob_B/Bob_B_0001.jpg",
        "Bob_B/Bob_B_0002.jpg",
        "Alice_A/Alice_A_0003.jpg",
        "Carol_C/Carol_C_0001.jpg",
    ]  # de-duplicated, in order of first use
    assert got.pairs.dtype == np.int64 and got.pairs.tolist() == [[0, 1], [2, 3], [0, 3], [4, 5]]
    assert got.issame.dtype == bool and got.issame.tolist() == [True, True, False, False]
    no_header = tmp_path / "nh.txt"
    no_header.write_text("\n".join(LFW_LINES))
    assert read_pairs_txt(no_header, images, name="lfw").pairs.tolist() == got.pairs.tolist()


def test_read_pairs_txt_errors_name_file_and_line(tmp_path: Path) -> None:
    images = _make_lfw(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("2 1\nAlice_A 1 2\nBob_B 1\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3:") + ".*'Bob_B 1'"):
        read_pairs_txt(bad, images)
    bad.write_text("Alice_A 1 two\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:1:") + " image numbers must be integers"):
        read_pairs_txt(bad, images)
    bad.write_text("10 300\nAlice_A 1 2\nAlice_A 2 Bob_B 1\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{bad}: header 10 300 announces 6000 pairs, file holds 2")
    ):
        read_pairs_txt(bad, images)
    missing = tmp_path / "missing.txt"
    missing.write_text("Alice_A 1 2\n\nBob_B 1 Dave_D 4\n")
    expected = str(images / "Dave_D" / "Dave_D_0004.jpg")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}:3: image not found: {expected}")):
        read_pairs_txt(missing, images)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.txt"))):
        read_pairs_txt(tmp_path / "nope.txt", images)


# ---------------------------------------------------------------------------------------- .bin files
def test_verification_bin_round_trip_decodes(tmp_path: Path) -> None:
    blobs = [_encoded(v, "PNG" if v % 2 else "JPEG") for v in (10, 20, 30, 40, 50, 60)]
    path = tmp_path / "sets" / "lfw.bin"
    write_verification_bin(path, blobs, [True, False, True])
    assert [p.name for p in path.parent.iterdir()] == ["lfw.bin"]  # no temp file left behind
    got = read_verification_bin(path)
    assert got.name == "lfw" and len(got) == 3
    assert got.pairs.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert got.issame.tolist() == [True, False, True]
    assert got.images == blobs
    first = np.asarray(load_image(got.images[got.pairs[2, 1]]))
    assert first.shape == (4, 4, 3) and tuple(first[0, 0]) == (60, 195, 7)  # the PNG of value 60
    # the file is the insightface layout: a plain pickle of (list of bytes, list of bools)
    bins, issame = pickle.loads(path.read_bytes())
    assert bins == blobs and issame == [True, False, True]


def test_verification_bin_accepts_python2_style_and_int_flags(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    # what Python 2 wrote: str as SHORT_BINSTRING (-> bytes with encoding="bytes"), bools as I01/I00
    py2 = b"\x80\x02(]q\x00(U\x02abU\x02cdU\x02efU\x02ghe]q\x01(I01\nK\x00etq\x02."
    path.write_bytes(py2)
    got = read_verification_bin(path, name="old")
    assert got.images == [b"ab", b"cd", b"ef", b"gh"] and got.issame.tolist() == [True, False]
    assert got.name == "old" and got.pairs.tolist() == [[0, 1], [2, 3]]


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _OpenFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "payload, disallowed",
    [
        (lambda m: _SystemCall(m), r"(posix|nt|os)\.system"),
        (lambda m: ([b"img", _OpenFile(m)], [True]), r"(builtins|io)\.open"),
    ],
)
def test_malicious_bin_is_refused_without_side_effect(tmp_path: Path, payload, disallowed: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload(marker), protocol=4))
    message = re.escape(str(path)) + r": the file contains a disallowed object " + disallowed
    with pytest.raises(ValueError, match=message + r".*may only contain bytes, lists and bools"):
        read_verification_bin(path)
    assert not marker.exists()


def test_bin_from_python3_protocol2_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "p2.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]), protocol=2))  # bytes become _codecs.encode(...)
    with pytest.raises(
        ValueError, match=re.escape(str(path)) + r": .*_codecs\.encode.*re-save it with pickle protocol"
    ):
        read_verification_bin(path)


def test_open_payload_really_would_create_the_file(tmp_path: Path) -> None:
    """Guard for the test above: a plain unpickler does run the payload."""
    marker = tmp_path / "created"
    handle = pickle.loads(pickle.dumps(_OpenFile(marker)))
    handle.close()
    assert marker.exists()


@pytest.mark.parametrize(
    "obj, message",
    [
        (([b"a", b"b", b"c"], [True]), r"3 images for 1 pairs"),
        (([b"a", b"b"], [True], "x"), r"expected a pair \(bins, issame_list\)"),
        (([b"a", "b"], [True]), r"image 1 must be non-empty encoded bytes, got str"),
        (([b"a", b""], [True]), r"image 1 must be non-empty encoded bytes"),
        (([b"a", b"b"], [2]), r"issame\[0\] must be a bool, got 2"),
        (([b"a", b"b"], "1"), r"bins and issame_list must be lists"),
        (([], []), r"0 images for 0 pairs"),
    ],
)
def test_bin_with_wrong_structure(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        read_verification_bin(path)


def test_bin_truncated_or_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_verification_bin(path)
    with pytest.raises(ValueError, match=r"2 images for 2 pairs"):
        write_verification_bin(tmp_path / "w.bin", [b"a", b"b"], [True, False])
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        read_verification_bin(tmp_path / "absent.bin")


# ------------------------------------------------------------------------------------------------- RFW
def test_rfw_two_groups(tmp_path: Path) -> None:
    root = tmp_path / "test"
    lines = {
        "Asian": ["m.0a 1 2", "m.0a 1 m.0b 1"],
        "African": ["m.1x 1 2", "m.1y 1 2", "m.1x 2 m.1y 1", "m.1y 2 m.1x 1"],
    }
    for group, group_lines in lines.items():
        (root / "txts" / group).mkdir(parents=True)
        (root / "txts" / group / f"{group}_pairs.txt").write_text("\n".join(group_lines) + "\n")
        for line in group_lines:
            tokens = line.split()
            names = (tokens[0], tokens[0]) if len(tokens) == 3 else (tokens[0], tokens[2])
            for name, idx in zip(names, (tokens[1], tokens[-1]), strict=True):
                _img(root / "data" / group / name / f"{name}_{int(idx):04d}.jpg")
    sets = read_rfw_groups(root)
    assert list(sets) == ["African", "Asian"]
    for group, got in sets.items():
        assert got.group == group and got.name == group and len(got) == len(lines[group])
        assert got.issame.tolist() == [len(line.split()) == 3 for line in lines[group]]
        assert all(Path(p).is_relative_to(root / "data" / group) for p in got.images)
    assert (
        os.path.relpath(sets["Asian"].images[sets["Asian"].pairs[1, 1]], root)
        == "data/Asian/m.0b/m.0b_0001.jpg"
    )
    assert list(read_rfw_groups(root, groups=["Asian"])) == ["Asian"]
    (root / "txts" / "Indian").mkdir()
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(root / "txts" / "Indian" / "Indian_pairs.txt"))
    ):
        read_rfw_groups(root)


# ------------------------------------------------------------------------------- make_pairs, save, load
def _records(sizes: dict[str, int]) -> list[IdentityRecord]:
    return [IdentityRecord(f"/data/{i}/{k}.png", i) for i, n in sizes.items() for k in range(n)]


def test_make_pairs_balanced_per_fold_distinct_and_deterministic() -> None:
    sizes = {f"id{i:02d}": 2 + i % 5 for i in range(12)}
    records = _records(sizes)
    got = make_pairs(records, num_pairs=80, seed=3, n_folds=4, name="toy")
    assert got.name == "toy" and len(got) == 80
    owner = {r.path: r.identity for r in records}
    ids = [(owner[got.images[a]], owner[got.images[b]]) for a, b in got.pairs]
    assert [x == y for x, y in ids] == got.issame.tolist()  # genuine = same identity, impostor = different
    for fold in range(4):
        block = got.issame[fold * 20 : (fold + 1) * 20]
        assert block[:10].all() and not block[10:].any()
    unordered = {tuple(sorted((got.images[a], got.images[b]))) for a, b in got.pairs}
    assert len(unordered) == 80 and all(a != b for a, b in got.pairs)
    assert len(set(got.images)) == len(got.images)
    genuine_ids = Counter(x for (x, _), s in zip(ids, got.issame, strict=True) if s)
    capacity = {i: n * (n - 1) // 2 for i, n in sizes.items()}
    free = [genuine_ids[i] for i in sizes if genuine_ids[i] < capacity[i]]
    assert free and max(free) - min(free) <= 1  # spread as evenly as each identity's capacity allows
    assert all(genuine_ids[i] <= max(free) for i in sizes)
    assert len(genuine_ids) == 12 and sorted(genuine_ids.values())[:6] == [1, 1, 1, 3, 3, 3]
    again = make_pairs(list(reversed(records)), num_pairs=80, seed=3, n_folds=4, name="toy")
    assert again.images == got.images and again.pairs.tolist() == got.pairs.tolist()
    other = make_pairs(records, num_pairs=80, seed=4, n_folds=4)
    assert [tuple(sorted((other.images[a], other.images[b]))) for a, b in other.pairs] != [
        tuple(sorted((got.images[a], got.images[b]))) for a, b in got.pairs
    ]


def test_make_pairs_uses_every_genuine_pair_when_tight_and_errors_clearly() -> None:
    records = _records({"a": 3, "b": 2, "c": 1})  # C(3,2) + C(2,2) = 4 genuine pairs possible
    got = make_pairs(records, num_pairs=8, n_folds=2)
    genuine = {
        tuple(sorted((got.images[a], got.images[b])))
        for (a, b), s in zip(got.pairs, got.issame, strict=True)
        if s
    }
    assert genuine == {
        ("/data/a/0.png", "/data/a/1.png"),
        ("/data/a/0.png", "/data/a/2.png"),
        ("/data/a/1.png", "/data/a/2.png"),
        ("/data/b/0.png", "/data/b/1.png"),
    }
    with pytest.raises(ValueError, match=r"too few images for 5 genuine pairs: 2 identities .* allowing 4"):
        make_pairs(records, num_pairs=10, n_folds=1)
    with pytest.raises(ValueError, match=r"impostor pairs"):
        make_pairs(_records({"a": 6}), num_pairs=2, n_folds=1)
    with pytest.raises(ValueError, match=r"multiple of 2 \* n_folds \(20\)"):
        make_pairs(records, num_pairs=30)
    clash = [IdentityRecord("/x.png", "a"), IdentityRecord("/x.png", "b")]
    with pytest.raises(ValueError, match=r"/x.png is labelled both 'a' and 'b'"):
        make_pairs(clash, num_pairs=2, n_folds=1)


def test_save_load_pairs_round_trip(tmp_path: Path) -> None:
    images = _make_lfw(tmp_path / "data")
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("\n".join(LFW_LINES))
    original = dataclasses.replace(read_pairs_txt(pairs_file, images, name="lfw"), group="g1")
    out = tmp_path / "data" / "lists" / "lfw_pairs.json"
    save_pairs(out, original)
    doc = json.loads(out.read_text())
    inside = tmp_path / "data" / "lfw_pairs.json"
    save_pairs(inside, original)
    assert json.loads(inside.read_text())["images"][0] == "lfw/Alice_A/Alice_A_0001.jpg"  # relative below
    assert json.loads(out.read_text())["images"][0] == str(images / "Alice_A" / "Alice_A_0001.jpg")  # outside
    for path in (out, inside):
        back = load_pairs(path)
        assert back.name == "lfw" and back.group == "g1"
        assert back.images == original.images
        assert back.pairs.tolist() == original.pairs.tolist() and back.pairs.dtype == np.int64
        assert back.issame.tolist() == original.issame.tolist() and back.issame.dtype == bool
    with pytest.raises(ValueError, match=r"only path-based pairs can be saved"):
        save_pairs(
            tmp_path / "b.json", VerificationPairs("b", [b"x", b"y"], np.array([[0, 1]]), np.array([True]))
        )
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**doc, "pairs": [[0, 99]] * 4}))
    with pytest.raises(ValueError, match=re.escape(str(broken)) + r": pairs 'lfw': pair indices"):
        load_pairs(broken)


def test_verification_pairs_validates_fields() -> None:
    with pytest.raises(ValueError, match=r"integer \(N, 2\)"):
        VerificationPairs("x", ["a", "b"], np.array([0, 1]), np.array([True]))
    with pytest.raises(ValueError, match=r"issame must have shape \(1,\)"):
        VerificationPairs("x", ["a", "b"], np.array([[0, 1]]), np.array([True, False]))
    with pytest.raises(ValueError, match=r"issame must hold bools"):
        VerificationPairs("x", ["a", "b"], np.array([[0, 1]]), np.array([2]))


@pytest.mark.parametrize(
    "copy_name",
    ["0002_c1s1_000451_03 (copy).jpg", "0002_c1s1_000451_03 - Copy.jpg", "0002_c1s1_000451_03(1).jpg"],
)
def test_market1501_rejects_copies_instead_of_reading_them_as_more_images(tmp_path: Path, copy_name) -> None:
    """Issue 14 case 4: the name pattern must cover the whole file name."""
    base = _make_market(tmp_path / "m")
    copy = _img(base / "bounding_box_train" / copy_name)
    with pytest.raises(ValueError, match=re.escape(str(copy)) + ".*does not match"):
        read_market1501(base)
