"""`rgsd demo` end to end at quick size: every stage runs, the report is built from the run, reruns resume."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from rgsd_lightning.cli import main
from rgsd_lightning.demo import demo_file
from rgsd_lightning.pipeline import load_pipeline, read_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    return out


def test_every_stage_ran_with_its_resolved_config(demo_run):
    _, stages = load_pipeline(demo_file(quick=True), [f"output={demo_run}"])
    for stage in stages:
        saved = json.loads((demo_run / stage.name / "stage.json").read_text())
        assert saved["status"] == "ran", stage.name
        assert saved["seconds"] > 0 and saved["cpu_seconds"] > 0, stage.name
        assert (demo_run / stage.name / "config.yaml").is_file()
    for name in ("prior", "cold_start", "reward_dpok"):
        assert (demo_run / name / "export" / "generator" / "provenance.json").is_file()
    for name in ("generate_cold", "generate_rl"):
        card = json.loads((demo_run / name / "synthetic" / "card.json").read_text())
        assert card["num_images"] > 0 and "audit" in card
    # the run folder keeps the merged spec the report reads: the quick sizes over the full file's stages
    spec = yaml.safe_load((demo_run / "pipeline.yaml").read_text())
    assert spec["vars"]["seeds"] == [0] and spec["output"] == str(demo_run) and "report" in spec


def test_report_numbers_come_from_the_run(demo_run):
    report = (demo_run / "report.md").read_text()
    spec = read_spec(demo_file(quick=True))
    table = spec["report"]["sections"][0]
    assert table["kind"] == "table"
    for row in table["rows"]:
        metrics = json.loads((demo_run / f"{row['stage']}_s0" / "metrics.json").read_text())  # quick: 1 seed
        line = next(line for line in report.splitlines() if f"| {row['method']} |" in line)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(100 * metrics["test/mAP"], abs=0.05)
        assert float(cells[3]) == pytest.approx(100 * metrics["test/rank1"], abs=0.05)
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (demo_run / figure).is_file(), figure
    assert "flagged as near copies" in report and "fidelity %" in report
    assert (demo_run / "report.html").read_text().count("<img") >= 3
    data = json.loads((demo_run / "report.json").read_text())
    quality = next(s for s in data["sections"] if "sets" in s and "judge" in s)
    for q in quality["sets"].values():
        assert 0.0 <= q["fidelity"] <= 1.0 and q["num_images"] > 0
        assert 1 <= q["median_rank"] <= q["num_prototypes"]
        assert q["audit"]["num_images"] == q["num_images"]


def test_report_command_rebuilds_the_report_elsewhere(demo_run, tmp_path):
    assert main(["report", str(demo_run), "--out", str(tmp_path), "--name", "again"]) == 0
    original = (demo_run / "report.md").read_text().split("## Run")[0]
    assert (tmp_path / "again.md").read_text().split("## Run")[0] == original.replace("](report_", "](again_")


def test_rerun_skips_finished_stages_and_reruns_an_unfinished_one(demo_run, capsys):
    (demo_run / "down_real_s0" / "stage.json").unlink()
    assert main(["demo", "--quick", "--output", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert "down_real_s0: ran" in out and "prior: skipped" in out and "down_rl_selection_s0: skipped" in out
    assert (demo_run / "down_real_s0" / "checkpoints" / "last.ckpt").is_file()
