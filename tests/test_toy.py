"""Tests of the procedural toy identities (rgsd_lightning.data.toy)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from rgsd_lightning.data import toy

NAME = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.png$")
SMALL = dict(
    num_train_ids=3, num_test_ids=3, images_per_id=6, num_cameras=3, num_distractors=4, height=32, width=16
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parse(folder: Path) -> list[tuple[int, int, str]]:
    """(pid, camera, file name) of every image in a Market-style folder; fails on a bad name."""
    rows = []
    for path in sorted(folder.iterdir()):
        match = NAME.match(path.name)
        assert match, f"bad file name {path.name}"
        rows.append((int(match.group(1)), int(match.group(2)), path.name))
    return rows


# --------------------------------------------------------------------------------------------- renderers


def test_identities_and_renderers_are_deterministic_by_seed() -> None:
    assert toy.person_identity(0, 3) == toy.person_identity(0, 3)
    assert toy.face_identity(0, 3) == toy.face_identity(0, 3)
    assert toy.person_identity(0, 3) != toy.person_identity(1, 3)
    assert toy.face_identity(0, 3) != toy.face_identity(0, 4)
    person = toy.person_identity(0, 1)
    a = toy.render_person(person, np.random.default_rng(5), 0, 48, 24)
    b = toy.render_person(person, np.random.default_rng(5), 0, 48, 24)
    assert a.shape == (48, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # same scene, other camera: only the fixed per-camera colour cast differs
    assert not np.array_equal(a, toy.render_person(person, np.random.default_rng(5), 1, 48, 24))
    face = toy.render_face(toy.face_identity(0, 1), np.random.default_rng(5), 40)
    assert face.shape == (40, 40, 3) and face.dtype == np.uint8
    np.testing.assert_array_equal(
        face, toy.render_face(toy.face_identity(0, 1), np.random.default_rng(5), 40)
    )


def test_palettes_make_single_attributes_collide() -> None:
    people = [toy.person_identity(0, pid) for pid in range(1, 33)]
    faces = [toy.face_identity(0, i) for i in range(1, 33)]
    # every single attribute repeats among 32 identities, yet the attribute combinations are all distinct
    for attr in ("shirt", "pattern", "trousers", "shoes", "skin", "hair"):
        assert len({getattr(p, attr) for p in people}) < len(people), attr
    for attr in ("skin", "hair", "hair_style", "glasses", "beard"):
        assert len({getattr(f, attr) for f in faces}) < len(faces), attr
    assert len({(p.shirt, p.shirt2, p.pattern, p.trousers, p.shoes) for p in people}) == len(people)


# --------------------------------------------------------------------------------------------- layout


def test_market_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    a = _files(toy.make_toy_market(tmp_path / "a", seed=3, **SMALL))
    b = _files(toy.make_toy_market(tmp_path / "b", seed=3, **SMALL))
    c = _files(toy.make_toy_market(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    images = [k for k in a if k.endswith(".png")]
    assert len(images) == 6 * 6 + 4
    assert {v for k, v in a.items() if k.endswith(".png")}.isdisjoint(
        {v for k, v in c.items() if k.endswith(".png")}
    )


def test_market_layout(tmp_path: Path) -> None:
    args = dict(
        SMALL, num_train_ids=4, num_test_ids=5, images_per_id=7, num_cameras=4, num_distractors=6, seed=1
    )
    root = toy.make_toy_market(tmp_path / "market", **args)
    train = _parse(root / "bounding_box_train")
    gallery = _parse(root / "bounding_box_test")
    query = _parse(root / "query")

    train_ids = {pid for pid, _, _ in train}
    test_ids = {pid for pid, _, _ in gallery + query if pid != 0}
    assert train_ids == {1, 2, 3, 4} and test_ids == {5, 6, 7, 8, 9}
    assert train_ids.isdisjoint(test_ids)
    assert {pid for pid, _, _ in query} == test_ids  # at least one query per test id

    cams = defaultdict(list)
    for pid, cam, name in train + gallery + query:
        assert 1 <= cam <= 4
        assert name.split("_")[1][2:] == "s1" and name.endswith("_01.png") and len(name.split("_")[2]) == 6
        cams[pid].append(cam)
    for pid in train_ids | test_ids:
        assert len(cams[pid]) == 7 and len(set(cams[pid])) >= 2, pid
    assert sum(1 for pid, _, _ in gallery if pid == 0) == 6  # distractors only in the gallery

    per_query_cam = defaultdict(int)
    for pid, cam, name in query:
        per_query_cam[pid, cam] += 1
        matches = [g for g in gallery if g[0] == pid and g[1] != cam]
        assert matches, f"query {name} has no cross-camera gallery match"
    assert max(per_query_cam.values()) == 1
    # one query for every camera a test identity appears in
    for pid in test_ids:
        assert {c for p, c, _ in query if p == pid} == set(cams[pid])

    names = [n for _, _, n in train + gallery + query]
    assert len(names) == len(set(names))
    with Image.open(root / "query" / query[0][2]) as img:
        assert img.format == "PNG" and img.size == (16, 32) and img.mode == "RGB"
    meta = json.loads((root / "toy.json").read_text())
    assert meta["format_version"] == toy.FORMAT_VERSION and meta["kind"] == "market1501"
    assert meta["params"] == args


def test_faces_layout_and_determinism(tmp_path: Path) -> None:
    root = toy.make_toy_faces(tmp_path / "faces", num_ids=3, images_per_id=4, size=24, seed=2)
    assert sorted(p.name for p in root.iterdir()) == ["id0001", "id0002", "id0003", "toy.json"]
    for folder in ("id0001", "id0002", "id0003"):
        assert sorted(p.name for p in (root / folder).iterdir()) == ["1.png", "2.png", "3.png", "4.png"]
    with Image.open(root / "id0002" / "3.png") as img:
        assert img.format == "PNG" and img.size == (24, 24)
    meta = json.loads((root / "toy.json").read_text())
    assert meta["kind"] == "faces"
    assert meta["params"] == dict(num_ids=3, images_per_id=4, size=24, seed=2)
    again = toy.make_toy_faces(tmp_path / "again", num_ids=3, images_per_id=4, size=24, seed=2)
    other = toy.make_toy_faces(tmp_path / "other", num_ids=3, images_per_id=4, size=24, seed=5)
    assert _files(root) == _files(again)
    assert (root / "id0001" / "1.png").read_bytes() != (other / "id0001" / "1.png").read_bytes()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(images_per_id=3), "images_per_id"),
        (dict(num_cameras=1), "num_cameras"),
        (dict(num_cameras=10), "num_cameras"),
        (dict(num_train_ids=0), "num_train_ids"),
        (dict(seed=-1), "seed"),
        (dict(height=True), "height"),
        (dict(num_train_ids=5000, num_test_ids=5000), "9999"),
    ],
)
def test_market_rejects_bad_arguments(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        toy.make_toy_market(tmp_path / "m", **{**SMALL, **kwargs})
    assert not (tmp_path / "m").exists()


def test_faces_reject_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        toy.make_toy_faces(tmp_path / "f", size=8)
    with pytest.raises(ValueError, match="num_ids"):
        toy.make_toy_faces(tmp_path / "f", num_ids=2.0)


# --------------------------------------------------------------------------------------------- atomicity


def test_second_call_does_not_rewrite_and_other_params_raise(tmp_path: Path) -> None:
    root = toy.make_toy_market(tmp_path / "m", **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert toy.make_toy_market(tmp_path / "m", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps

    with pytest.raises(ValueError, match=r"images_per_id: 6 -> 5"):
        toy.make_toy_market(tmp_path / "m", **{**SMALL, "images_per_id": 5})
    with pytest.raises(ValueError, match="kind"):
        toy.make_toy_faces(tmp_path / "m")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps  # failed calls touched nothing

    toy.make_toy_market(tmp_path / "m", **{**SMALL, "images_per_id": 5}, overwrite=True)
    assert json.loads((root / "toy.json").read_text())["params"]["images_per_id"] == 5
    assert len(list((root / "bounding_box_train").iterdir())) == 3 * 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old folder left


def test_refuses_to_replace_a_folder_that_is_not_a_toy_dataset(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="no toy.json"):
            toy.make_toy_faces(tmp_path / "mine", num_ids=2, images_per_id=1, size=16, overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty folder is simply filled
    toy.make_toy_faces(tmp_path / "empty", num_ids=2, images_per_id=1, size=16)
    assert (tmp_path / "empty" / "id0002" / "1.png").is_file()


def _fail_after(monkeypatch: pytest.MonkeyPatch, name: str, calls: int) -> None:
    original = getattr(toy, name)
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise RuntimeError("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(toy, name, flaky)


def test_interrupted_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_after(monkeypatch, "render_person", 10)
    with pytest.raises(RuntimeError, match="simulated"):
        toy.make_toy_market(tmp_path / "m", **SMALL)
    _fail_after(monkeypatch, "render_face", 3)
    with pytest.raises(RuntimeError, match="simulated"):
        toy.make_toy_faces(tmp_path / "f", num_ids=3, images_per_id=2, size=16)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = toy.make_toy_faces(tmp_path / "f", num_ids=2, images_per_id=2, size=16)
    before = _files(root)
    _fail_after(monkeypatch, "render_face", 1)
    with pytest.raises(RuntimeError, match="simulated"):
        toy.make_toy_faces(root, num_ids=3, images_per_id=2, size=16, overwrite=True)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("same", [True, False])
def test_concurrent_caller_that_publishes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    """Another process (here: a nested call) finishes the same root while this call is still writing."""
    root = tmp_path / "m"
    original = toy.render_person
    state = {"done": False}

    def racing(*args, **kwargs):
        if not state["done"]:
            state["done"] = True
            monkeypatch.setattr(toy, "render_person", original)
            toy.make_toy_market(root, **{**SMALL, "seed": 0 if same else 1})
            monkeypatch.setattr(toy, "render_person", racing)
        return original(*args, **kwargs)

    monkeypatch.setattr(toy, "render_person", racing)
    if same:
        assert toy.make_toy_market(root, **SMALL) == root
    else:
        with pytest.raises(ValueError, match="seed: 1 -> 0"):
            toy.make_toy_market(root, **SMALL)
    monkeypatch.setattr(toy, "render_person", original)
    assert json.loads((root / "toy.json").read_text())["params"]["seed"] == (0 if same else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert _files(root) == _files(
        toy.make_toy_market(tmp_path / "ref", **{**SMALL, "seed": 0 if same else 1})
    )


# --------------------------------------------------------------------------------------------- learnability


def _split(images: list[np.ndarray], labels: list[int], train: list[bool]):
    x, y, t = np.stack(images), np.array(labels), np.array(train)
    return x[t], y[t], x[~t], y[~t]


def _pixel_1nn(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    a = xtr.reshape(len(xtr), -1).astype(np.float64)
    b = xte.reshape(len(xte), -1).astype(np.float64)
    dist = (b**2).sum(1)[:, None] - 2 * b @ a.T + (a**2).sum(1)[None, :]
    return float((ytr[dist.argmin(1)] == yte).mean())


def _small_cnn(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, steps: int = 200) -> float:
    """Held-out accuracy of a 4-block conv net trained with Adam, random shifts and flips (all seeded)."""
    torch.manual_seed(0)
    layers, cin = [], 3
    for cout in (16, 32, 64, 128):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, int(ytr.max()) + 1))

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    x, y = tensor(xtr), torch.from_numpy(ytr)
    height, width, pad = x.shape[2], x.shape[3], 3
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(y), (32,), generator=gen)
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        batch = padded[idx, :, dy : dy + height, dx : dx + width]
        if torch.rand(1, generator=gen).item() < 0.5:
            batch = batch.flip(3)
        loss = F.cross_entropy(net(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(tensor(xte)).argmax(1).numpy()
    return float((pred == yte).mean())


@pytest.mark.slow  # long: trains recognizers to show the toy data is learnable
def test_toy_persons_are_learnable_but_not_trivial(tmp_path: Path) -> None:
    root = toy.make_toy_market(
        tmp_path / "m", num_train_ids=20, num_test_ids=1, images_per_id=10, num_distractors=0
    )
    by_pid = defaultdict(list)
    for pid, _, name in _parse(root / "bounding_box_train"):
        by_pid[pid].append(np.asarray(Image.open(root / "bounding_box_train" / name).convert("RGB")))
    images, labels, train = [], [], []
    for pid, imgs in sorted(by_pid.items()):
        images += imgs
        labels += [pid - 1] * len(imgs)
        train += [k % 2 == 0 for k in range(len(imgs))]  # 5 train / 5 held out, cameras mixed
    xtr, ytr, xte, yte = _split(images, labels, train)
    assert len(xtr) == len(xte) == 100
    cnn, nn1 = _small_cnn(xtr, ytr, xte, yte), _pixel_1nn(xtr, ytr, xte, yte)
    print(f"toy persons: small CNN {cnn:.2f}, pixel 1-NN {nn1:.2f} (chance 0.05)")
    assert cnn >= 0.6
    assert nn1 <= 0.5 * cnn


@pytest.mark.slow  # long: trains recognizers to show the toy data is learnable
def test_toy_faces_are_learnable_but_not_trivial(tmp_path: Path) -> None:
    root = toy.make_toy_faces(tmp_path / "f", num_ids=20, images_per_id=10, size=32)
    images, labels, train = [], [], []
    for i in range(20):
        for n in range(1, 11):
            images.append(np.asarray(Image.open(root / f"id{i + 1:04d}" / f"{n}.png").convert("RGB")))
            labels.append(i)
            train.append(n <= 5)
    xtr, ytr, xte, yte = _split(images, labels, train)
    cnn, nn1 = _small_cnn(xtr, ytr, xte, yte), _pixel_1nn(xtr, ytr, xte, yte)
    print(f"toy faces: small CNN {cnn:.2f}, pixel 1-NN {nn1:.2f} (chance 0.05)")
    assert cnn >= 0.6
    assert nn1 <= 0.5 * cnn
