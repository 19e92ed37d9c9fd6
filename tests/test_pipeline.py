"""Pipeline files: vars, overlays, foreach groups and seeds expand as documented; reports aggregate runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rgsd_lightning.pipeline import load_pipeline, read_spec, set_dotted, substitute_vars
from rgsd_lightning.pipeline.spec import stage_names
from rgsd_lightning.report import Row, make_report, results_table

STAGE = {"trainer": {"max_steps": 1, "callbacks": [{"class_path": "x.Writer", "init_args": {"a": 1}}]}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write(tmp_path / "stage.yaml", STAGE)
    return tmp_path


def test_vars_keep_their_type_when_whole_and_format_inside_strings():
    variables = {"n": 3, "ids": [1, 2], "name": "cold", "off": None}
    assert substitute_vars("${n}", variables, "x") == 3
    assert substitute_vars("${ids}", variables, "x") == [1, 2]
    assert substitute_vars("k${n}_${name}", variables, "x") == "k3_cold"
    assert substitute_vars("${off}", variables, "x") is None
    # innermost first; two-part stage references stay for run time
    assert substitute_vars("${${name}_start.export}", variables, "x") == "${cold_start.export}"
    assert substitute_vars({"a": ["${n}", "${s.export}"]}, variables, "x") == {"a": [3, "${s.export}"]}
    with pytest.raises(ValueError, match=r"here: unknown variable \$\{nope\}"):
        substitute_vars("a ${nope}", variables, "here")
    # mapping keys are formatted too (a report's metrics: {"test/${metric}": label}); they stay strings
    keys = substitute_vars({"m_${n}": "${n}", "${ids}": 1, "${s.export}": 2, 4: "${name}"}, variables, "x")
    assert keys == {"m_3": 3, "[1, 2]": 1, "${s.export}": 2, 4: "cold"}
    with pytest.raises(ValueError, match=r"here: unknown variable \$\{nope\}"):
        substitute_vars({"${nope}": 1}, variables, "here")


def test_set_dotted_creates_mappings_and_indexes_lists():
    config = {"trainer": {"callbacks": [{"init_args": {}}]}}
    set_dotted(config, "trainer.callbacks.0.init_args.x", 5)
    set_dotted(config, "model.init_args.lr", 0.1)
    assert (
        config["trainer"]["callbacks"][0]["init_args"]["x"] == 5 and config["model"]["init_args"]["lr"] == 0.1
    )
    with pytest.raises(ValueError, match="not an index"):
        set_dotted(config, "trainer.callbacks.3.x", 1)


def test_stages_expand_foreach_seeds_defaults_and_set(folder: Path):
    spec = {
        "output": str(folder / "run"),
        "vars": {"steps": 7, "root": "${output}/data", "seeds": [0, 2]},
        "defaults": {"data.root": "${root}"},
        "stages": [
            {"name": "prior", "config": "stage.yaml", "set": {"trainer.max_steps": "${steps}"}},
            {
                "foreach": [{"shot": 1}, {"shot": 3}],
                "stages": [
                    {
                        "name": "k${shot}_down",
                        "config": "stage.yaml",
                        "seeds": "${seeds}",
                        "test": True,
                        "set": {"data.shots": "${shot}", "model.seed_copy": "${seed}", "k${shot}.on": 1},
                    }
                ],
            },
        ],
    }
    path = _write(folder / "p.yaml", spec)
    output, stages = load_pipeline(path)
    assert output == folder / "run"
    assert [s.name for s in stages] == ["prior", "k1_down_s0", "k1_down_s2", "k3_down_s0", "k3_down_s2"]
    assert stage_names(read_spec(path)) == [s.name for s in stages]
    prior, last = stages[0], stages[-1]
    assert prior.config["trainer"]["max_steps"] == 7 and prior.config["data"]["root"] == f"{folder}/run/data"
    assert "seed_everything" not in prior.config
    assert last.config["seed_everything"] == 2 and last.config["model"]["seed_copy"] == 2
    assert last.config["data"]["shots"] == 3 and last.test and last.command == "fit"
    assert last.config["k3"] == {"on": 1} and stages[1].config["k1"] == {"on": 1}  # vars in set keys


def test_when_leaves_a_stage_out_and_a_var_can_name_a_stage_artifact(folder: Path):
    spec = {
        "vars": {"train": False, "prior": "builtin:toy"},
        "stages": [
            {"name": "prior", "config": "stage.yaml", "when": "${train}"},
            {"name": "cold", "config": "stage.yaml", "set": {"model.pretrained": "${prior}"}},
        ],
    }
    path = _write(folder / "p.yaml", spec)
    _, stages = load_pipeline(path)
    assert [s.name for s in stages] == ["cold"] and stages[0].config["model"]["pretrained"] == "builtin:toy"
    assert stage_names(read_spec(path)) == ["cold"]
    _, stages = load_pipeline(path, ["vars.train=true", "vars.prior=${prior.export}"])
    assert [s.name for s in stages] == ["prior", "cold"]
    assert stages[1].config["model"]["pretrained"] == "${prior.export}"  # resolved when the stage runs


def test_extends_merges_mappings_and_overrides_apply_last(folder: Path):
    _write(
        folder / "base.yaml",
        {
            "output": "runs/base",
            "vars": {"a": 1, "b": 2},
            "stages": [{"name": "s", "config": "stage.yaml", "set": {"x": "${a}", "y": "${b}"}}],
        },
    )
    sub = folder / "sub"
    sub.mkdir()
    overlay = _write(sub / "quick.yaml", {"extends": "../base.yaml", "output": "runs/q", "vars": {"a": 10}})
    output, stages = load_pipeline(overlay, ["vars.b=[3, 4]"])
    assert output == Path("runs/q")
    assert stages[0].config["x"] == 10 and stages[0].config["y"] == [3, 4]  # base's stage file found
    assert read_spec(overlay)["vars"] == {"a": 10, "b": 2}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"stages": [{"name": "s"}]}, "lacks \\['config'\\]"),
        ({"stages": [{"name": "s", "config": "stage.yaml", "sett": {}}]}, "unknown keys \\['sett'\\]"),
        ({"stages": [{"name": "s", "config": "missing.yaml"}]}, "config not found"),
        ({"stages": [{"name": "s", "config": "stage.yaml"}] * 2}, "repeated: \\['s'\\]"),
        ({"stages": [{"name": "s", "config": "stage.yaml", "seeds": [0.5]}]}, "list of ints"),
        ({"stages": [{"foreach": {"k": 1}, "stages": []}]}, "expected a list of values"),
        ({"stages": [{"name": "s", "config": "stage.yaml", "command": "test"}]}, "'fit' or 'predict'"),
        ({"stages": [], "colour": 1}, "unknown keys \\['colour'\\]"),
        ({"stages": [{"name": "s", "config": "stage.yaml", "when": "yes"}]}, "when: expected true or false"),
    ],
)
def test_bad_pipelines_fail_naming_the_problem(folder: Path, spec: dict, message: str):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_pipeline(_write(folder / "bad.yaml", spec))


def test_extends_loop_and_bad_override_are_errors(folder: Path):
    _write(folder / "a.yaml", {"extends": "b.yaml"})
    _write(folder / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ValueError, match="loops back"):
        read_spec(folder / "a.yaml")
    with pytest.raises(ValueError, match="expected key=value"):
        read_spec(_write(folder / "ok.yaml", {"stages": []}), ["oops"])


# ------------------------------------------------------------------------------------------- report
def test_rows_aggregate_seeds_as_mean_and_sample_std():
    row = Row.over_runs("Base", "real only", [{"test/mAP": 0.10}, {"test/mAP": 0.20}, {"test/mAP": 0.30}])
    assert row.metrics["test/mAP"] == pytest.approx(0.20) and row.spread["test/mAP"] == pytest.approx(0.10)
    single = Row.over_runs("Base", "one", [{"test/mAP": 0.125}])
    table = results_table([row, single], [("test/mAP", "mAP"), ("test/rank1", "Rank-1")])
    assert "| Base | real only | 20.0 ± 10.0 | n/a |" in table
    assert "| Base | one | 12.5 | n/a |" in table
    with pytest.raises(ValueError, match="no runs"):
        Row.over_runs("Base", "empty", [])


def test_report_table_reads_the_seed_copies_of_a_run(folder: Path):
    spec = {
        "output": str(folder / "run"),
        "vars": {"seeds": [0, 1, 2]},
        "stages": [
            {"name": "down_real", "config": "stage.yaml", "seeds": "${seeds}"},
            {"name": "down_rl", "config": "stage.yaml", "seeds": "${seeds}"},
        ],
        "report": {
            "title": "T",
            "sections": [
                {
                    "kind": "table",
                    "title": "Results",
                    "metrics": {"test/mAP": "mAP"},
                    "rows": [
                        {"group": "Base", "method": "real", "stage": "down_real"},
                        {"group": "Syn", "method": "rl", "stage": "down_rl"},
                    ],
                    "caption": "seeds ${seeds}",
                },
                {"kind": "run"},
            ],
        },
    }
    run = folder / "run"
    for seed, value in enumerate([0.5, 0.7, 0.9]):  # down_rl_s2 never finished
        for name, scale in (("down_real", 1.0), ("down_rl", 0.5)):
            if name == "down_rl" and seed == 2:
                continue
            stage = run / f"{name}_s{seed}"
            stage.mkdir(parents=True)
            marker = {"name": stage.name, "seconds": 2.0, "metrics": {"test/mAP": scale * value}}
            (stage / "stage.json").write_text(json.dumps(marker))
    report = make_report(run, spec=spec).read_text()
    assert "| Base | real | 70.0 ± 20.0 |" in report  # mean and sample std of 0.5, 0.7, 0.9
    assert "| Syn | rl | 30.0 ± 7.1 |" in report  # the finished copies only: 0.25, 0.35
    assert "seeds [0, 1, 2]" in report and "Not run (1 of the pipeline's 6 stages" in report
    data = json.loads((run / "report.json").read_text())
    assert [len(r["runs"]) for r in data["sections"][0]["rows"]] == [3, 2]
    assert [r["copies"] for r in data["sections"][0]["rows"]] == [
        ["down_real_s0", "down_real_s1", "down_real_s2"],
        ["down_rl_s0", "down_rl_s1"],  # the runs say which seed they are
    ]


def test_the_run_section_folds_the_seed_copies_of_a_stage():
    from rgsd_lightning.report.sections import compact_names

    names = ["prior", "a_s0", "a_s1", "a_s2", "b_s0", "b_s2", "c_s3", "gen_sdedit80", "d_s10", "d_s11"]
    assert compact_names(names) == ["prior", "a_s[0-2]", "b_s0", "b_s2", "c_s3", "gen_sdedit80", "d_s[10-11]"]
    assert compact_names([]) == []


def test_the_run_section_tells_ran_reused_stopped_and_never_started_stages_apart(folder: Path):
    """A stage that ran here, one taken from another run, one that started and stopped (a folder without a
    stage.json) and one never started (no folder): only the first counts towards this run's time, the last
    is named in one sentence instead of a row."""
    spec = {
        "output": str(folder / "run"),
        "stages": [{"name": n, "config": "stage.yaml"} for n in ("ran", "taken", "stopped", "skipped")],
        "report": {"sections": [{"kind": "run"}]},
    }
    run = folder / "run"
    for name, marker in (
        ("ran", {"name": "ran", "seconds": 120.0, "cpu_seconds": 90.0}),
        (
            "taken",
            {"name": "taken", "seconds": 600.0, "cpu_seconds": 600.0, "reused_from": "elsewhere/taken"},
        ),
    ):
        (run / name).mkdir(parents=True)
        (run / name / "stage.json").write_text(json.dumps(marker))
    (run / "stopped").mkdir()
    report = make_report(run, spec=spec).read_text()
    assert "| ran | finished | 120 | 90 |" in report and "| taken | reused | 600 | 600 |" in report
    assert "| stopped | not finished |  |  |" in report and "| skipped |" not in report
    assert (
        "total wall 2.0 min, CPU 1.5 min; the reused stages" in report
        and "took 10.0 min wall there" in report
    )
    assert "Not run (1 of the pipeline's 4 stages" in report and "): skipped." in report
    data = json.loads((run / "report.json").read_text())["sections"][0]
    assert data["wall_s"] == 120.0 and data["reused_wall_s"] == 600.0 and data["not_run"] == ["skipped"]


def test_report_says_which_stage_is_missing(folder: Path):
    spec = {
        "output": str(folder / "run"),
        "stages": [{"name": "gen", "config": "stage.yaml"}],
        "report": {"sections": [{"kind": "audit", "title": "Audit", "set": "gen"}]},
    }
    (folder / "run").mkdir()
    assert (
        "Not available yet: stage 'gen' has not finished"
        in make_report(folder / "run", spec=spec).read_text()
    )
    with pytest.raises(FileNotFoundError, match="not a pipeline run folder"):
        make_report(folder)
    bad = {**spec, "report": {"sections": [{"kind": "pie"}]}}
    with pytest.raises(ValueError, match="unknown section kind 'pie'"):
        make_report(folder / "run", spec=bad)


def test_an_interrupted_stage_resumes_only_its_own_checkpoint(tmp_path: Path):
    """A stage's checkpoints/last.ckpt written by another stage class is refused, not silently loaded."""
    import torch

    from rgsd_lightning.pipeline import run_stage

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "toy"
    spec = {
        "output": str(tmp_path / "run"),
        "stages": [{"name": "baseline", "config": str(experiments / "reid_baseline.yaml")}],
    }
    _, stages = load_pipeline(_write(tmp_path / "p.yaml", spec))
    stage = stages[0]
    stage.config["data"]["init_args"].update(root=str(tmp_path / "toy"), toy={"num_train_ids": 4})
    checkpoints = tmp_path / "run" / "baseline" / "checkpoints"
    checkpoints.mkdir(parents=True)
    hparams = {"_class_path": "rgsd_lightning.modules.cold_start.ColdStartDiT", "num_identities": 4}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, checkpoints / "last.ckpt")
    with pytest.raises(ValueError, match="checkpoint of ColdStartDiT .* but the config runs LookaheadReID"):
        run_stage(stage, tmp_path / "run", {})
    assert not (tmp_path / "run" / "baseline" / "stage.json").exists()


def test_a_finished_stage_whose_settings_changed_is_reused_with_a_warning(tmp_path: Path):
    """A finished stage is skipped; when the pipeline now gives it other settings than the ones recorded
    in its stage.json, the warning names the changed keys and how to re-run it."""
    import warnings

    from rgsd_lightning.pipeline import run_stage
    from rgsd_lightning.pipeline.runner import place_stage

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "toy"
    spec = {
        "output": str(tmp_path / "run"),
        "stages": [{"name": "judge", "config": str(experiments / "reid_baseline.yaml")}],
    }
    _, (stage,) = load_pipeline(_write(tmp_path / "p.yaml", spec))
    folder = tmp_path / "run" / "judge"
    folder.mkdir(parents=True)
    ran_with = place_stage(stage.config, folder)[0]
    marker = {"name": "judge", "seconds": 1.0, "folder": str(folder), "metrics": {"test/mAP": 0.5}}
    (folder / "stage.json").write_text(json.dumps({**marker, "spec": ran_with}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged: reused silently
        assert run_stage(stage, tmp_path / "run", {}).status == "skipped"
    stage.config["data"]["init_args"]["max_train_per_identity"] = 5
    with pytest.warns(UserWarning, match=r"data.init_args.max_train_per_identity: 4 -> 5.*delete .*judge"):
        result = run_stage(stage, tmp_path / "run", {})
    assert result.status == "skipped" and result.metrics == {"test/mAP": 0.5}
    (folder / "stage.json").write_text(json.dumps(marker))  # recorded before stages kept their settings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_stage(stage, tmp_path / "run", {})


@pytest.mark.slow
def test_a_finished_stage_leaves_no_model_alive(tmp_path: Path):
    """jsonargparse keeps the last parser in a context variable; the runner must not let it pin the stage's
    model (gigabytes at paper scale) into the next stage."""
    import gc

    from rgsd_lightning.demo import demo_file
    from rgsd_lightning.modules.cold_start import ColdStartDiT
    from rgsd_lightning.pipeline import run_stage

    output, stages = load_pipeline(demo_file(quick=True), [f"output={tmp_path}", "vars.prior_steps=2"])
    run_stage(stages[0], output, {})
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, ColdStartDiT)]


def test_the_demo_starts_from_the_shipped_prior_unless_asked_to_train_it():
    from rgsd_lightning.demo import TRAIN_PRIOR, demo_file

    _, stages = load_pipeline(demo_file())
    names = [s.name for s in stages]
    cold = stages[names.index("cold_start")]
    assert "prior" not in names and cold.config["model"]["init_args"]["pretrained"] == "builtin:toy_prior"
    _, stages = load_pipeline(demo_file(), TRAIN_PRIOR)
    names = [s.name for s in stages]
    cold = stages[names.index("cold_start")]
    assert names[0] == "prior" and cold.config["model"]["init_args"]["pretrained"] == "${prior.export}"
    recipe = yaml.safe_load((demo_file().parent / "prior.yaml").read_text())
    prior = stages[0].config  # --train-prior re-creates the shipped prior: the recipe's data and steps
    assert prior["trainer"]["max_steps"] == recipe["trainer"]["max_steps"]
    assert prior["data"]["init_args"]["toy"] == recipe["data"]["init_args"]["toy"]
    assert prior["model"]["init_args"] == {
        **recipe["model"]["init_args"],
        "preset": "small",
        "image_size": 32,
        "warmup_steps": recipe["model"]["init_args"]["warmup_steps"],
    }
    _, quick = load_pipeline(demo_file(quick=True))  # the quick demo trains its own tiny prior
    assert quick[0].name == "prior" and quick[0].config["model"]["init_args"]["preset"] == "tiny"


def test_only_takes_stage_names_and_shell_patterns_in_pipeline_order():
    from rgsd_lightning.pipeline.runner import select_stages

    names = ["prior", "k3_real_s0", "k3_real_s3", "k3_rl_s3", "k3_real_s7", "k1_real_s3"]
    assert select_stages(["k3_*_s[3-7]", "prior"], names) == ["prior", "k3_real_s3", "k3_rl_s3", "k3_real_s7"]
    assert select_stages(["k1_real_s3"], names) == ["k1_real_s3"]
    with pytest.raises(ValueError, match=r"unknown stages \['k5_\*'\]"):
        select_stages(["k5_*", "prior"], names)


@pytest.mark.parametrize("jobs", [1, 2])
def test_only_refuses_a_selection_whose_inputs_are_neither_selected_nor_finished(tmp_path: Path, jobs):
    """A pattern that also matches a stage whose input is not selected fails before anything runs, naming
    the stage and what it needs; once that input is finished, the same selection is accepted."""
    from rgsd_lightning.pipeline import Stage, run_stages
    from rgsd_lightning.pipeline.runner import finished_outside

    stages = [
        Stage("gen_a", {"model": {"x": 1}}),
        Stage("gen_b", {"model": {"x": 2}}),
        Stage("rows_a_s0", {"data": {"synthetic": ["${gen_a.output}"]}}),
        Stage("rows_b_s0", {"data": {"synthetic": ["${gen_b.output}"]}}),
    ]
    with pytest.raises(ValueError, match=r"rows_b_s0 needs \['gen_b'\]") as info:
        run_stages(tmp_path, stages, only=["gen_a", "rows_*"], jobs=jobs)
    assert "rows_a_s0" not in str(info.value)  # its input is selected
    assert not any(tmp_path.iterdir())  # nothing ran
    marker = tmp_path / "gen_b" / "stage.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"name": "gen_b", "status": "finished", "output": str(tmp_path / "out")}))
    assert set(finished_outside(tmp_path, stages, ["gen_a", "rows_a_s0", "rows_b_s0"])) == {"gen_b"}


def test_reuse_takes_finished_stages_from_another_run_folder(tmp_path: Path):
    """A ``reuse`` block lets another run's finished stages stand in for this run's: their markers point to
    the artifacts where they are, later stages reference them, a stage finished here is left alone, and a
    stage the other run has not finished is an error before any marker is written."""
    from rgsd_lightning.pipeline import Stage, adopt_stages, reuse_plan
    from rgsd_lightning.pipeline.runner import finished_outside

    source, output = tmp_path / "study", tmp_path / "budget"
    stages = [
        Stage("prior", {"model": {"x": 1}}),
        Stage("gen_a", {"model": {"x": 2}}),
        Stage("gen_b", {"model": {"x": 3}}),
        Stage("rows_s0", {"data": {"synthetic": ["${gen_a.output}"]}}),
    ]
    for name in ("prior", "gen_a"):
        (source / name).mkdir(parents=True)
        marker = {"name": name, "output": str(source / name / "synthetic"), "metrics": {"m": 0.5}}
        (source / name / "stage.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"stages \['gen_b'\] have not finished in .*study"):
        adopt_stages(output, stages, source, ["gen_*", "prior"])
    assert not output.exists()  # nothing written
    with pytest.raises(ValueError, match=r"unknown stages \['judge'\]"):
        adopt_stages(output, stages, source, ["judge"])
    with pytest.raises(ValueError, match="own folder"):
        adopt_stages(source, stages, source, ["prior"])

    assert adopt_stages(output, stages, source, ["prior", "gen_a"]) == ["prior", "gen_a"]
    saved = json.loads((output / "gen_a" / "stage.json").read_text())
    assert saved["reused_from"] == str(source / "gen_a") and saved["metrics"] == {"m": 0.5}
    finished = finished_outside(output, stages, ["rows_s0"])  # the selected row may now run
    assert finished["gen_a"].refs()["output"] == str(source / "gen_a" / "synthetic")
    assert adopt_stages(output, stages, source, ["prior", "gen_a"]) == []  # already here: left alone
    # a third run reusing from the second points to the folder the stage ran in, not to a marker
    third = tmp_path / "seeds"
    assert adopt_stages(third, stages, output, ["gen_a"]) == ["gen_a"]
    chained = json.loads((third / "gen_a" / "stage.json").read_text())
    assert chained["reused_from"] == str(source / "gen_a") and chained["output"] == saved["output"]

    assert reuse_plan({"stages": []}) is None
    assert reuse_plan({"reuse": {"from": "runs/x", "stages": ["a*"]}}) == (Path("runs/x"), ["a*"])
    for bad in ({"from": "runs/x"}, {"from": "runs/x", "stages": "a"}, {"from": "", "stages": ["a"]}, ["a"]):
        with pytest.raises(ValueError, match="reuse"):
            reuse_plan({"reuse": bad})


def test_the_report_reads_a_reused_stage_from_the_folder_it_ran_in(tmp_path: Path, toy_faces: str):
    """A report section that rebuilds a reused stage's datamodule (a quality judge) reads the config.yaml of
    the run the stage was taken from: the reusing run has only the stage's marker."""
    from rgsd_lightning.pipeline.runner import StageResult
    from rgsd_lightning.report.sections import RunContext

    source, run = tmp_path / "study" / "judge", tmp_path / "budget"
    source.mkdir(parents=True)
    data = {"class_path": "rgsd_lightning.IdentityDataModule", "init_args": {"root": toy_faces}}
    data["init_args"].update(format="toy_faces", task="face", train_per_identity=2, face_size=16)
    (source / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    (run / "judge").mkdir(parents=True)
    (run / "judge" / "stage.json").write_text(json.dumps({"name": "judge", "reused_from": str(source)}))
    (run / "real").mkdir()
    (run / "real" / "stage.json").write_text(json.dumps({"name": "real"}))
    results = {name: StageResult.from_marker(run / name) for name in ("judge", "real")}
    ctx = RunContext(run, ["judge", "real", "later"], results, tmp_path / "out", "x")
    assert ctx.folder("judge") == source and ctx.folder("real") == run / "real"
    dm = ctx.datamodule("judge")
    assert dm.root == toy_faces and len(dm.train_records) == 2 * dm.num_identities
    with pytest.raises(KeyError, match="later"):
        ctx.folder("later")


def test_report_sections_find_a_reused_stage_s_logs_where_it_ran(tmp_path: Path):
    """The RL curves (reward_history.json) of a stage taken from another run are read from the folder it ran
    in, like its config: the reusing run holds only its marker (the selection section reads selection.json
    the same way, through RunContext.folder)."""
    from rgsd_lightning.pipeline.runner import StageResult
    from rgsd_lightning.report.sections import RunContext, curves

    source, run = tmp_path / "study" / "rl", tmp_path / "seeds"
    (source / "logs").mkdir(parents=True)
    history = [{"rollout": i, "train/reward_sem": 0.1 * i} for i in range(8)]
    (source / "logs" / "reward_history.json").write_text(json.dumps(history))
    (run / "rl").mkdir(parents=True)
    (run / "rl" / "stage.json").write_text(json.dumps({"name": "rl", "reused_from": str(source)}))
    ctx = RunContext(run, ["rl"], {"rl": StageResult.from_marker(run / "rl")}, tmp_path / "out", "x")
    section = curves(ctx, {"stage": "rl", "figure": "curves"})
    assert section.data == {"rollouts": 8} and "recorded no reward history" not in section.body
    (source / "logs" / "reward_history.json").unlink()
    assert "recorded no reward history" in curves(ctx, {"stage": "rl"}).body


def test_a_reused_stage_warns_only_about_settings_other_than_its_own_folder(tmp_path: Path):
    """The marker of a stage taken from another run records that run's folders; its own folder's paths are
    mapped before comparing, so only a real difference (here: an input from another stage) is reported."""
    import warnings

    from rgsd_lightning.pipeline import adopt_stages, run_stage
    from rgsd_lightning.pipeline.runner import place_stage

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "toy"
    spec = {
        "output": str(tmp_path / "new"),
        "stages": [{"name": "judge", "config": str(experiments / "reid_baseline.yaml")}],
    }
    _, (stage,) = load_pipeline(_write(tmp_path / "p.yaml", spec))
    source = tmp_path / "old"
    ran_with = place_stage(stage.config, source / "judge")[0]
    (source / "judge").mkdir(parents=True)
    marker = {"name": "judge", "export": str(source / "judge" / "export" / "backbone"), "metrics": {"m": 1.0}}
    (source / "judge" / "stage.json").write_text(json.dumps({**marker, "spec": ran_with}))
    adopt_stages(tmp_path / "new", [stage], source, ["judge"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings, other folder: reused silently
        result = run_stage(stage, tmp_path / "new", {})
    assert result.status == "skipped" and result.export == source / "judge" / "export" / "backbone"
    stage.config["data"]["init_args"]["root"] = str(
        source / "judge_data"
    )  # an input elsewhere stays a change
    with pytest.warns(UserWarning, match=r"data.init_args.root: .* -> .*old/judge_data"):
        run_stage(stage, tmp_path / "new", {})


def test_figure_sections_draw_the_finished_sets_and_name_the_others(tmp_path: Path, toy_faces: str):
    """The samples and features sections draw the sets whose stages have finished and name the ones still
    running; with none finished, or a set naming a stage the pipeline lacks, the section is not available."""
    from rgsd_lightning.data import IdentityRecord, write_manifest
    from rgsd_lightning.pipeline.runner import StageResult
    from rgsd_lightning.report.sections import RunContext, features, samples

    run = tmp_path / "run"
    data = {"class_path": "rgsd_lightning.IdentityDataModule", "init_args": {"root": toy_faces}}
    data["init_args"].update(format="toy_faces", task="generator", image_size=16, train_per_identity=2)
    (run / "real").mkdir(parents=True)
    (run / "real" / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    (run / "real" / "stage.json").write_text(json.dumps({"name": "real"}))
    (run / "gen_a").mkdir()
    (run / "gen_a" / "stage.json").write_text(json.dumps({"name": "gen_a", "output": str(run / "set_a")}))
    results = {name: StageResult.from_marker(run / name) for name in ("real", "gen_a")}
    ctx = RunContext(run, ["real", "gen_a", "gen_b"], results, tmp_path / "out", "x")
    real = ctx.real("real")[0]
    write_manifest(
        run / "set_a" / "manifest.jsonl",
        [IdentityRecord(r.path, r.identity, source="synthetic") for r in real],
    )

    spec = {"real": "real", "sets": {"A": "gen_a", "B": "gen_b"}, "identities": 2, "per_cell": 1}
    section = samples(ctx, spec)
    assert section.data["not_finished"] == ["B"] and (tmp_path / "out" / section.data["figure"]).is_file()
    assert "![real | A](" in section.body and "Not finished yet, so not shown: B." in section.body
    from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net

    torch_net = EmbeddingNet("test_resnet").eval()
    save_embedding_net(torch_net, run / "rec", input_size=[16, 16], mean=[0.5] * 3, std=[0.5] * 3)
    (run / "ext").mkdir()
    (run / "ext" / "stage.json").write_text(json.dumps({"name": "ext", "export": str(run / "rec")}))
    ctx.results["ext"] = StageResult.from_marker(run / "ext")
    ctx.stage_names.append("ext")
    section = features(ctx, {**spec, "extractor": "ext"})
    assert section.data["not_finished"] == ["B"] and "not shown: B." in section.body
    with pytest.raises(KeyError, match="no set has finished"):
        samples(ctx, {**spec, "sets": {"B": "gen_b"}})
    with pytest.raises(KeyError, match="no stage 'gen_c'"):
        samples(ctx, {**spec, "sets": {"A": "gen_a", "C": "gen_c"}})


def test_coverage_section_splits_the_gain_into_gained_and_taken(tmp_path: Path, toy_faces: str):
    """The coverage section: copies of the held-out images under their own identities gain every query the
    training images miss and take none; the same copies under a shifted identity take every query the
    training images had right; the table shows both parts."""
    from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net
    from rgsd_lightning.data import IdentityRecord, write_manifest
    from rgsd_lightning.pipeline.runner import StageResult
    from rgsd_lightning.report.sections import RunContext, coverage

    run = tmp_path / "run"
    data = {"class_path": "rgsd_lightning.IdentityDataModule", "init_args": {"root": toy_faces}}
    data["init_args"].update(
        format="toy_faces", task="face", image_size=16, face_size=16, train_per_identity=2
    )
    net = EmbeddingNet("test_resnet").eval()
    save_embedding_net(net, run / "rec", input_size=[16, 16], mean=[0.5] * 3, std=[0.5] * 3)
    (run / "real").mkdir(parents=True)
    (run / "real" / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    (run / "real" / "stage.json").write_text(json.dumps({"name": "real", "export": str(run / "rec")}))
    results = {"real": StageResult.from_marker(run / "real")}
    ctx = RunContext(run, ["real", "right", "wrong"], results, tmp_path / "out", "x")
    heldout = ctx.datamodule("real").heldout_records()
    names = sorted({r.identity for r in heldout})
    shift = dict(zip(names, names[1:] + names[:1], strict=True))
    for stage, relabel in (("right", False), ("wrong", True)):
        records = [
            IdentityRecord(r.path, shift[r.identity] if relabel else r.identity, source="synthetic")
            for r in heldout
        ]
        write_manifest(run / f"set_{stage}" / "manifest.jsonl", records)
        (run / stage).mkdir()
        (run / stage / "stage.json").write_text(
            json.dumps({"name": stage, "output": str(run / f"set_{stage}")})
        )
        ctx.results[stage] = StageResult.from_marker(run / stage)

    section = coverage(ctx, {"extractor": "real", "sets": {"R": "right", "W": "wrong"}})
    right, wrong = section.data["sets"]["R"], section.data["sets"]["W"]
    before = right["before"]
    assert 0.0 < before < 1.0
    assert right == pytest.approx(
        {
            "before": before,
            "after": 1.0,
            "gain": 1 - before,
            "gained": 1 - before,
            "taken": 0.0,
            "num_images": len(heldout),
        }
    )
    assert wrong["after"] == pytest.approx(0.0) and wrong["taken"] == pytest.approx(before)
    assert wrong["gained"] == pytest.approx(0.0)
    assert "| gained | taken | gain (points) |" in section.body
    assert f"| {-100 * before:+.1f} | {-100 * before:+.1f} |" in section.body  # W: taken and gain
