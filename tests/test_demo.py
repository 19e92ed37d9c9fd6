"""`rgsd demo` end to end at quick size: every stage runs, the report is built from the run, reruns resume."""

from __future__ import annotations

import json
import re

import pytest

from rgsd_lightning.cli import main
from rgsd_lightning.demo import ROWS, DemoSize, build_stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    return out


def test_every_stage_ran_with_its_resolved_config(demo_run):
    names = [s.name for s in build_stages(demo_run, DemoSize.quick())]
    for name in names:
        stage = json.loads((demo_run / name / "stage.json").read_text())
        assert stage["status"] == "ran", name
        assert (demo_run / name / "config.yaml").is_file()
    for name in ("prior", "cold_start", "reward_dpok"):
        assert (demo_run / name / "export" / "generator" / "provenance.json").is_file()
    for name in ("generate_cold", "generate_rl"):
        card = json.loads((demo_run / name / "synthetic" / "card.json").read_text())
        assert card["num_images"] > 0 and "audit" in card


def test_report_numbers_come_from_the_run(demo_run):
    report = (demo_run / "report.md").read_text()
    for _, method, key in ROWS:
        metrics = json.loads((demo_run / f"{key}_s0" / "metrics.json").read_text())  # quick size: 1 seed
        row = next(line for line in report.splitlines() if f"| {method} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(100 * metrics["test/mAP"], abs=0.05)
        assert float(cells[3]) == pytest.approx(100 * metrics["test/rank1"], abs=0.05)
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (demo_run / figure).is_file(), figure
    assert "flagged as near copies" in report
    assert (demo_run / "report.html").read_text().count("<img") >= 3


def test_rerun_skips_finished_stages_and_reruns_an_unfinished_one(demo_run, capsys):
    (demo_run / "down_real_s0" / "stage.json").unlink()
    assert main(["demo", "--quick", "--output", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert "down_real_s0: ran" in out and "prior: skipped" in out and "down_rl_selection_s0: skipped" in out
    assert (demo_run / "down_real_s0" / "checkpoints" / "last.ckpt").is_file()


def test_rows_aggregate_seeds_as_mean_and_sample_std():
    from rgsd_lightning.demo import seed_stages
    from rgsd_lightning.report import Row, results_table

    results = {
        n: None for n in ("down_rl_s0", "down_rl_s1", "down_rl_selection_s0", "down_real_s0", "down_rl")
    }
    assert seed_stages("down_rl", 3, results) == ["down_rl_s0", "down_rl_s1"]
    assert seed_stages("down_rl_selection", 3, results) == ["down_rl_selection_s0"]
    row = Row.over_runs("Base", "real only", [{"test/mAP": 0.10}, {"test/mAP": 0.20}, {"test/mAP": 0.30}])
    assert row.metrics["test/mAP"] == pytest.approx(0.20) and row.spread["test/mAP"] == pytest.approx(0.10)
    single = Row.over_runs("Base", "one", [{"test/mAP": 0.125}])
    table = results_table([row, single], [("test/mAP", "mAP"), ("test/rank1", "Rank-1")])
    assert "| Base | real only | 20.0 ± 10.0 | n/a |" in table
    assert "| Base | one | 12.5 | n/a |" in table
    with pytest.raises(ValueError, match="no runs"):
        Row.over_runs("Base", "empty", [])
