"""``--ckpt_path`` only resumes the same stage (issue 14 case 1): the CLI refuses another stage's checkpoint
before anything runs or writes, and the configured options win over the checkpoint's (listed in a warning)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rgsd_lightning.cli import build_cli, main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TOY = {"num_train_ids": 6, "num_test_ids": 4, "images_per_id": 6, "num_cameras": 3, "num_distractors": 4}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
COLD = "rgsd_lightning.modules.cold_start.ColdStartDiT"
RL = "rgsd_lightning.modules.reward_dpok.RewardDPOK"


def _config(recipe: str, folder: Path, data_root: Path, **model: Any) -> Path:
    """The toy recipe at tiny size, run in ``folder`` (checkpoints in folder/checkpoints, exports below)."""
    config = copy.deepcopy(yaml.safe_load((EXPERIMENTS / "toy" / recipe).read_text()))
    config["trainer"].update(QUIET, default_root_dir=str(folder))
    callbacks = []
    for cb in config["trainer"].get("callbacks") or []:
        init = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("ExportArtifact"):
            init["dirpath"] = str(folder / "export")
        elif cb["class_path"].endswith("SyntheticSetWriter"):
            init["output_dir"] = str(folder / "synthetic")
        elif cb["class_path"].endswith("ModelCheckpoint"):
            continue
        callbacks.append(cb)
    callbacks.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(folder / "checkpoints"), "save_last": True},
        }
    )
    config["trainer"]["callbacks"] = callbacks
    data = config["data"]["init_args"]
    data.update(root=str(data_root), toy=dict(TOY), num_workers=0)
    if data["task"] == "reid":
        data.update(height=16, width=8, p=3, k=2, pad=0)
    else:
        data.update(image_size=8)
    init = config["model"]["init_args"]
    if config["model"]["class_path"] == COLD:
        init.update(pretrained=None, preset="tiny", image_size=8, warmup_steps=0)
        init["grid"] = {**init.get("grid", {}), "identities": 0}
    init.update(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fit(config: Path, *extra: str) -> None:
    main(["fit", "--config", str(config), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny cold start (2 steps, exported) and a tiny ReID baseline (1 epoch), each with last.ckpt."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "toy"
    _fit(_config("cold_start.yaml", root / "cold", data), "--trainer.max_steps", "2")
    _fit(_config("reid_baseline.yaml", root / "reid", data), "--trainer.max_epochs", "1")
    return {
        "root": root,
        "data": data,
        "cold_ckpt": root / "cold" / "checkpoints" / "last.ckpt",
        "cold_export": root / "cold" / "export",
        "reid_ckpt": root / "reid" / "checkpoints" / "last.ckpt",
    }


def _fake_checkpoint(path: Path, hparams: dict[str, Any]) -> Path:
    """A checkpoint with only hyper-parameters: enough for the checks, which run before any weight loads."""
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return path


def _nothing_written(folder: Path) -> bool:
    return not any(p.is_file() for p in folder.rglob("*")) if folder.exists() else True


def test_checkpoint_of_another_stage_is_refused_naming_both(runs):
    root, data = runs["root"], runs["data"]
    # cold-start config + a ReID checkpoint (used to train a LookaheadReID on generator data, rc 0)
    cold = _config("cold_start.yaml", root / "cold_again", data)
    with pytest.raises(ValueError, match=r"checkpoint of LookaheadReID .* but the config runs ColdStartDiT"):
        _fit(cold, "--ckpt_path", str(runs["reid_ckpt"]))
    assert _nothing_written(root / "cold_again")
    # a predict config + a cold-start checkpoint (used to generate the set with ColdStartDiT)
    gen = _config("generate.yaml", root / "gen", data, export=str(runs["cold_export"]))
    with pytest.raises(ValueError, match=r"of ColdStartDiT .* but the config runs SyntheticGenerator"):
        main(["predict", "--config", str(gen), "--ckpt_path", str(runs["cold_ckpt"])])
    assert _nothing_written(root / "gen")
    # RL config + a cold-start checkpoint (used to die with a raw KeyError: 'image')
    rl = _config("reward_dpok.yaml", root / "rl", data, generator=str(runs["cold_export"]))
    with pytest.raises(ValueError, match=r"checkpoint of ColdStartDiT .* but the config runs RewardDPOK"):
        _fit(rl, "--ckpt_path", str(runs["cold_ckpt"]))
    # cold-start config + an RL checkpoint (used to write a RewardDPOK into the cold-start export folder)
    fake_rl = _fake_checkpoint(root / "rl.ckpt", {"_class_path": RL, "num_identities": 6, "generator": "x"})
    with pytest.raises(ValueError, match=r"checkpoint of RewardDPOK .* but the config runs ColdStartDiT"):
        _fit(cold, "--ckpt_path", str(fake_rl))
    assert _nothing_written(root / "cold_again")
    # a checkpoint written from Python (no class path): told apart by its argument names
    plain = _fake_checkpoint(root / "plain.ckpt", {"num_identities": 6, "architecture": "resnet50"})
    with pytest.raises(ValueError, match=r"\[.architecture.\] that ColdStartDiT does not take"):
        _fit(cold, "--ckpt_path", str(plain))


def test_checkpoint_of_another_export_or_identity_count_is_refused(runs):
    root, data = runs["root"], runs["data"]
    rl = _config("reward_dpok.yaml", root / "rl2", data, generator=str(runs["cold_export"]))
    other = _fake_checkpoint(
        root / "rl_other.ckpt", {"_class_path": RL, "num_identities": 6, "generator": str(root / "other")}
    )
    with pytest.raises(ValueError, match=r"trained from generator=.*other.* but the config names generator="):
        _fit(rl, "--ckpt_path", str(other))
    assert _nothing_written(root / "rl2")
    # the same cold start on a toy set of 5 identities: refused once the data says how many there are
    fewer = _config("cold_start.yaml", root / "cold5", root / "toy5")
    text = fewer.read_text().replace("num_train_ids: 6", "num_train_ids: 5")
    fewer.write_text(text)
    with pytest.raises(ValueError, match="was trained on 6 identities but the configured data has 5"):
        _fit(fewer, "--ckpt_path", str(runs["cold_ckpt"]))
    assert not (root / "cold5" / "checkpoints").exists() and not (root / "cold5" / "export").exists()


def test_resume_uses_the_configured_options_and_lists_the_edited_ones(runs):
    """The config wins over the checkpoint's hyper-parameters (LightningCLI's default is the reverse)."""
    root = runs["root"]
    config = _config(
        "cold_start.yaml",
        root / "cold_edit",
        runs["data"],
        grid={"identities": 0, "samples": 2},
        sampler={"steps": 7},
    )
    args = ["fit", "--config", str(config), "--ckpt_path", str(runs["cold_ckpt"]), "--trainer.max_steps", "3"]
    edited = r"grid.samples: 4 \(checkpoint\) -> 2 \(config\); sampler.steps: \d+ \(checkpoint\) -> 7 "
    with pytest.warns(UserWarning, match=edited):
        cli = build_cli(args)
    assert cli.model.grid.samples == 2 and cli.model.sampler.steps == 7
    assert cli.trainer.global_step == 3  # resumed at step 2: one more step
