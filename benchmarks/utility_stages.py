"""Stage configs of the utility study (LightningCLI dicts for ``rgsd_lightning.pipeline``).

Stage names are ``prior`` and ``judge`` (shared by the whole study), then ``<setting>_<what>`` per shot
setting (``k1_cold``, ``k3_rl_full``, ``k1_real_s0``...; ``all_`` for ReID, which trains on every image).
What is shared, and why:

* ``prior`` - pre-trained once per study (it never sees the target);
* ``judge`` - trained once per target on ALL its real images (it only scores generator quality);
* per shot setting, the generators (cold start, each RL variant) and their synthetic sets are built once
  and shared by every seed and every row that uses them: the seeds vary the downstream recognizer only
  (its initialisation, batch order and augmentation), so the ± spread is recognizer noise;
* the reward's feature extractor (and the privacy audit's feature space) is the ``real`` row's recognizer
  of the first seed (the paper's "Base" recognizer, trained on the scarce real data only).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from benchmarks.utility_config import REWARD_VARIANTS, ROWS, StudyConfig
from rgsd_lightning.data import sources
from rgsd_lightning.data.records import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.pipeline import Stage

DM = "rgsd_lightning.data.datamodule.IdentityDataModule"
EXPORT = {"class_path": "rgsd_lightning.callbacks.export.ExportArtifact"}
WRITER = "rgsd_lightning.callbacks.writer.SyntheticSetWriter"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
PAIRS_NAME = "heldout"  # the verification set's name: metrics arrive as test/heldout/accuracy


def _checkpoint_every(steps: int) -> dict[str, Any]:
    """A ``last.ckpt`` every ``steps`` optimizer steps, so an interrupted long stage resumes mid-way."""
    init = {"every_n_train_steps": max(1, steps), "save_last": True, "save_top_k": 0}
    return {"class_path": CHECKPOINT, "init_args": init}


def setting_label(shot: int | None) -> str:
    """Stage-name prefix of a shot setting: ``k3`` for 3 images per identity, ``all`` for every image."""
    return "all" if shot is None else f"k{int(shot)}"


def _trainer(**kw: Any) -> dict[str, Any]:
    base = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": 1_000_000,
    }
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------ data
def write_prior_manifest(cfg: StudyConfig, path: Path) -> Path:
    """The prior's training images as a manifest (exclusions applied, every record ``train``)."""
    spec, fmt = cfg.prior, cfg.prior.format
    if fmt == "identity_folders":
        records = sources.read_identity_folders(spec.path)
    elif fmt == "unlabelled":
        records = sources.read_unlabelled_images(spec.path)
    elif fmt == "market1501":
        records = sources.read_market1501(spec.path)["train"]
    else:
        manifest = Path(spec.path)
        records = read_manifest(manifest / "manifest.jsonl" if manifest.is_dir() else manifest)
    kept = [
        IdentityRecord(r.path, r.identity, r.camera, "real", "train")
        for r in records
        if not any(fnmatch.fnmatch(Path(r.path).name, pattern) for pattern in spec.exclude)
    ]
    if not kept:
        raise ValueError(f"prior {spec.path}: no images left after excluding {spec.exclude}")
    return write_manifest(path, kept)


def target_records(cfg: StudyConfig, shot: int | None) -> dict[str, list[IdentityRecord]]:
    """The target's records by split for a shot setting (``train`` = the scarce training images)."""
    spec = cfg.target
    if spec.format == "market1501":
        return sources.read_market1501(spec.path)
    records = sources.read_identity_folders(spec.path, train_per_identity=shot, seed=spec.split_seed)
    out: dict[str, list[IdentityRecord]] = {}
    for r in records:
        out.setdefault(r.split, []).append(r)
    return out


def make_pair_file(cfg: StudyConfig, shot: int, path: Path) -> Path:
    """The fixed verification pair list of a shot setting, drawn from its held-out images (seed 0)."""
    if path.is_file():
        return path
    held = target_records(cfg, shot).get("test", [])
    if not held:
        raise ValueError(f"target {cfg.target.path}: no held-out images for the {shot}-shot setting")
    sources.save_pairs(path, sources.make_pairs(held, num_pairs=cfg.num_pairs, seed=0, name=PAIRS_NAME))
    return path


def target_data(
    cfg: StudyConfig, shot: int | None, task: str, *, all_images: bool = False, **extra: Any
) -> dict[str, Any]:
    """The IdentityDataModule block for the target (a shot setting, or every image with ``all_images``)."""
    rec = cfg.recognizer
    args: dict[str, Any] = {
        "root": cfg.target.path,
        "format": cfg.target.format,
        "task": task,
        "channels": cfg.channels,
        "image_size": cfg.image_size,
        "batch_size": 64,
    }
    if cfg.target.format == "identity_folders" and not all_images:
        args["train_per_identity"] = shot
        args["split_seed"] = cfg.target.split_seed
    elif cfg.target.format == "market1501" and shot is not None and not all_images:
        args["max_train_per_identity"] = shot
    if cfg.task == "face":
        args["face_size"] = int(rec.input_size[0])
    else:
        args.update(
            height=int(rec.input_size[0]), width=int(rec.input_size[1]), pad=max(1, rec.input_size[1] // 16)
        )
    args.update(extra)
    return {"class_path": DM, "init_args": args}


# ---------------------------------------------------------------------------------------- generators
def prior_stage(cfg: StudyConfig, manifest: Path) -> Stage:
    """Pre-train the prior DiT from scratch on the prior dataset (all parameters)."""
    s = cfg.prior_stage
    config = {
        "seed_everything": 0,
        "trainer": _trainer(
            max_steps=s.steps, gradient_clip_val=1.0, callbacks=[EXPORT, _checkpoint_every(500)]
        ),
        "model": {
            "class_path": "rgsd_lightning.modules.cold_start.ColdStartDiT",
            "init_args": {
                "preset": s.preset,
                "trainable": "all",
                "image_size": cfg.image_size,
                "channels": cfg.channels,
                "lr": s.lr,
                "warmup_steps": min(s.warmup_steps, max(1, s.steps // 5)),
                "ema_decay": s.ema_decay,
                "grid_identities": 0,
            },
        },
        "data": {
            "class_path": DM,
            "init_args": {
                "root": str(manifest),
                "format": "manifest",
                "task": "generator",
                "image_size": cfg.image_size,
                "channels": cfg.channels,
                "batch_size": s.batch_size,
                "generator_val_fraction": 0.0,
            },
        },
    }
    return Stage("prior", config, describe="pre-train the prior DiT on the prior dataset (shared)")


def cold_stage(cfg: StudyConfig, shot: int | None) -> Stage:
    """Cold start: the prior's label table swapped for the target identities, then fine-tuned."""
    s = cfg.cold
    config = {
        "seed_everything": 0,
        "trainer": _trainer(
            max_steps=s.steps, gradient_clip_val=1.0, callbacks=[EXPORT, _checkpoint_every(500)]
        ),
        "model": {
            "class_path": "rgsd_lightning.modules.cold_start.ColdStartDiT",
            "init_args": {
                "pretrained": "${prior.export}",
                "trainable": s.trainable,
                "init_rows": "null",
                "image_size": cfg.image_size,
                "channels": cfg.channels,
                "lr": s.lr,
                "table_lr": s.table_lr,
                "ema_decay": s.ema_decay,
                "grid_identities": 0,
            },
        },
        "data": target_data(cfg, shot, "generator", batch_size=s.batch_size, generator_val_fraction=0.0),
    }
    name = f"{setting_label(shot)}_cold"
    return Stage(name, config, describe="cold start on the target identities")


def rl_stage(cfg: StudyConfig, shot: int | None, variant: str) -> Stage:
    """RewardDPOK from the cold start with the reward lambdas of ``variant`` (an ablation step)."""
    s, label = cfg.rl, setting_label(shot)
    config = {
        "seed_everything": 0,
        "trainer": _trainer(max_epochs=1, log_every_n_steps=1, callbacks=[EXPORT]),
        "model": {
            "class_path": "rgsd_lightning.modules.reward_dpok.RewardDPOK",
            "init_args": {
                "generator": f"${{{label}_cold.export}}",
                "reward_extractor": f"${{{label}_real_s{cfg.seeds[0]}.export}}",
                "reward_lambdas": list(REWARD_VARIANTS[variant]),
                "samples_per_identity": s.samples_per_identity,
                "sample_steps": s.sample_steps,
                "guidance_scale": s.guidance_scale,
                "lr": s.lr,
                "ratio_clip": s.ratio_clip,
                "reward_weight": s.reward_weight,
                "kl_weight": s.kl_weight,
                "policy_steps": s.policy_steps,
                "micro_batch": s.micro_batch,
                "grad_accum": s.grad_accum,
                "timestep_fraction": s.timestep_fraction,
                "grid_every_n_steps": 0,
            },
        },
        "data": target_data(cfg, shot, "rl", p=s.identities, batches_per_epoch=s.rollouts),
    }
    return Stage(f"{label}_{variant}", config, describe=f"RewardDPOK, lambdas {REWARD_VARIANTS[variant]}")


def generate_stage(cfg: StudyConfig, shot: int | None, generator_set: str) -> Stage:
    """Generate (and audit) the synthetic set of a generator; reward components go into its manifest."""
    s, label = cfg.generate, setting_label(shot)
    baseline = f"${{{label}_real_s{cfg.seeds[0]}.export}}"
    writer = {
        "class_path": WRITER,
        "init_args": {"output_dir": "set by the pipeline", "audit_extractor": baseline},
    }
    config = {
        "seed_everything": 0,
        "trainer": _trainer(callbacks=[writer]),
        "model": {
            "class_path": "rgsd_lightning.modules.generate.SyntheticGenerator",
            "init_args": {
                "export": f"${{{label}_{generator_set}.export}}",
                "sample_steps": s.sample_steps,
                "guidance_scale": s.guidance_scale,
                "reward_extractor": baseline,
            },
        },
        "data": target_data(
            cfg, shot, "generator", generate_per_identity=s.per_identity, batch_size=s.batch_size
        ),
    }
    return Stage(
        f"{label}_gen_{generator_set}", config, "predict", describe=f"generate the {generator_set} set"
    )


# --------------------------------------------------------------------------------------- recognizers
def _recognizer_model(cfg: StudyConfig, selection: bool, steps: int) -> dict[str, Any]:
    rec = cfg.recognizer
    common = {
        "architecture": rec.architecture,
        "in_chans": cfg.channels,
        "embedding_dim": rec.embedding_dim,
        "lr": rec.lr,
        "warmup_epochs": max(1, steps // 10),
        "milestones": [int(steps * 0.7), int(steps * 0.9)],
        "schedule_interval": "step",
        "selection": {
            "enabled": selection,
            "keep_ratio": rec.selection_keep_ratio,
            "lr": rec.selection_lr,
            "scope": rec.selection_scope,
        },
    }
    common.update(rec.model_kwargs)
    if cfg.task == "face":
        return {"class_path": "rgsd_lightning.modules.cosface.CosFaceRecognizer", "init_args": common}
    common.setdefault("warmup_factor", 0.1)
    return {"class_path": "rgsd_lightning.modules.lookahead_reid.LookaheadReID", "init_args": common}


def _recognizer_config(
    cfg: StudyConfig, data: dict[str, Any], *, seed: int, steps: int, selection: bool
) -> dict[str, Any]:
    rec = cfg.recognizer
    epochs = max(1, steps // rec.batches_per_epoch)
    return {
        "seed_everything": seed,
        "trainer": _trainer(max_epochs=epochs, log_every_n_steps=rec.batches_per_epoch, callbacks=[EXPORT]),
        "model": _recognizer_model(cfg, selection, epochs * rec.batches_per_epoch),
        "data": data,
    }


def recognizer_stage(
    cfg: StudyConfig,
    shot: int | None,
    row: str,
    seed: int,
    *,
    pairs: Path | None,
    synthetic: str | None = None,
    selection: bool | None = None,
) -> Stage:
    """One downstream recognizer: a row of the table for one seed.

    Args:
        cfg: the study.
        shot: the shot setting.
        row: row key (a key of ``ROWS`` or ``ext_<name>``).
        seed: recognizer seed (model init, P x K sampling, augmentation).
        pairs: the setting's verification pair file (faces).
        synthetic: a synthetic set reference (``${k1_gen_cold.output}`` or a folder), None for real only.
        selection: lookahead selection on (default: the row's setting).
    """
    rec = cfg.recognizer
    spec = ROWS.get(row)
    selection = bool(spec.selection if selection is None and spec else selection)
    extra: dict[str, Any] = {
        "p": rec.p,
        "k": rec.k,
        "batches_per_epoch": rec.batches_per_epoch,
        "random_erasing": rec.erasing if spec is not None and spec.erasing else 0.0,
        "synthetic": [synthetic] if synthetic else [],
        "synthetic_fraction": rec.synthetic_fraction,
        "unknown_synthetic": "drop",
        "seed": seed,
    }
    if cfg.task == "face":
        extra["verification"] = [{"kind": "pairs", "path": str(pairs), "name": PAIRS_NAME}]
    data = target_data(cfg, shot, cfg.task, **extra)
    config = _recognizer_config(cfg, data, seed=seed, steps=rec.steps, selection=selection)
    name = f"{setting_label(shot)}_{row}_s{seed}"
    return Stage(name, config, test=cfg.task == "face", describe=f"downstream {row}, seed {seed}")


def judge_stage(cfg: StudyConfig, pairs: Path | None) -> Stage:
    """The judge: a recognizer trained on ALL real images of the target identities (quality metrics only)."""
    rec = cfg.recognizer
    extra: dict[str, Any] = {"p": rec.p, "k": rec.k, "batches_per_epoch": rec.batches_per_epoch, "seed": 0}
    if cfg.task == "face":
        extra["verification"] = [{"kind": "pairs", "path": str(pairs), "name": PAIRS_NAME}]
    data = target_data(cfg, None, cfg.task, all_images=True, **extra)
    config = _recognizer_config(cfg, data, seed=0, steps=rec.judge_steps, selection=False)
    return Stage("judge", config, describe="judge recognizer on every real image of the target (shared)")


def row_stages(
    cfg: StudyConfig, shot: int | None, pairs: Path | None, externals: dict[str, Path]
) -> list[Stage]:
    """Every stage of one shot setting, in run order (baseline first: the reward needs it)."""
    label = setting_label(shot)
    stages = [recognizer_stage(cfg, shot, "real", seed, pairs=pairs) for seed in cfg.seeds]
    if "erasing" in cfg.rows:
        stages += [recognizer_stage(cfg, shot, "erasing", seed, pairs=pairs) for seed in cfg.seeds]
    sets = cfg.generator_sets()
    if sets:
        stages.append(cold_stage(cfg, shot))
    for generator_set in sets:
        if generator_set != "cold":
            stages.append(rl_stage(cfg, shot, generator_set))
        stages.append(generate_stage(cfg, shot, generator_set))
        for row in [r for r in ROWS if r in cfg.rows and ROWS[r].synthetic == generator_set]:
            ref = f"${{{label}_gen_{generator_set}.output}}"
            stages += [recognizer_stage(cfg, shot, row, s, pairs=pairs, synthetic=ref) for s in cfg.seeds]
    for ext in cfg.external:
        folder = str(externals[ext.name])
        stages += [
            recognizer_stage(
                cfg, shot, f"ext_{ext.name}", s, pairs=pairs, synthetic=folder, selection=ext.selection
            )
            for s in cfg.seeds
        ]
    return stages
