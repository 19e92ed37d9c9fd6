"""Config groups: validation, hyper-parameters as plain dicts, YAML mappings, checkpoints through the CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import quiet_trainer

from rgsd_lightning import ColdStartDiT, IdentityDataModule
from rgsd_lightning.cli import build_cli, main
from rgsd_lightning.modules.config import (
    EmbeddingNetConfig,
    GridConfig,
    LoRAConfig,
    PolicyGradientConfig,
    RewardConfig,
    SamplerConfig,
    UpdateConfig,
    as_config,
    plain,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_groups_validate_and_name_the_field():
    with pytest.raises(ValueError, match="sampler.method"):
        SamplerConfig(method="euler")
    with pytest.raises(ValueError, match="sampler.steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="sampler.eta"):
        SamplerConfig(eta=-0.5)
    with pytest.raises(ValueError, match="reward.lambdas"):
        RewardConfig(lambdas=(1.0, 2.0))
    with pytest.raises(ValueError, match="reward.credit"):
        RewardConfig(credit="shapley")
    with pytest.raises(ValueError, match="reward.tau_floor must be positive"):
        RewardConfig(tau_floor=0.0)
    with pytest.raises(ValueError, match="reward.tau or reward.tau_floor, not both"):
        RewardConfig(tau=1.0, tau_floor=0.5)
    with pytest.raises(ValueError, match="objective.kl_form"):
        PolicyGradientConfig(kl_form="reverse")
    with pytest.raises(ValueError, match="update.timestep_fraction"):
        UpdateConfig(timestep_fraction=0.0)
    with pytest.raises(ValueError, match="grid.samples"):
        GridConfig(samples=-1)
    with pytest.raises(ValueError, match=r"sampler: unknown keys \['step'\]"):
        as_config(SamplerConfig, {"step": 3}, "sampler")
    with pytest.raises(TypeError, match="sampler must be a SamplerConfig"):
        as_config(SamplerConfig, 3, "sampler")
    assert as_config(SamplerConfig, {"steps": 3}, "sampler") == SamplerConfig(steps=3)
    assert RewardConfig(lambdas=[1, 0, 0]).lambdas == (1.0, 0.0, 0.0)  # lists from YAML become tuples


def test_plain_form_is_safe_yaml_and_weights_only_and_rebuilds(tmp_path):
    groups = {
        "sampler": SamplerConfig(method="ddpm", steps=7),
        "reward": RewardConfig(sigma=0.3),
        "lora": LoRAConfig(rank=2),
        "net": EmbeddingNetConfig("test_resnet", timm_kwargs={"img_size": (16, 8)}),
    }
    hp = plain(groups)
    assert hp["lora"]["targets"] == ["to_q", "to_k", "to_v", "to_out.0"]  # tuples become lists
    assert hp["net"]["timm_kwargs"] == {"img_size": [16, 8]}
    assert yaml.safe_load(yaml.safe_dump(hp)) == hp  # no python/object or python/tuple tags needed
    torch.save({"hyper_parameters": hp}, tmp_path / "x.ckpt")
    assert torch.load(tmp_path / "x.ckpt", weights_only=True)["hyper_parameters"] == hp
    for name, cfg in groups.items():
        rebuilt = as_config(type(cfg), hp[name], name)
        assert plain(rebuilt) == hp[name]


def test_grid_every_n_steps_is_rejected_where_grids_follow_another_schedule():
    with pytest.raises(ValueError, match="ColdStartDiT draws its grid at every validation"):
        ColdStartDiT(4, preset="tiny", image_size=8, grid=GridConfig(every_n_steps=5))


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_partial_yaml_mapping_keeps_the_module_defaults(capsys):
    rl = _print_config(["fit", "--config", str(EXPERIMENTS / "toy" / "reward_dpok.yaml")], capsys)
    args = rl["model"]["init_args"]
    # the YAML names steps, eta and guidance_scale; the method is RewardDPOK's default
    assert args["sampler"] == {
        "method": "ddim",
        "steps": 20,
        "guidance_scale": 2.0,
        "eta": 1.0,
        "clip_x0": None,
    }
    assert args["objective"]["ratio_clip"] == 0.05 and args["objective"]["ratio_check_tol"] == 1e-4
    assert args["grid"] == {"identities": 8, "samples": 4, "seed": 0, "every_n_steps": 10}
    gen = _print_config(
        [
            "predict",
            "--config",
            str(EXPERIMENTS / "toy" / "generate.yaml"),
            "--model.init_args.sampler.steps",
            "7",
        ],
        capsys,
    )
    assert gen["model"]["init_args"]["sampler"] == {
        "method": "dpmsolver",
        "steps": 7,
        "guidance_scale": 2.0,
        "eta": 0.0,
        "clip_x0": None,
    }
    assert gen["model"]["init_args"]["grid"]["identities"] == 0  # SyntheticGenerator's default: no grid


COLD_START = """
model:
  class_path: rgsd_lightning.modules.cold_start.ColdStartDiT
  init_args:
    preset: tiny
    image_size: 8
    trainable: all
    lr: 1.0e-3
    sampler: {steps: 3, guidance_scale: 1.5}
    grid: {identities: 0}
    reward: {lambdas: [1.0, 0.5, 0.0], credit: group}
data:
  class_path: rgsd_lightning.data.datamodule.IdentityDataModule
  init_args: {root: ROOT, format: toy_market, task: generator, image_size: 8, batch_size: 8}
"""
REID = """
model:
  class_path: rgsd_lightning.modules.lookahead_reid.LookaheadReID
  init_args:
    net: {architecture: test_resnet, embedding_dim: 16}
    lr: 1.0e-3
    lr_scheduler: null
    selection: {enabled: false}
data:
  class_path: rgsd_lightning.data.datamodule.IdentityDataModule
  init_args:
    {root: ROOT, format: toy_market, task: reid, height: 32, width: 16, p: 3, k: 2, batches_per_epoch: 3}
"""
TRAINER = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  num_sanity_val_steps: 0
  limit_val_batches: 0
  logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: OUT}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: OUT/ckpt, save_last: true}
"""


def _groups(model) -> dict:
    if isinstance(model, ColdStartDiT):
        return {"sampler": model.sampler, "grid": model.grid, "reward": model.reward_config}
    return {"net": model.net_config, "selection": model.selection}


@pytest.mark.parametrize("stage", [COLD_START, REID], ids=["cold_start", "reid"])
def test_nested_groups_survive_cli_fit_checkpoint_and_resume(stage, toy_market, tmp_path):
    config = tmp_path / "stage.yaml"
    config.write_text((TRAINER + stage).replace("ROOT", toy_market).replace("OUT", str(tmp_path)))
    first = build_cli(["fit", "--config", str(config), *QUIET])
    assert first.trainer.global_step == 2
    groups = _groups(first.model)
    run = Path(first.trainer.log_dir)
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())  # readable without python tags
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for name, cfg in groups.items():
        assert hparams[name] == plain(cfg)
        assert {k: v for k, v in saved["model"]["init_args"][name].items()} == plain(cfg)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # what LightningCLI does
    assert {name: ckpt["hyper_parameters"][name] for name in groups} == plain(groups)

    resumed = build_cli(
        ["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), *QUIET]
        + ["--trainer.max_steps", "4"]
    )
    assert resumed.trainer.global_step == 4
    assert _groups(resumed.model) == groups  # rebuilt as dataclasses from the checkpoint's plain dicts


def test_python_built_checkpoint_stores_plain_groups_and_rebuilds_them(toy_market, tmp_path):
    """A module built in Python holds dataclass instances; hparams.yaml and the checkpoint get plain dicts.

    (LightningCLI cannot resume a Python-built checkpoint in subclass mode whatever its hyper-parameters: it
    has no ``_class_path``. ``torch.load(weights_only=True)`` is the step a dataclass would break.)
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    dm = IdentityDataModule(
        root=toy_market, format="toy_market", task="generator", image_size=8, batch_size=8
    )
    sampler = SamplerConfig(steps=3, guidance_scale=1.5)
    reward = RewardConfig(lambdas=(1.0, 0.5, 0.0), credit="group")
    grid = GridConfig(identities=0)
    args = dict(
        preset="tiny", image_size=8, trainable="all", lr=1e-3, sampler=sampler, reward=reward, grid=grid
    )

    def trainer(steps):
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
        logger = CSVLogger(str(tmp_path))
        return quiet_trainer(
            tmp_path, max_steps=steps, logger=logger, callbacks=[ckpt], enable_checkpointing=True,
            num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip

    first = trainer(2)
    first.fit(ColdStartDiT(dm.num_identities, **args), dm)
    hparams = yaml.safe_load((Path(first.log_dir) / "hparams.yaml").read_text())
    assert hparams["sampler"] == plain(sampler) and hparams["reward"]["lambdas"] == [1.0, 0.5, 0.0]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["hyper_parameters"]["grid"] == plain(grid)
    loaded = ColdStartDiT.load_from_checkpoint(last)
    assert (loaded.sampler, loaded.reward_config, loaded.grid) == (sampler, reward, grid)
    resumed, again = ColdStartDiT(dm.num_identities, **args), trainer(4)
    again.fit(resumed, dm, ckpt_path=str(last))
    assert again.global_step == 4
