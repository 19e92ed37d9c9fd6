"""``python -m benchmarks cold_trajectory``: the coverage gain split into gained and taken (by hand and
against nn_accuracy), the training-only fidelity filter, and a tiny cold-start stage rerun and measured end
to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmarks.cold_trajectory import distance_ratio, fidelity_mask, main, run_cold_start
from rgsd_lightning.evaluation.quality import coverage_gain, nn_accuracy


def test_coverage_gain_splits_into_gained_and_taken():
    """Test images at 4, 6, 9 (a, a, b); training images a=0, b=10. A sample 'a' at 6.5 wins the test image
    at 6 (gained), a sample 'b' at 4.2 takes the one at 4 (taken); no sample changes nothing; on random data
    before / after are nn_accuracy's and the split sums to the gain."""
    train, test = np.array([[0.0], [10.0]]), np.array([[4.0], [6.0], [9.0]])
    got = coverage_gain(train, ["a", "b"], np.array([[6.5], [4.2]]), ["a", "b"], test, ["a", "a", "b"])
    assert got == pytest.approx(
        {"before": 2 / 3, "after": 2 / 3, "gain": 0.0, "gained": 1 / 3, "taken": 1 / 3}
    )
    none = coverage_gain(train, ["a", "b"], np.zeros((0, 1)), [], test, ["a", "a", "b"])
    assert none == pytest.approx({"before": 2 / 3, "after": 2 / 3, "gain": 0.0, "gained": 0.0, "taken": 0.0})
    with pytest.raises(ValueError, match="differ in length"):
        coverage_gain(train, ["a"], np.zeros((0, 1)), [], test, ["a", "a", "b"])

    rng = np.random.default_rng(0)
    for _ in range(5):
        tr, ex, te = rng.normal(size=(6, 4)), rng.normal(size=(9, 4)), rng.normal(size=(20, 4))
        tr_l, ex_l, te_l = list("abcabc"), list(rng.choice(list("abc"), 9)), list(rng.choice(list("abc"), 20))
        got = coverage_gain(tr, tr_l, ex, ex_l, te, te_l)
        assert got["before"] == pytest.approx(nn_accuracy(tr, tr_l, te, te_l))
        assert got["after"] == pytest.approx(nn_accuracy(np.concatenate([tr, ex]), tr_l + ex_l, te, te_l))
        assert got["gained"] - got["taken"] == pytest.approx(got["gain"])


def test_distance_ratio_compares_samples_with_new_real_images_by_hand():
    """Training a at (0, 0), b at (10, 0). Test images 1 and 2 from their own training image (median 1.5);
    samples 3 from theirs (median 3, measured to their own identity even where another is nearer): 2x."""
    train = np.array([[0.0, 0.0], [10.0, 0.0]])
    test = np.array([[1.0, 0.0], [10.0, 2.0]])
    samples = np.array([[0.0, 3.0], [7.0, 0.0]])  # the second is nearer a's image, labelled b
    ratio = distance_ratio(train, ["a", "b"], samples, ["a", "b"], test, ["a", "b"])
    assert ratio == pytest.approx(2.0)
    assert distance_ratio(train, ["a", "b"], test, ["a", "b"], test, ["a", "b"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'c' has no training image"):
        distance_ratio(train, ["a", "b"], samples, ["a", "c"], test, ["a", "b"])


def test_fidelity_mask_keeps_samples_nearest_their_own_training_image():
    train = np.array([[0.0, 0.0], [10.0, 0.0]])
    samples = np.array([[1.0, 0.0], [9.0, 0.0], [6.0, 0.0]])
    np.testing.assert_array_equal(
        fidelity_mask(train, ["a", "b"], samples, ["a", "a", "a"]), [True, False, False]
    )


def _target(root: Path, rng) -> None:
    """3 identities x 3 random 16x16 grey PNGs named 1.png, 2.png, 3.png."""
    from PIL import Image

    for name in ("p1", "p2", "p3"):
        (root / name).mkdir(parents=True)
        for i in (1, 2, 3):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / name / f"{i}.png")


def _stage(folder: Path, target: Path, **model) -> Path:
    """A cold-start stage folder: its config.yaml (a tiny 16x16 grey DiT on the target's first image of each
    identity, 6 steps at a constant rate), as the pipeline saves it."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(folder),
        },
        "model": {
            "class_path": "rgsd_lightning.modules.cold_start.ColdStartDiT",
            "init_args": {
                "preset": "tiny",
                "image_size": 16,
                "channels": 1,
                "trainable": "all",
                "lr": 3e-3,
                "grid": {"identities": 0},
                **model,
            },
        },
        "data": {
            "class_path": "rgsd_lightning.data.datamodule.IdentityDataModule",
            "init_args": {
                "root": str(target),
                "format": "identity_folders",
                "task": "generator",
                "train_per_identity": 1,
                "image_size": 16,
                "channels": 1,
                "batch_size": 3,
            },
        },
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_cold_start_rerun_exports_along_the_way_and_is_measured(tmp_path, monkeypatch):
    """The rerun exports the generator at each asked step (step 0: before any update, so it differs from the
    last one), the report has a row per (step, guidance) whose split sums to its gain, a run stopped while
    measuring keeps the steps it measured, and a stage with a learning-rate schedule or steps beyond its own
    are refused."""
    from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net
    from rgsd_lightning.diffusion.generator import DiTGenerator

    _target(tmp_path / "target", np.random.default_rng(0))
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", in_chans=1).eval()
    save_embedding_net(net, tmp_path / "rec", input_size=[16, 16], mean=[0.5], std=[0.5])
    stage = _stage(tmp_path / "stage", tmp_path / "target")

    exports = run_cold_start(stage, [0, 3, 6], tmp_path / "work")
    assert list(exports) == [0, 3, 6]
    first, last = (DiTGenerator.from_pretrained(exports[s]) for s in (0, 6))
    assert first.identities == last.identities == ["p1", "p2", "p3"]
    moved = [
        not torch.equal(a, b)
        for a, b in zip(first.transformer.parameters(), last.transformer.parameters(), strict=True)
    ]
    assert any(moved)

    argv = ["--stage", str(stage), "--steps", "0,6", "--work", str(tmp_path / "work2")]
    argv += ["--target", str(tmp_path / "target"), "--train-per-identity", "1"]
    argv += [
        "--extractor",
        str(tmp_path / "rec"),
        "--guidance",
        "1,2",
        "--per-identity",
        "2",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(tmp_path / "out"), "--name", "traj"]) == 0
    rows = json.loads((tmp_path / "out" / "traj.json").read_text())["results"]
    assert [(r["step"], r["guidance"]) for r in rows] == [(0, 1.0), (0, 2.0), (6, 1.0), (6, 2.0)]
    for r in rows:
        assert r["images"] == 6 and r["queries"] == 6 and 0.0 <= r["fidelity"] <= 1.0
        for space in ("recognizer", "pixels", "filtered"):
            assert r[space]["before"] == pytest.approx(rows[0][space]["before"])  # same gallery and queries
            assert r[space]["gained"] - r[space]["taken"] == pytest.approx(r[space]["gain"])
    assert "| 6 | 2 | 6 |" in (tmp_path / "out" / "traj.md").read_text()
    assert "![gain, gained" in (tmp_path / "out" / "traj.md").read_text()
    assert (tmp_path / "out" / "traj.png").stat().st_size > 0

    # --exclude leaves target images out by file name: image 3 of each identity is no longer a query
    assert main([*argv, "--exclude", "3.png", "--out", str(tmp_path / "ex"), "--name", "traj"]) == 0
    excluded = json.loads((tmp_path / "ex" / "traj.json").read_text())["results"]
    assert {r["queries"] for r in excluded} == {3}
    assert "(without 3.png)" in (tmp_path / "ex" / "traj.md").read_text()

    import benchmarks.cold_trajectory as module

    measured = module.measure_exports

    def stop_at_six(exports, *args):
        if 6 in exports:
            raise KeyboardInterrupt  # the device script's timeout, say
        return measured(exports, *args)

    monkeypatch.setattr(module, "measure_exports", stop_at_six)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "cut"), "--name", "traj"])
    kept = json.loads((tmp_path / "cut" / "traj.json").read_text())["results"]
    assert [(r["step"], r["guidance"]) for r in kept] == [(0, 1.0), (0, 2.0)]
    monkeypatch.undo()

    scheduled = _stage(tmp_path / "scheduled", tmp_path / "target", warmup_steps=2)
    with pytest.raises(ValueError, match="learning-rate schedule"):
        run_cold_start(scheduled, [0, 3], tmp_path / "work3")
    with pytest.raises(ValueError, match="beyond the stage's max_steps 6"):
        run_cold_start(stage, [0, 7], tmp_path / "work4")
    with pytest.raises(ValueError, match="must be >= 0"):
        run_cold_start(stage, [-1, 3], tmp_path / "work4")
    by_epochs = _stage(tmp_path / "by_epochs", tmp_path / "target")
    config = yaml.safe_load((by_epochs / "config.yaml").read_text())
    config["trainer"]["max_steps"] = -1
    (by_epochs / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="max_steps is -1; give a stage bounded by optimiser steps"):
        run_cold_start(by_epochs, [0, 3], tmp_path / "work5")
