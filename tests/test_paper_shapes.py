"""The paper's recipes at their real shapes on CPU (issue 14 case 6): ``python -m benchmarks paper_shapes``.

The slow test runs every stage of experiments/market1501/pipeline.yaml and the CosFace baseline and cold
start of experiments/casia/pipeline.yaml for one step each, on a random DiT-XL/2 + sd-vae-ft-ema-shaped
diffusers folder built by the benchmark (nothing downloaded), and checks what each stage wrote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import paper_shapes  # noqa: E402

MARKET_STAGES = ["baseline", "cold_start", "reward_dpok", "generate", "ours"]


def _available_gib() -> float:
    text = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 2**20 if match else float("inf")


def test_the_recipes_are_run_as_shipped_except_the_listed_overrides(tmp_path):
    """Every stage of the market recipe (and the face baseline + cold start) with its own precision."""
    fixtures = {k: tmp_path / k for k in ("dit", "weights", "market", "faces", "bin")}
    market, applied = paper_shapes.prepare_stages("market1501", fixtures, tmp_path / "out")
    pipeline = yaml.safe_load((ROOT / "experiments" / "market1501" / "pipeline.yaml").read_text())
    assert [s.name for s in market] == [s["name"] for s in pipeline["stages"]] == MARKET_STAGES
    for stage in market:
        trainer, init = stage.config["trainer"], stage.config["model"]["init_args"]
        config = next(s["config"] for s in pipeline["stages"] if s["name"] == stage.name)
        recipe = yaml.safe_load((ROOT / "experiments" / "market1501" / config).read_text())
        assert trainer["accelerator"] == "cpu" and trainer["precision"] == recipe["trainer"]["precision"]
        assert stage.config["data"]["init_args"]["root"] == str(fixtures["market"])
        assert applied[stage.name]["precision_substitute"] is None
        assert init.get("pretrained", str(fixtures["dit"])) == str(fixtures["dit"])
    cold = next(s for s in market if s.name == "cold_start").config["model"]["init_args"]
    assert cold["vae"] == "pretrained" and cold["image_size"] == 256 and cold["trainable"] == "label_table"
    casia, _ = paper_shapes.prepare_stages("casia", fixtures, tmp_path / "faces_out")
    assert [s.name for s in casia] == ["baseline", "cold_start"]
    assert casia[1].config["model"]["init_args"]["image_size"] == 128
    assert paper_shapes.cpu_precision("16-mixed")[0] == "bf16-mixed"
    assert paper_shapes.cpu_precision("bf16-mixed") == ("bf16-mixed", None)


@pytest.mark.slow
@pytest.mark.skipif(_available_gib() < 12, reason="needs ~12 GiB of free memory (DiT-XL/2 in float32)")
def test_paper_recipes_run_at_real_shapes_on_cpu(tmp_path):
    out = tmp_path / "report"
    # a fresh interpreter: the benchmark forks one process per stage, safe only in a process that has not
    # run torch kernels yet (OpenMP)
    command = [sys.executable, "-m", "benchmarks", "paper_shapes", "--out", str(out), "--work", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # a shared CI machine: no spinning threads (see the benchmark doc)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "paper_shapes.json").read_text())
    assert report["errors"] == {}, report["errors"]
    assert report["fixtures"]["dit_parameters"] > 650e6  # DiT-XL/2 (+ 28 per-block 1000-class tables)
    market = report["results"]["market1501"]
    assert list(market["stages"]) == MARKET_STAGES
    for dataset in ("market1501", "casia"):
        for row in report["results"][dataset]["stages"].values():
            assert row["status"] == "ran" and row["peak_rss_bytes"] > 0 and row["memory_method"]
    checks = market["checks"]
    assert checks["cold_start"] == {
        "image_size": 256,
        "latent": True,
        "vae_scale_factor": 8,
        "num_identities": 2,
        "transformer_out_channels": 8,
    }
    rl = checks["reward_dpok"]
    assert rl["export"] and rl["all_finite"] and rl["transitions"] == 2  # 2 samples x 1 stochastic step
    recipe = yaml.safe_load((ROOT / "experiments" / "market1501" / "reward_dpok.yaml").read_text())
    bound = recipe["model"]["init_args"]["objective"]["ratio_check_tol"]  # the recipe's bf16 bound
    assert rl["logp_check"] <= bound
    assert checks["generate"] == {
        "images": 2,
        "image_sizes": [[256, 256]],
        "rewards_recorded": True,
        "audited": True,
    }
    assert "test/mAP" in checks["baseline"]["metrics"] and "test/mAP" in checks["ours"]["metrics"]
    faces = report["results"]["casia"]["checks"]
    assert faces["cold_start"]["image_size"] == 128 and faces["cold_start"]["latent"]
    assert any("lfw" in key for key in faces["baseline"]["metrics"])
    assert "| market1501 / reward_dpok | bf16-mixed |" in (out / "paper_shapes.md").read_text()
