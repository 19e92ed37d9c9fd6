"""The real-data utility study (benchmarks/utility*.py) on tiny toy data, plus its metrics by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from benchmarks.utility_config import ABLATION, ROWS, load_config
from benchmarks.utility_reid import ReIDEvaluator, source_metrics
from benchmarks.utility_report import fmt_pct, mean_std, results_table
from rgsd_lightning.data.records import IdentityRecord
from rgsd_lightning.evaluation.quality import fid_kid, identity_fidelity, intra_identity_distance, prototypes


# ---------------------------------------------------------------------------------- quality maths
def test_fidelity_and_diversity_match_hand_computed_values():
    real = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    protos, names = prototypes(real, ["a", "a", "b", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(protos[0], np.array([0.9, 0.3]) / math.hypot(0.9, 0.3))
    np.testing.assert_allclose(protos[1], np.array([-0.3, 0.9]) / math.hypot(0.3, 0.9))
    # [1, .1] -> a (right); [.7, .7] -> a although labelled b (wrong); [-1, .2] -> b (right)
    samples = np.array([[1.0, 0.1], [0.7, 0.7], [-1.0, 0.2]])
    assert identity_fidelity(samples, ["a", "b", "b"], protos, names) == pytest.approx(2 / 3)
    assert identity_fidelity(samples, ["b", "b", "a"], protos, names) == pytest.approx(0.0)

    # a, b: one pair each at distance sqrt(0.4); c: a 3-4-5 triangle (mean 4); d: one image (ignored)
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8], [0, 0], [3, 4], [0, 4], [9, 9]])
    labels = ["a", "a", "b", "b", "c", "c", "c", "d"]
    expected = (math.sqrt(0.4) * 2 + 4.0) / 3
    assert intra_identity_distance(feats, labels) == pytest.approx(expected)
    assert intra_identity_distance(feats[:1], ["a"]) is None
    with pytest.raises(ValueError, match="2 features but 1 labels"):
        identity_fidelity(samples[:2], ["a"], protos, names)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def test_fid_and_kid_match_closed_forms_with_the_extractor_as_feature_space():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = rng.normal(loc=0.5, scale=1.5, size=(40, 3))
    weight = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.2, 0.0, 2.0]], dtype=torch.float64)

    class Linear(nn.Module):  # "images" (N, 3, 1, 1) -> features x W^T: a known feature extractor
        def forward(self, images):
            return images.flatten(1).double() @ weight.T

    fx, fy = x @ weight.numpy().T, y @ weight.numpy().T
    as_images = lambda a: torch.tensor(a).view(-1, 3, 1, 1)  # noqa: E731
    out = fid_kid(Linear(), 3, as_images(x), as_images(y), kid_subset_size=1000)

    s1, s2 = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    # Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1)) (a symmetric PSD product)
    r1 = _sqrtm_psd(s1)
    fid = ((fx.mean(0) - fy.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(_sqrtm_psd(r1 @ s2 @ r1))
    assert out["fid"] == pytest.approx(fid, rel=1e-4)

    def k(a, b):
        return (a @ b.T / 3 + 1) ** 3

    m = len(fx)  # subset size = every sample: all KID subsets are the same set, so std is 0
    kxx, kyy, kxy = k(fx, fx), k(fy, fy), k(fx, fy)
    mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert out["kid_subset_size"] == 40
    assert out["kid"] == pytest.approx(mmd, rel=1e-4)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-6 * abs(mmd))
    same = fid_kid(Linear(), 3, as_images(x), as_images(x), kid_subset_size=1000)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=">= 2 real and >= 2 synthetic"):
        fid_kid(Linear(), 3, as_images(x[:1]), as_images(y))


# ---------------------------------------------------------------------------------- tables
def test_mean_std_and_table_cells():
    stat = mean_std([0.9, 0.95, 1.0])
    assert stat["mean"] == pytest.approx(0.95) and stat["std"] == pytest.approx(0.05) and stat["n"] == 3
    assert fmt_pct(stat) == "95.0 ± 5.0"
    assert fmt_pct(mean_std([0.5])) == "50.0" and fmt_pct(mean_std([])) == "n/a"
    rows = {"real": {"group": "Base", "method": "real only", "stats": {"identification": stat}}}
    table = results_table(rows, [("identification", "Id"), ("verification", "Verif")])
    assert "| Base | real only | 95.0 ± 5.0 | n/a |" in table


# ---------------------------------------------------------------------------------- ReID per source
def _rec(pid: int, cam: int, split: str, path: str = "x.png") -> IdentityRecord:
    return IdentityRecord(path, f"{pid:04d}", cam, "real", split)


def test_source_metrics_hand_case():
    # source X = cameras 1,2 (0-based 0,1): the true match is nearest -> AP 1, rank-1 hit
    # source Y = cameras 3,4 (0-based 2,3): an impostor is nearer -> AP 1/2, rank-1 miss
    query = [_rec(1, 0, "query"), _rec(3, 2, "query")]
    gallery = [_rec(1, 1, "gallery"), _rec(2, 1, "gallery"), _rec(3, 3, "gallery"), _rec(4, 3, "gallery")]
    qf = np.array([[0.0, 0.0], [10.0, 10.0]])
    gf = np.array([[0.1, 0.0], [1.0, 0.0], [10.0, 11.0], [10.0, 10.5]])
    out = source_metrics(qf, gf, query, gallery, {"X": [1, 2], "Y": [3, 4], "W": [1, 4]})
    assert out["X/mAP"] == pytest.approx(1.0) and out["X/rank1"] == 1.0
    assert out["Y/mAP"] == pytest.approx(0.5) and out["Y/rank1"] == 0.0
    assert out["mAP"] == pytest.approx(0.75) and out["rank1"] == pytest.approx(0.5)
    assert "W/mAP" not in out  # cameras 1 + 4: query 0001 has no match there, nothing to rank
    with pytest.raises(ValueError, match="source 'Z': no query or gallery image from cameras"):
        source_metrics(qf, gf, query, gallery, {"Z": [5, 6]})


def test_reid_evaluator_equals_the_datamodule_path(toy_market, tmp_path):
    from rgsd_lightning import IdentityDataModule
    from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net
    from rgsd_lightning.evaluation import reid_evaluate

    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_dim=8).eval()
    dm = IdentityDataModule(root=toy_market, format="market1501", task="reid", height=32, width=16)
    save_embedding_net(net, tmp_path / "export", **dm.recognizer_preprocessing() | {"input_size": [32, 16]})
    evaluator = ReIDEvaluator(toy_market, {"all": [1, 2, 3]})
    got = evaluator(tmp_path / "export")
    transform = dm.recognizer_transform(train=False)
    from rgsd_lightning.data.images import load_image

    q, g = dm.split_records("query"), dm.split_records("gallery")
    with torch.no_grad():
        feats = net(torch.stack([transform(load_image(r.path)) for r in q + g])).numpy()
    ref = reid_evaluate(
        feats[: len(q)],
        feats[len(q) :],
        [int(r.identity) for r in q],
        [int(r.identity) for r in g],
        [r.camera for r in q],
        [r.camera for r in g],
    )
    assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-6) and got["rank1"] == pytest.approx(ref["rank1"])
    assert got["all/mAP"] == pytest.approx(ref["mAP"], abs=1e-6)  # every camera: the same ranking


# ---------------------------------------------------------------------------------- config
def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_overrides_and_errors(tmp_path):
    base = {
        "name": "s",
        "prior": {"path": "p", "format": "identity_folders"},
        "target": {"path": "t"},
        "shots": [3],
        "quick": {"shots": [1], "recognizer.steps": 7},
    }
    cfg = load_config(_write(tmp_path / "a.yaml", base))
    assert cfg.shots == [3] and cfg.recognizer.steps == 500 and cfg.rows == list(ROWS)
    cfg = load_config(tmp_path / "a.yaml", quick=True, overrides=["rl.rollouts=3", "target.path=/d/orl"])
    assert cfg.shots == [1] and cfg.recognizer.steps == 7 and cfg.rl.rollouts == 3
    assert cfg.target.path == "/d/orl" and str(cfg.resolved_work_dir(True)).endswith("s_quick")
    assert cfg.generator_sets() == ["cold", "rl_semantic", "rl_coverage", "rl_full"]
    with pytest.raises(ValueError, match=r"recognizer: unknown keys \['stepz'\]"):
        load_config(_write(tmp_path / "b.yaml", base | {"recognizer": {"stepz": 1}}))
    with pytest.raises(ValueError, match="rows: unknown"):
        load_config(_write(tmp_path / "c.yaml", base | {"rows": ["real", "magic"]}))
    with pytest.raises(ValueError, match="must include 'real'"):
        load_config(_write(tmp_path / "d.yaml", base | {"rows": ["erasing"]}))
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(tmp_path / "a.yaml", overrides=["oops"])
    with pytest.raises(FileNotFoundError, match="study config not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
    for name in ("utility_faces.yaml", "utility_reid.yaml"):
        for quick in (False, True):
            cfg = load_config(root / name, quick=quick)
            assert len(cfg.seeds) >= (1 if quick else 3) and set(cfg.rows) == set(ROWS)


# ---------------------------------------------------------------------------------- the whole study
def _tiny_study(tmp_path: Path) -> Path:
    from rgsd_lightning.data.toy import make_toy_faces

    prior = make_toy_faces(tmp_path / "prior", num_ids=6, images_per_id=6, size=32, seed=1)
    target = make_toy_faces(tmp_path / "target", num_ids=5, images_per_id=6, size=32, seed=2)
    external = tmp_path / "external"  # an "external synthetic set": prior images under target names
    names = sorted(p.name for p in Path(target).iterdir() if p.is_dir())
    prior_ids = sorted(p for p in Path(prior).iterdir() if p.is_dir())
    for i in range(3):
        (external / f"ext{i}").mkdir(parents=True)
        for src in sorted(prior_ids[i].glob("*.png"))[:3]:
            (external / f"ext{i}" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "map.txt").write_text("".join(f"ext{i} {n}\n" for i, n in enumerate(names[:3])))
    config = {
        "name": "tiny",
        "task": "face",
        "prior": {"path": str(prior), "format": "identity_folders", "exclude": ["6.png"]},
        "target": {"path": str(target), "format": "identity_folders"},
        "shots": [2],
        "seeds": [0],
        "external": [{"name": "toyext", "folder": str(external), "identity_map": str(tmp_path / "map.txt")}],
        "image_size": 8,
        "channels": 1,
        "num_pairs": 40,
        "kid_subset_size": 10,
        "prior_stage": {"preset": "tiny", "steps": 6, "batch_size": 8},
        "cold": {"steps": 4, "batch_size": 8},
        "rl": {
            "rollouts": 1,
            "identities": 2,
            "samples_per_identity": 2,
            "sample_steps": 2,
            "micro_batch": 4,
            "grad_accum": 1,
            "policy_steps": 1,
        },
        "generate": {"per_identity": 2, "sample_steps": 2, "batch_size": 16},
        "recognizer": {
            "steps": 2,
            "batches_per_epoch": 1,
            "p": 4,
            "k": 4,
            "input_size": [16, 16],
            "embedding_dim": 8,
            "judge_steps": 2,
        },
    }
    return _write(tmp_path / "tiny.yaml", config)


@pytest.mark.slow
def test_tiny_study_has_every_row_and_metric_and_resumes(tmp_path):
    from benchmarks.utility import main

    cfg = _tiny_study(tmp_path)
    args = ["--config", str(cfg), "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")]
    assert main(args) == 0
    report = json.loads((tmp_path / "results" / "tiny.json").read_text())
    setting = report["settings"]["k2"]
    assert list(setting["rows"]) == [*ROWS, "ext_toyext"]
    for key, row in setting["rows"].items():
        for metric in ("identification", "verification"):
            stat = row["stats"][metric]
            assert stat["n"] == 1 and 0.0 <= stat["mean"] <= 1.0, (key, metric)
    assert set(setting["sets"]) == {"cold", "rl_semantic", "rl_coverage", "rl_full", "ext_toyext"}
    for name, quality in setting["sets"].items():
        assert 0.0 <= quality["fidelity"] <= 1.0 and quality["fid"] >= -1e-6 and "kid" in quality, name
        assert quality["audit"]["num_images"] == quality["num_images"], name
    assert set(setting["sets"]["rl_full"]["rewards"]) >= {"sem", "cov", "exp"}
    assert setting["sets"]["ext_toyext"]["num_images"] == 9
    markdown = (tmp_path / "results" / "tiny.md").read_text()
    for spec in ROWS.values():
        assert spec.method in markdown
    for title, _ in ABLATION:
        assert title in markdown
    assert "+ toyext synthetic" in markdown and "Generator quality" in markdown
    assert all(s["status"] == "ran" for s in report["stages"])
    lines = (tmp_path / "work" / "prior_data" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 5  # 6.png of every prior identity excluded

    assert main(args) == 0  # a rerun skips every finished stage and reports the same numbers
    again = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert all(s["status"] == "reused" for s in again["stages"])
    assert [s["wall_s"] for s in again["stages"]] == [s["wall_s"] for s in report["stages"]]
    assert again["settings"] == report["settings"]
