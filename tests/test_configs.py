"""Every shipped YAML parses; the toy generator recipes run end to end through the `rgsd` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rgsd_lightning.cli import main
from rgsd_lightning.pipeline import load_pipeline, substitute

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STAGE_YAMLS = sorted(p for p in EXPERIMENTS.glob("*/*.yaml") if p.name != "pipeline.yaml")
PIPELINES = sorted(EXPERIMENTS.glob("*/pipeline.yaml"))


def _subcommand(path: Path) -> str:
    model = yaml.safe_load(path.read_text())["model"]["class_path"]
    return "predict" if model.endswith("SyntheticGenerator") else "fit"


@pytest.mark.parametrize("config", STAGE_YAMLS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_stage_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main([_subcommand(config), "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("rgsd_lightning.modules.")
    assert printed["trainer"]["use_distributed_sampler"] is False  # the CLI default: we shard ourselves


def test_every_dataset_has_the_paper_stages():
    for dataset in ("market1501", "cuhk03np", "casia"):
        names = {p.name for p in (EXPERIMENTS / dataset).glob("*.yaml")}
        assert {"cold_start.yaml", "reward_dpok.yaml", "generate.yaml", "pipeline.yaml"} <= names, dataset
    market = yaml.safe_load((EXPERIMENTS / "market1501" / "reward_dpok.yaml").read_text())["model"][
        "init_args"
    ]
    assert market["lr"] == 1e-5 and market["reward_lambdas"] == [1.0, 0.75, 0.25]  # paper §5.1


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_pipeline_yaml_loads_and_wires_stages(pipeline, monkeypatch):
    monkeypatch.chdir(EXPERIMENTS.parent)
    output, stages = load_pipeline(pipeline)
    spec = yaml.safe_load(pipeline.read_text())
    assert set(spec["paths"]) == {"data_root", "backbone_weights"}  # the two things a user fills in
    names = [s.name for s in stages]
    assert names[0] == "baseline" and "reward_dpok" in names and "generate" in names
    seen: set[str] = set()
    for stage in stages:
        assert stage.config["data"]["init_args"]["root"] == spec["paths"]["data_root"]
        text = json.dumps(stage.config)
        refs = {ref.split(".")[0] for ref in text.split("${")[1:]}
        assert refs <= seen, f"{stage.name} refers to a later stage: {refs - seen}"
        seen.add(stage.name)
    fake = {
        n: {"export": f"/x/{n}/export", "output": f"/x/{n}/synthetic", "folder": f"/x/{n}"} for n in names
    }
    rl = next(s for s in stages if s.name == "reward_dpok")
    resolved = substitute(rl.config, fake)
    assert resolved["model"]["init_args"]["generator"] == "/x/cold_start/export"


TOY = "{num_train_ids: 6, num_test_ids: 4, images_per_id: 6, num_cameras: 3, num_distractors: 4}"


@pytest.mark.slow
def test_toy_generator_yamls_run_through_the_cli(tmp_path):
    """cold_start.yaml -> reward_dpok.yaml -> generate.yaml, as shipped plus size and path overrides."""
    from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net

    data = ["--data.init_args.root", str(tmp_path / "toy"), "--data.init_args.toy", TOY]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cold = tmp_path / "cold" / "export" / "generator"
    main(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "toy" / "cold_start.yaml"),
            *data,
            *quiet,
            "--trainer.max_steps",
            "10",
            "--trainer.default_root_dir",
            str(tmp_path / "cold"),
            "--trainer.callbacks.dirpath",
            str(cold),
            "--model.init_args.preset",
            "tiny",
            "--model.init_args.image_size",
            "8",
            "--data.init_args.image_size",
            "8",
        ]
    )
    assert (cold / "labels.json").is_file()
    (tmp_path / "fx").mkdir()
    save_embedding_net(
        EmbeddingNet("test_resnet"), tmp_path / "fx", input_size=(16, 8), mean=[0.5] * 3, std=[0.5] * 3
    )
    rl = tmp_path / "rl" / "export" / "generator"
    main(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "toy" / "reward_dpok.yaml"),
            *data,
            *quiet,
            "--trainer.default_root_dir",
            str(tmp_path / "rl"),
            "--model.init_args.generator",
            str(cold),
            "--model.init_args.reward_extractor",
            str(tmp_path / "fx"),
            "--data.init_args.batches_per_epoch",
            "2",
            "--data.init_args.p",
            "3",
            "--data.init_args.image_size",
            "8",
            "--model.init_args.sample_steps",
            "4",
            "--model.init_args.grid_every_n_steps",
            "1",
            "--model.init_args.grid_identities",
            "2",
            "--trainer.callbacks.dirpath",
            str(rl),
        ]
    )
    assert json.loads((rl / "provenance.json").read_text())["parent"] == str(cold)
    assert list((tmp_path / "rl").rglob("reward_curves.png")) and list(
        (tmp_path / "rl").rglob("train_samples_*.png")
    )
    out = tmp_path / "synthetic"
    main(
        [
            "predict",
            "--config",
            str(EXPERIMENTS / "toy" / "generate.yaml"),
            *data,
            *quiet,
            "--model.init_args.export",
            str(rl),
            "--trainer.default_root_dir",
            str(tmp_path / "generate"),
            "--model.init_args.sample_steps",
            "3",
            "--model.init_args.reward_extractor",
            str(tmp_path / "fx"),
            "--data.init_args.image_size",
            "8",
            "--data.init_args.generate_per_identity",
            "2",
            "--trainer.callbacks.output_dir",
            str(out),
        ]
    )
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all({"sem", "cov", "exp", "total", "sim_pixel"} <= set(r) for r in rows)
