"""Privacy audit: near copies of real training images are found, new images are not, nothing is damaged."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rgsd_lightning.backbones import EmbeddingNet, FeatureExtractor, save_embedding_net
from rgsd_lightning.commands.audit import main as audit_main
from rgsd_lightning.data import IdentityRecord, read_identity_folders, read_manifest, write_manifest
from rgsd_lightning.data.images import BadImageError
from rgsd_lightning.data.synthetic_set import AUDIT_FIELDS, drop_flagged
from rgsd_lightning.data.toy import make_toy_market
from rgsd_lightning.evaluation.privacy import NearCopyThresholds, audit_synthetic_set, relative_threshold
from rgsd_lightning.evaluation.privacy_search import PixelSpace

NUM_IDS, PER_ID, SIZE = 6, 4, 32
COPY_KINDS = ("exact", "mirror", "noise", "shift", "exact", "mirror", "noise", "shift")
SHIFTS = ((1, 1), (2, -1), (-2, 2), (0, 2), (-1, 0), (2, 2))


# ------------------------------------------------------------------------------------------ fixtures
def draw(identity: int, seed: list[int]) -> Image.Image:
    """A 32x32 image of random shapes in the identity's palette."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng([99, identity]).integers(0, 256, size=(4, 3))
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in palette[0]))
    d = ImageDraw.Draw(img)
    for s in range(5):
        x0, y0 = (int(v) for v in rng.integers(-4, 28, size=2))
        w, h = (int(v) for v in rng.integers(6, 18, size=2))
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in palette[1 + s % 3]))
    return img


def shifted(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """The image moved by (dx, dy) pixels, the uncovered border filled with the edge pixels."""
    a = np.asarray(img)
    h, w = a.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return Image.fromarray(a[ys][:, xs])


def make_copy(img: Image.Image, kind: str, k: int) -> Image.Image:
    if kind == "exact":
        return img.copy()
    if kind == "mirror":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "noise":
        rng = np.random.default_rng(k)
        noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 5, (SIZE, SIZE, 3))
        return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return shifted(img, *SHIFTS[k % len(SHIFTS)])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """6 identities x 4 real training images in the identity-folder layout."""
    root = tmp_path_factory.mktemp("real")
    images = {}
    for i in range(NUM_IDS):
        (root / f"id{i}").mkdir()
        for k in range(PER_ID):
            images[(i, k)] = draw(i, [1, i, k])
            images[(i, k)].save(root / f"id{i}" / f"{k}.png")
    return root, read_identity_folders(root), images


def write_set(folder, items) -> None:
    """A synthetic set in the writer's layout: images/<identity>/<seed>.png, manifest.jsonl, card.json."""
    records = []
    for seed, (identity, img) in enumerate(items):
        path = folder / "images" / identity / f"{seed:010d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        extra = {"seed": seed, "sem": 0.5 + 0.01 * seed}
        records.append(IdentityRecord(str(path), identity, -1, "synthetic", "train", extra))
    write_manifest(folder / "manifest.jsonl", records)
    (folder / "card.json").write_text(json.dumps({"generator": "tiny-dit", "num_images": len(items)}))


def copies_set(folder, real_images) -> list[tuple[str, str]]:
    """One copy of every real image (exact / mirrored / noised / shifted); returns (kind, source) per row."""
    items, sources = [], []
    for n, ((i, k), img) in enumerate(sorted(real_images.items())):
        kind = COPY_KINDS[n % len(COPY_KINDS)]
        items.append((f"id{i}", make_copy(img, kind, n)))
        sources.append((kind, os.path.join(f"id{i}", f"{k}.png")))
    write_set(folder, items)
    return sources


def fresh_set(folder, per_id: int = 3) -> None:
    """Genuinely new images of the same identities (new random draws)."""
    write_set(folder, [(f"id{i}", draw(i, [2, i, k])) for i in range(NUM_IDS) for k in range(per_id)])


def file_state(folder) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted((folder / "images").rglob("*.png"))
    }


def brute_force_pixel(space: PixelSpace, query: Image.Image, reals: dict) -> tuple[float, tuple[int, int]]:
    """Nearest real image by trying every real image, without any index."""
    sims = {key: space.similarity(query, img) for key, img in reals.items()}
    best = max(sims, key=sims.get)
    return sims[best], best


# ------------------------------------------------------------------------------------------ descriptor
def test_pixel_descriptor_invariances():
    space = PixelSpace()
    img = draw(0, [1, 0, 0])
    d = space.describe(img)
    assert (
        d.shape == (256,) and abs(float(d.mean())) < 1e-5 and np.linalg.norm(d) == pytest.approx(1, abs=1e-5)
    )
    # brightness / contrast changes do not move the descriptor; mirroring and shifting are searched
    brighter = Image.fromarray((np.asarray(img, dtype=np.float64) * 0.6 + 40).astype(np.uint8))
    assert float(space.describe(brighter) @ d) > 0.999
    assert space.similarity(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img) > 0.999
    assert space.similarity(shifted(img, 2, 0), img) > float(space.describe(shifted(img, 2, 0)) @ d)
    # a flat image has the zero descriptor
    assert not space.describe(Image.new("RGB", (20, 10), (90, 10, 200))).any()
    with pytest.raises(ValueError, match="side"):
        PixelSpace(side=1)
    with pytest.raises(ValueError, match="max_shift"):
        PixelSpace(max_shift=-1)


def test_relative_threshold_formula_and_threshold_validation():
    base = np.array([0.1, 0.2, 0.6, 0.8])
    assert relative_threshold(base, 1.0, 0.5) == pytest.approx(1 - 0.25 * 0.2)
    assert relative_threshold(base, 0.5, 1.0) == pytest.approx(float(np.quantile(base, 0.5)))
    assert relative_threshold(np.zeros(0), 0.99, 0.5) is None
    with pytest.raises(ValueError, match="pixel"):
        NearCopyThresholds(pixel=1.5)
    with pytest.raises(ValueError, match="relative_alpha"):
        NearCopyThresholds(relative_alpha=0.0)
    with pytest.raises(ValueError, match="baseline_quantile"):
        NearCopyThresholds(baseline_quantile=2)


# ------------------------------------------------------------------------------------------ (1) + (6)
def test_copies_are_flagged_with_the_right_source_and_nothing_is_damaged(real, tmp_path):
    root, records, images = real
    syn = tmp_path / "syn"
    sources = copies_set(syn, images)
    before = file_state(syn)
    result = audit_synthetic_set(syn, records)

    # (1) every copy is flagged, with its source as nearest real image
    assert [a.near_copy for a in result.images] == [True] * len(sources)
    assert [a.nn_real_pixel for a in result.images] == [src for _, src in sources]
    for a, (kind, _) in zip(result.images, sources, strict=True):
        if kind in ("exact", "mirror"):
            assert a.sim_pixel > 0.999 and "pixel" in a.reasons
        assert a.mirrored_pixel == (kind == "mirror")
    # the indexed search agrees with a brute-force comparison against every real image
    space = PixelSpace()
    for a, rec in list(zip(result.images, read_manifest(syn / "manifest.jsonl"), strict=True))[:8]:
        sim, _ = brute_force_pixel(space, Image.open(rec.path), images)
        assert a.sim_pixel == pytest.approx(sim, abs=1e-4)
    # the same-identity baseline matches brute force, and the relative bar is computed from it
    expected = sorted(
        max(space.similarity(images[(i, k)], images[(i, j)]) for j in range(PER_ID) if j != k)
        for i in range(NUM_IDS)
        for k in range(PER_ID)
    )
    np.testing.assert_allclose(np.sort(result.baseline["pixel"]["same_identity"]), expected, atol=1e-4)
    expected_any = sorted(
        max(space.similarity(images[a], images[b]) for b in images if b != a) for a in images
    )
    np.testing.assert_allclose(np.sort(result.baseline["pixel"]["any_identity"]), expected_any, atol=1e-4)
    assert result.thresholds["pixel_relative"] == pytest.approx(1 - 0.25 * (1 - np.quantile(expected, 0.99)))

    # (6) images untouched; manifest rows gain the fields and keep theirs; card keeps its fields
    assert file_state(syn) == before
    rows = [json.loads(line) for line in (syn / "manifest.jsonl").read_text().splitlines()]
    for row, a in zip(rows, result.images, strict=True):
        assert set(AUDIT_FIELDS) <= set(row) and row["near_copy"] is True
        assert row["nn_real_pixel"] == a.nn_real_pixel and row["sim_pixel"] == pytest.approx(a.sim_pixel)
        assert row["nn_real_feature"] is None and row["sim_feature"] is None  # no extractor given
        assert "seed" in row and "sem" in row and row["source"] == "synthetic"
    card = json.loads((syn / "card.json").read_text())
    assert card["generator"] == "tiny-dit" and card["num_images"] == len(sources)
    audit = card["audit"]
    assert audit["num_flagged"] == audit["num_images"] == len(sources) and audit["fraction_flagged"] == 1.0
    assert (
        audit["per_identity"]["id0"]["count"] == PER_ID
        and audit["per_identity"]["id0"]["fraction_flagged"] == 1
    )
    assert audit["baseline"]["pixel"]["same_identity"]["count"] == NUM_IDS * PER_ID
    with Image.open(syn / audit["grid"]) as grid:
        assert grid.size[0] > 4 * 64 and grid.size[1] >= 64


# ------------------------------------------------------------------------------------------ (2)
def test_genuinely_new_images_are_not_flagged(real, tmp_path):
    root, records, images = real
    syn = tmp_path / "fresh"
    fresh_set(syn)
    result = audit_synthetic_set(syn, records, grid_path=None)
    assert not result.flagged
    assert result.summary["num_flagged"] == 0
    bar = min(result.thresholds["pixel"], result.thresholds["pixel_relative"])
    assert max(a.sim_pixel for a in result.images) < bar
    assert not (syn / "audit_pairs.png").exists()
    rows = read_manifest(syn / "manifest.jsonl")
    assert all(r.extra["near_copy"] is False for r in rows)


# ------------------------------------------------------------------------------------------ (3)
def test_thresholds_behave_monotonically(real, tmp_path):
    root, records, images = real
    syn = tmp_path / "mixed"
    copies = [(f"id{i}", make_copy(images[(i, k)], "shift", i + k)) for i in range(NUM_IDS) for k in (0, 1)]
    fresh = [(f"id{i}", draw(i, [3, i, k])) for i in range(NUM_IDS) for k in range(2)]
    write_set(syn, copies + fresh)

    def flagged(**kw) -> tuple[set[str], list[float]]:
        th = NearCopyThresholds(**kw)
        res = audit_synthetic_set(
            syn, records, thresholds=th, update_manifest=False, write_card=False, grid_path=None
        )
        return {a.path for a in res.flagged}, [a.sim_pixel for a in res.images]

    previous = None
    for t in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0):
        got, sims = flagged(pixel=t, relative_alpha=None)
        assert len(got) == sum(s >= t for s in sims)  # exactly the images at or above the bar
        if previous is not None:
            assert got <= previous
        previous = got
    assert len(flagged(pixel=0.3, relative_alpha=None)[0]) > len(flagged(pixel=0.99, relative_alpha=None)[0])
    previous = None
    for alpha in (1.0, 0.8, 0.5, 0.3, 0.1):  # smaller alpha = stricter
        got, _ = flagged(pixel=None, relative_alpha=alpha)
        if previous is not None:
            assert got <= previous
        previous = got
    assert flagged(pixel=None, relative_alpha=None)[0] == set()


# ------------------------------------------------------------------------------------------ (4)
def test_feature_space_results_match_an_independent_computation(real, tmp_path):
    root, records, images = real
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", neck="bnneck", embedding_dim=16).eval()
    export = save_embedding_net(
        net, tmp_path / "export", input_size=(SIZE, SIZE), mean=[0.5] * 3, std=[0.5] * 3
    )
    syn = tmp_path / "syn"
    items = [("id0", make_copy(images[(0, 0)], kind, n)) for n, kind in enumerate(("exact", "mirror"))]
    items += [(f"id{i}", draw(i, [4, i])) for i in range(3)]
    write_set(syn, items)
    result = audit_synthetic_set(syn, records, extractor=export)

    fx = FeatureExtractor.from_export(export)
    keys = sorted(images)

    def batch(imgs) -> torch.Tensor:
        arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1 for img in imgs]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    rows = read_manifest(syn / "manifest.jsonl")
    with torch.no_grad():
        bank = fx(batch([images[k] for k in keys]))
        x = batch([Image.open(r.path) for r in rows])
        sims = torch.maximum(fx(x) @ bank.T, fx(torch.flip(x, dims=[-1])) @ bank.T)  # brute force, mirror too
    best_sim, best = sims.max(dim=1)
    for n, rec in enumerate(rows):
        assert rec.extra["sim_feature"] == pytest.approx(float(best_sim[n]), abs=1e-4)
        assert result.images[n].sim_feature == pytest.approx(float(best_sim[n]), abs=1e-4)
        i, k = keys[int(best[n])]
        assert rec.extra["nn_real_feature"] == os.path.join(f"id{i}", f"{k}.png")
    assert rows[0].extra["sim_feature"] > 0.999 and rows[1].extra["sim_feature"] > 0.999  # exact, mirrored
    assert (
        rows[0].extra["nn_real_feature"] == rows[1].extra["nn_real_feature"] == os.path.join("id0", "0.png")
    )
    card = json.loads((syn / "card.json").read_text())["audit"]
    assert card["synthetic_nn"]["feature"]["count"] == len(items)
    assert card["baseline"]["feature"]["same_identity"]["count"] == NUM_IDS * PER_ID
    assert card["thresholds"]["feature_relative"] is not None and card["thresholds"]["feature"] is None
    assert result.images[0].near_copy and "feature_relative" in result.images[0].reasons


# ------------------------------------------------------------------------------------------ (5)
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_synthetic_file_names_it_and_writes_nothing(real, tmp_path, damage):
    root, records, images = real
    syn = tmp_path / "syn"
    fresh_set(syn, per_id=1)
    victim = sorted((syn / "images").rglob("*.png"))[2]
    if damage == "corrupt":
        victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    else:
        victim.unlink()
    manifest, card = (syn / "manifest.jsonl").read_bytes(), (syn / "card.json").read_bytes()
    with pytest.raises(BadImageError, match=victim.name):
        audit_synthetic_set(syn, records)
    assert (syn / "manifest.jsonl").read_bytes() == manifest
    assert (syn / "card.json").read_bytes() == card
    assert not (syn / "audit_pairs.png").exists()
    assert sorted(p.name for p in syn.iterdir()) == ["card.json", "images", "manifest.jsonl"]


def test_bad_inputs_fail_clearly(real, tmp_path):
    root, records, images = real
    with pytest.raises(FileNotFoundError, match="manifest"):
        audit_synthetic_set(tmp_path / "nowhere", records)
    syn = tmp_path / "syn"
    fresh_set(syn, per_id=1)
    with pytest.raises(ValueError, match="real training records"):
        audit_synthetic_set(syn, [])
    (syn / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match="card.json"):
        audit_synthetic_set(syn, records)
    broken = IdentityRecord(str(tmp_path / "gone.png"), "id0")
    (syn / "card.json").write_text("{}")
    with pytest.raises(BadImageError, match="gone.png"):
        audit_synthetic_set(syn, [broken])


# ------------------------------------------------------------------------------------------ (7)
def test_cli_runs_and_prints_the_summary(real, tmp_path, capsys):
    root, records, images = real
    syn = tmp_path / "syn"
    copies_set(syn, images)
    code = audit_main(["--synthetic", str(syn), "--real", str(root), "--format", "identity_folders"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"near copies: {NUM_IDS * PER_ID} (100.00%)" in out
    assert "card.json" in out and "audit_pairs.png" in out and "worst identities" in out
    assert json.loads((syn / "card.json").read_text())["audit"]["num_flagged"] == NUM_IDS * PER_ID
    # a bad argument: exit code 1 and a message, nothing raised
    assert (
        audit_main(["--synthetic", str(tmp_path / "none"), "--real", str(root), "--format", "toy_faces"]) == 1
    )
    assert "manifest not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        audit_main(["--help"])
    assert exc.value.code == 0 and "--synthetic" in capsys.readouterr().out


def test_cli_reads_the_market_training_split_and_drops(tmp_path, capsys):
    root = make_toy_market(
        tmp_path / "market",
        num_train_ids=3,
        num_test_ids=2,
        images_per_id=4,
        num_distractors=0,
        height=32,
        width=16,
    )
    train = sorted((root / "bounding_box_train").glob("*.png"))
    test = sorted((root / "bounding_box_test").glob("*.png"))
    syn = tmp_path / "syn"
    # a copy of a training image is flagged; a copy of a TEST image is not (the audit uses the train split)
    write_set(
        syn, [("0001", Image.open(train[0]).convert("RGB")), ("0001", Image.open(test[0]).convert("RGB"))]
    )
    argv = [
        "--synthetic",
        str(syn),
        "--real",
        str(root),
        "--format",
        "toy_market",
        "--drop",
        "--move-rejected",
    ]
    assert audit_main(argv) == 0
    assert "dropped 1 flagged images" in capsys.readouterr().out
    rows = read_manifest(syn / "manifest.jsonl")
    assert [r.extra["seed"] for r in rows] == [1]
    assert (syn / "rejected" / "images" / "0001" / f"{0:010d}.png").is_file()


# ------------------------------------------------------------------------------------------ (8)
def test_drop_flagged_removes_exactly_the_flagged_rows(real, tmp_path):
    root, records, images = real
    syn = tmp_path / "mixed"
    copies = [(f"id{i}", make_copy(images[(i, 1)], "noise", i)) for i in range(0, NUM_IDS, 2)]
    fresh = [(f"id{i}", draw(i, [5, i])) for i in range(NUM_IDS)]
    items = fresh[:2] + copies + fresh[2:]
    write_set(syn, items)
    result = audit_synthetic_set(syn, records)
    flagged = {a.path for a in result.flagged}
    assert len(flagged) == len(copies)
    before = [r for r in read_manifest(syn / "manifest.jsonl")]
    kept_files = file_state(syn)

    dropped = drop_flagged(syn, result)
    assert set(dropped) == flagged
    after = read_manifest(syn / "manifest.jsonl")
    expected = [r for r in before if os.path.relpath(r.path, syn) not in flagged]
    assert after == expected and [r.extra for r in after] == [r.extra for r in expected]
    assert file_state(syn) == kept_files  # without move_files the images stay where they are
    card = json.loads((syn / "card.json").read_text())
    assert card["num_images"] == len(fresh) and card["audit"]["dropped"]["count"] == len(copies)
    assert card["generator"] == "tiny-dit"
    assert drop_flagged(syn, result) == []  # idempotent
    with pytest.raises(ValueError, match="audit result is for"):
        drop_flagged(tmp_path, result)
