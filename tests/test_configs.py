"""Every shipped YAML is parsed here, and only here: the stage files of experiments/ and benchmarks/configs/
through the CLI (``--print_config``; the printed config parses back to itself), every pipeline file expanded
into stages wired in order.

The toy stage files run end to end in tests/test_demo.py (the demo pipeline is made of them); the utility
study in miniature in tests/test_utility.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rgsd_lightning.cli import main
from rgsd_lightning.pipeline import expand, load_pipeline, read_spec, substitute

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
BENCH_CONFIGS = ROOT / "benchmarks" / "configs"
RECIPES = ("market1501", "cuhk03np", "casia")
RECOGNIZERS = ("LookaheadReID", "CosFaceRecognizer")
INIT_ROWS = (
    BENCH_CONFIGS / "init_rows.yaml"
)  # stages only: run with the demo's vars (benchmarks/init_rows.py)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _is_pipeline(path: Path) -> bool:
    data = _load(path)
    return "stages" in data or "extends" in data


YAMLS = sorted([*EXPERIMENTS.glob("*/*.yaml"), *BENCH_CONFIGS.rglob("*.yaml")])
STAGE_FILES = [p for p in YAMLS if not _is_pipeline(p)]
# stages only, appended to the demo's by their benchmark (tested below through it)
APPENDICES = (INIT_ROWS, BENCH_CONFIGS / "rl_modes.yaml", BENCH_CONFIGS / "selection_scope.yaml")
PIPELINES = [p for p in YAMLS if _is_pipeline(p) and p not in APPENDICES]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ stage files
@pytest.mark.parametrize("config", STAGE_FILES, ids=_id)
def test_stage_file_parses_and_its_printed_config_parses_back(config, tmp_path, capsys):
    data = _load(config)
    command = "predict" if data["model"]["class_path"].endswith("SyntheticGenerator") else "fit"
    if "data" not in data:  # a study's partial stage file: the pipeline sets the data block
        data["data"] = {"class_path": "rgsd_lightning.data.datamodule.IdentityDataModule"}
    source = tmp_path / "stage.yaml"
    source.write_text(yaml.safe_dump(data))
    printed = _print_config([command, "--config", str(source)], capsys)
    assert printed["model"]["class_path"].startswith("rgsd_lightning.modules.")
    assert printed["trainer"]["use_distributed_sampler"] is False  # the CLI default: we shard ourselves
    if printed["model"]["class_path"].endswith(RECOGNIZERS):
        assert "enabled" in printed["model"]["init_args"]["selection"]
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert _print_config([command, "--config", str(again)], capsys) == printed


def test_every_dataset_has_the_paper_stages():
    for dataset in RECIPES:
        names = {p.name for p in (EXPERIMENTS / dataset).glob("*.yaml")}
        assert {"cold_start.yaml", "reward_dpok.yaml", "generate.yaml", "pipeline.yaml"} <= names, dataset
        assert any(
            _load(p)["model"]["class_path"].endswith(RECOGNIZERS) for p in STAGE_FILES if dataset in str(p)
        )
    market = _load(EXPERIMENTS / "market1501" / "reward_dpok.yaml")["model"]["init_args"]
    assert market["lr"] == 1e-5 and market["reward"]["lambdas"] == [1.0, 0.75, 0.25]  # paper §5.1


# ------------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("pipeline", PIPELINES, ids=_id)
def test_pipeline_expands_into_stages_wired_in_order(pipeline, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # stage files resolve next to the pipeline file, whatever the cwd
    output, stages = load_pipeline(pipeline)
    spec = read_spec(pipeline)
    names = [s.name for s in stages]
    assert len(set(names)) == len(names) and str(output)
    if pipeline.parent.name in RECIPES:
        assert set(spec["vars"]) == {"data_root", "backbone_weights"}  # the two things a user fills in
        assert names[0] == "baseline"
        for stage in stages:
            assert stage.config["data"]["init_args"]["root"] == spec["vars"]["data_root"]
    for stage in stages:  # RL stages keep their curves (reward_history.json feeds the report's RL sections)
        if stage.config["model"]["class_path"].endswith("RewardDPOK"):
            callbacks = [c["class_path"] for c in stage.config["trainer"].get("callbacks") or []]
            assert "rgsd_lightning.callbacks.reward_curves.RewardCurves" in callbacks, stage.name
    seen: set[str] = set()
    for stage in stages:
        refs = {ref.split(".")[0] for ref in json.dumps(stage.config).split("${")[1:]}
        assert refs <= seen, f"{stage.name} refers to a later stage: {refs - seen}"
        seen.add(stage.name)
    if EXPERIMENTS in pipeline.parents:  # the paper's chain: cold start -> RL -> generation
        assert any(n.startswith("generate") for n in names)
        fake = {
            n: {"export": f"/x/{n}/export", "output": f"/x/{n}/synthetic", "folder": f"/x/{n}"} for n in names
        }
        rl = next(s for s in stages if s.name == "reward_dpok")
        assert substitute(rl.config, fake)["model"]["init_args"]["generator"] == "/x/cold_start/export"
    for section in (spec.get("report") or {}).get("sections", []):  # report sections name real stages
        for inner in section.get("sections", [section]):
            for key in ("stage", "judge", "real", "extractor", "set"):
                if key in inner and "${" not in str(inner[key]):
                    assert inner[key] in names, (inner.get("title"), inner[key])
            for entry in (inner.get("sets") or {}).values():
                stage = (
                    entry["stage"] if isinstance(entry, dict) else entry
                )  # {stage, keep}: a filtered share
                if "${" not in stage:
                    assert stage in names, inner.get("title")


STUDIES = sorted([*BENCH_CONFIGS.glob("utility_*.yaml"), *BENCH_CONFIGS.glob("*_recognizer_budget*.yaml")])


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_utility_studies_have_a_run_for_every_table_row(path):
    output, stages = load_pipeline(path)
    names = [s.name for s in stages]
    assert names[:2] == ["prior", "judge"] and str(output).startswith("runs/utility/")
    spec = read_spec(path)
    seeds = len(spec["vars"]["seeds"])  # the checks are over 3 seeds; a study may run more
    assert seeds == 1 if path.stem.endswith("_quick") else seeds >= 3
    label = spec["vars"]["settings"][0]["label"]
    for section in spec["report"]["sections"]:
        for inner in section.get("sections", [section]):
            for row in inner.get("rows", []):
                stage = row["stage"].replace("${label}", label)
                assert any(n.startswith(stage + "_s") for n in names), stage


def test_init_rows_stages_expand_with_the_demo_vars(tmp_path):
    from benchmarks import init_rows

    output, stages = expand(init_rows._spec(tmp_path, quick=True, steps=3))
    assert output == tmp_path and [s.name for s in stages] == ["prior", "judge", "cold_zero", "cold_null"]
    for stage, rows in zip(stages[2:], ("zero", "null"), strict=True):
        assert stage.config["model"]["init_args"]["init_rows"] == rows
        assert stage.config["trainer"]["max_steps"] == 3


def _appended_specs(work: Path, quick: bool) -> dict[str, dict]:
    from benchmarks.rl_modes import build_spec
    from benchmarks.selection_scope import _spec

    return {"rl_modes": build_spec(work, quick), "selection_scope": _spec(work, quick, None)}


@pytest.mark.parametrize("quick", [False, True])
def test_benchmark_stages_expand_after_the_demo_stages_they_use(quick, tmp_path):
    for name, spec in _appended_specs(tmp_path, quick).items():
        _, stages = expand(spec)
        seen: set[str] = set()
        for stage in stages:
            refs = {ref.split(".")[0] for ref in json.dumps(stage.config).split("${")[1:]}
            assert refs <= seen, f"{name}: {stage.name} refers to a later stage: {refs - seen}"
            seen.add(stage.name)
    _, stages = expand(_appended_specs(tmp_path, quick)["rl_modes"])
    base = ["down_real_s0", "judge", "cold_start"]  # the full demo starts from the shipped prior
    assert [s.name for s in stages][: len(base) + quick] == (["prior"] if quick else []) + base
