"""The real-data utility study (benchmarks/configs/utility_*.yaml) in miniature: a tiny overlay of the faces
study on procedural faces runs every stage through `python -m benchmarks utility`, and reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rgsd_lightning.pipeline import load_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def _tiny_study(tmp_path: Path) -> Path:
    from rgsd_lightning.data.toy import make_toy_faces

    prior = make_toy_faces(tmp_path / "prior", num_ids=6, images_per_id=6, size=32, seed=1)
    target = make_toy_faces(tmp_path / "target", num_ids=5, images_per_id=6, size=32, seed=2)
    overlay = {
        "extends": str(CONFIGS / "utility_faces.yaml"),
        "output": str(tmp_path / "work"),
        "vars": {
            "preset": "tiny",
            "image_size": 8,
            "rec_batches": 1,
            "rec_p": 4,
            "rl_identities": 2,
            "prior_data": {"root": str(prior), "exclude": ["6.png"]},
            "target": {"root": str(target)},
            # the copy-free chain of its own, as the faces study's 1-shot setting
            "settings": [
                {
                    "shot": 2,
                    "label": "k2",
                    "private_chain": True,
                    "private_generator": "rl_private",
                    "private_per_identity": 3,
                }
            ],
            "seeds": [0],
            "num_pairs": 40,
            "prior_steps": 6,
            "prior_warmup": 2,
            "cold_steps": 4,
            "rl_rollouts": 1,
            "rl_sample_steps": 2,
            "rl_windowed_rounds": 2,
            "rl_fast_steps": 3,
            "per_identity": 2,
            "gen_sample_steps": 2,
            "rec_epochs": 2,
            "rec_warmup": 1,
            "rec_milestones": [1],
            "judge_shots": 4,  # 2 held-out images per identity: the spread reference
            "judge_epochs": 2,
            "judge_warmup": 1,
            "judge_milestones": [1],
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


@pytest.mark.slow
def test_tiny_study_has_every_row_and_metric_and_resumes(tmp_path):
    from benchmarks.utility import main

    cfg = _tiny_study(tmp_path)
    args = ["--config", str(cfg), "--out", str(tmp_path / "results")]
    assert main(args) == 0
    report = json.loads((tmp_path / "results" / "tiny.json").read_text())
    tables = [s for s in report["sections"] if "rows" in s]
    results, ablation, variants = tables[0], tables[1], tables[2]
    assert [r["stage"] for r in results["rows"]] == [
        "k2_real",
        "k2_erasing",
        "k2_cold",
        "k2_rl",
        "k2_rl_selection",
        "k2_erasing_rl_selection",
        "k2_rl_selection_identity",
        "k2_erasing_rl_selection_identity",
        "k2_rl_filtered_selection",
        "k2_erasing_rl_filtered_selection",
        "k2_rl_windowed_selection",
        "k2_erasing_rl_windowed_selection",
        "k2_private_selection",
        "k2_erasing_private_selection",
    ]
    control = next(t for t in tables if "control" in t["title"])
    assert [r["stage"] for r in control["rows"]] == [
        "k2_real",
        "k2_real_control",
        "k2_real_control_selection",
        "k2_rl",
        "k2_rl_selection",
    ]
    assert len(ablation["rows"]) == 5
    assert [r["stage"] for r in variants["rows"]] == [
        "k2_rl",
        "k2_rl_selection",
        "k2_rl_selection_paper",
        "k2_rl_selection_negative",
        "k2_rl_selection_identity",
        "k2_rl_selection_none",
        "k2_rl_selection_added",
        "k2_erasing_rl_selection_added",
        "k2_rl_selection_share",
    ]
    configs = {
        row: yaml.safe_load((tmp_path / "work" / f"k2_{row}_s0" / "config.yaml").read_text())
        for row in (
            "rl_selection",
            "rl_selection_paper",
            "rl_selection_negative",
            "rl_selection_identity",
            "erasing_rl_selection_identity",
            "rl_selection_none",
            "rl_selection_added",
            "rl_selection_share",
            "erasing_rl_filtered_selection",
        )
    }
    chosen = {row: c["model"]["init_args"]["selection"] for row, c in configs.items()}
    assert chosen["rl_selection"]["step_on"] == "real" and chosen["rl_selection_paper"]["step_on"] == "batch"
    assert chosen["rl_selection_negative"]["rule"] == "negative"
    assert chosen["rl_selection"]["rule"] == "smallest"
    for row in ("rl_selection_identity", "erasing_rl_selection_identity"):
        assert chosen[row]["rule"] == "identity"
    assert chosen["rl_selection_none"]["keep_ratio"] == 0.0 and chosen["rl_selection"]["keep_ratio"] == 0.5
    slots = {row: c["data"]["init_args"]["synthetic_slots"] for row, c in configs.items()}
    assert slots["rl_selection_added"] == "add" and slots["rl_selection"] == "replace"
    shares = {row: c["data"]["init_args"]["synthetic_fraction"] for row, c in configs.items()}
    assert shares["rl_selection_share"] == 0.5 and shares["rl_selection"] == 0.25
    keeps = {row: c["data"]["init_args"]["synthetic_keep"] for row, c in configs.items()}
    assert keeps["erasing_rl_filtered_selection"] == 0.5 and keeps["rl_selection"] == 1.0
    erasing = yaml.safe_load((tmp_path / "work" / "k2_erasing_rl_selection_s0" / "config.yaml").read_text())
    assert erasing["data"]["init_args"]["random_erasing"] == 0.5
    for row in results["rows"] + ablation["rows"] + variants["rows"]:
        for metric in ("test/id_acc", "test/heldout/accuracy"):
            assert len(row["runs"]) == 1 and 0.0 <= row["mean"][metric] <= 1.0, (row["stage"], metric)
    work = tmp_path / "work"
    private_cold = yaml.safe_load((work / "k2_cold_start_private" / "config.yaml").read_text())
    assert private_cold["model"]["init_args"]["trainable"] == "adaln"
    assert private_cold["model"]["init_args"]["lr"] == 1e-3
    private_rl = yaml.safe_load((work / "k2_rl_private" / "config.yaml").read_text())
    assert private_rl["model"]["init_args"]["generator"].startswith(str(work / "k2_cold_start_private"))
    private_rows = yaml.safe_load((work / "k2_erasing_private_selection_s0" / "config.yaml").read_text())
    assert private_rows["data"]["init_args"]["synthetic"] == [str(work / "k2_gen_private" / "synthetic")]
    quality = next(s for s in report["sections"] if "judge" in s)
    filtered, private = "rl_full, reward-filtered", "copy-free"
    assert set(quality["sets"]) == {
        "cold",
        "rl_semantic",
        "rl_coverage",
        "rl_full",
        "rl_windowed",
        filtered,
        private,
    }
    windowed = yaml.safe_load((work / "k2_rl_windowed" / "config.yaml").read_text())["model"]["init_args"]
    assert windowed["mode"] == "windowed" and windowed["sampler"]["steps"] == 3
    assert windowed["window"]["size"] == 2 and windowed["reward"]["lambdas"] == [1.0, 0.75, 0.25]
    assert windowed["generator"].startswith(str(work / "k2_cold_start"))
    for name, q in quality["sets"].items():
        assert 0.0 <= q["fidelity"] <= 1.0 and q["fid"] >= -1e-6 and "kid" in q, name
        assert q["audit"]["num_images"] == q["num_images"], name
        if name == private:  # 5 identities x 3, the audit's near copies dropped
            assert q["num_images"] + q["audit"]["num_dropped"] == 15
            assert q["audit"]["fraction_flagged"] == 0.0
        else:  # 5 identities x 2 (the filtered row: the better one of each)
            assert q["num_images"] == (5 if name == filtered else 10), name
    assert quality["sets"][filtered]["rewards"]["sem"] >= quality["sets"]["rl_full"]["rewards"]["sem"]
    assert set(quality["sets"]["rl_full"]["rewards"]) >= {"sem", "cov", "exp"}
    covered = next(s for s in report["sections"] if "extractor" in s)  # seed 0's real-only recognizer
    assert covered["extractor"] == "k2_real_s0"
    assert set(covered["sets"]) == {"cold", "rl_full", "rl_windowed", private}
    befores = {c["before"] for c in covered["sets"].values()}
    assert len(befores) == 1  # one gallery of real images and one query set for every set
    for name, c in covered["sets"].items():
        assert 0.0 <= c["after"] <= 1.0 and c["gain"] == pytest.approx(c["after"] - c["before"]), name
        assert c["num_images"] == quality["sets"][name]["num_images"], name
    judge = quality["judge"]  # trained on 4 of 6 images per identity: the other 10 are the reference
    assert judge["reference"] == "heldout" and judge["num_heldout"] == 10
    assert judge["num_real_images"] == 20 and 0.0 <= judge["heldout_fidelity"] <= 1.0
    markdown = (tmp_path / "results" / "tiny.md").read_text()
    assert "+ RL synthetic + selection (ours)" in markdown and "+ expansion reward (full)" in markdown
    assert (tmp_path / "results" / "tiny_samples_k2.png").is_file()
    prior = yaml.safe_load((tmp_path / "work" / "prior" / "config.yaml").read_text())
    assert prior["data"]["init_args"]["exclude"] == ["6.png"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/stage.json")}
    assert len(stamps) == len(load_pipeline(cfg)[1])  # every stage finished

    assert main(args) == 0  # a rerun skips every finished stage and reports the same numbers
    again = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert [s for s in again["sections"] if "rows" in s] == tables
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
