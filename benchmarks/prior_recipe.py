"""``python -m benchmarks prior_recipe``: what makes a small from-scratch pixel DiT sample toy persons.

Every generator here is trained through the library (``ColdStartDiT`` in a Lightning ``Trainer``; only the
data comes from memory instead of an ``IdentityDataModule``) and sampled with the library's sampler.
Sections (``--sections``, each rewritten into ``<out>/prior_recipe.{json,md}`` as it finishes):

* ``overfit`` - defect check: one identity, four images; the samples must land on the training images;
* ``ingredients`` - prior variants (``--variants``) on the demo's prior data of the time of the
  measurement (toy_market seed 1, 48 identities x 8 images), each scored on its own identities by a judge
  (a convnet trained on 40 other images per identity): identity fidelity, spread syn/real, FID/KID in judge
  space, final loss, wall time;
  sampled with DDIM 50 at guidance 2, with and without x0 clipping;
* ``samplers`` - the sampler settings (DDIM/DDPM, steps, guidance, clipping) on one prior (``--sweep``);
* ``checkpoints`` - the same scores along one training run (``--run``, default the shipped prior's
  ``runs/toy/prior``: every ``checkpoints/*step=N.ckpt``), i.e. the effect of training steps;
* ``cold`` - cold starts from a prior export (``--prior``, default ``builtin:toy_prior``) on the demo's
  target (toy_market seed 0: 16 identities, 3 shots; disjoint from the prior's identities): trainable set,
  learning rate and steps, scored by a judge of the target identities, with the privacy audit's near copies.

Grids (real | samples, one identity per row) go to ``<out>/<name>/``. Trained priors and cold starts are
cached under ``--work`` (a rerun skips them). Wall times are from a shared 2-core machine. ``--quick`` runs
every section at toy sizes (10 training steps, 4-step samplers, a few identities): a smoke test
(``tests/test_benchmarks.py``), not a measurement.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import environment, md_environment, md_table
from benchmarks.toy_judge import ToyImages, ToySpec, load_or_train_judge, near_copies, quality, toy_images
from rgsd_lightning import ColdStartDiT
from rgsd_lightning.diffusion import DiTGenerator, sample
from rgsd_lightning.io import atomic_write_json, atomic_write_text, image_grid, save_png, to_uint8

PRIOR_DATA = ToySpec(seed=1, ids=48, per_id=8)  # the demo's prior data
PRIOR_JUDGE = ToySpec(seed=1, ids=48, per_id=40)
TARGET = ToySpec(seed=0, ids=16, per_id=8)  # the demo's target identities (first `SHOTS` images train)
TARGET_JUDGE = ToySpec(seed=0, ids=16, per_id=40)
SHOTS = 3
EVAL_IDS, EVAL_PER_ID = 24, 8  # prior samples scored: 24 identities x 8
QUICK_SPECS = {  # --quick: the same roles at toy sizes
    PRIOR_DATA: ToySpec(seed=1, ids=6, per_id=4),
    PRIOR_JUDGE: ToySpec(seed=1, ids=6, per_id=6),
    TARGET: ToySpec(seed=0, ids=3, per_id=4),
    TARGET_JUDGE: ToySpec(seed=0, ids=3, per_id=6),
}
QUICK_EVAL_IDS, QUICK_SAMPLE_STEPS = 3, 4

RECIPE = {  # the recommended from-scratch recipe (see the ingredients table)
    "preset": "small",
    "beta_schedule": "squaredcos_cap_v2",
    "min_snr_gamma": 5.0,
    "lr": 1e-3,
    "table_lr": 3e-2,
    "warmup_steps": 100,
    "ema_decay": 0.999,
}
DEMO = {"preset": "small", "lr": 1e-3, "table_lr": 3e-2, "warmup_steps": 100, "ema_decay": 0.999}


@dataclass(frozen=True)
class Variant:
    """One generator training run: ColdStartDiT arguments, optimizer steps, batch size, data."""

    describe: str
    model: dict[str, Any]
    steps: int
    batch_size: int = 32
    data: ToySpec = PRIOR_DATA


def _p(**kw: Any) -> dict[str, Any]:
    return {"preset_overrides": kw}


VARIANTS: dict[str, Variant] = {
    "demo_1500": Variant("today's demo prior: linear schedule, plain ε-MSE", DEMO, 1500),
    "cosine_1500": Variant("+ cosine schedule", {**DEMO, "beta_schedule": "squaredcos_cap_v2"}, 1500),
    "minsnr_1500": Variant("+ min-SNR-5 (linear schedule)", {**DEMO, "min_snr_gamma": 5.0}, 1500),
    "recipe_1500": Variant("+ cosine + min-SNR-5 (the recipe)", RECIPE, 1500),
    "linear_3k": Variant("linear schedule, plain ε-MSE", DEMO, 3000),
    "recipe_3k": Variant("cosine + min-SNR-5 (the recipe)", RECIPE, 3000),
    "recipe_w192_3k": Variant("recipe, hidden 192 (6 heads)", {**RECIPE, **_p(num_attention_heads=6)}, 3000),
    "recipe_p2_1k": Variant("recipe, patch 2 (256 tokens)", {**RECIPE, **_p(patch_size=2)}, 1000),
}

SAMPLERS: dict[str, dict[str, Any]] = {
    "ddim50_w2": dict(method="ddim", num_steps=50, guidance_scale=2.0, clip_x0=True),
    "ddim50_w2_noclip": dict(method="ddim", num_steps=50, guidance_scale=2.0, clip_x0=False),
    "ddim20_w2": dict(method="ddim", num_steps=20, guidance_scale=2.0, clip_x0=True),
    "ddim20_w2_trailing": dict(
        method="ddim", num_steps=20, guidance_scale=2.0, clip_x0=True, spacing="trailing"
    ),
    "ddim50_w2_trailing": dict(
        method="ddim", num_steps=50, guidance_scale=2.0, clip_x0=True, spacing="trailing"
    ),
    "ddpm250_w2": dict(method="ddpm", num_steps=250, guidance_scale=2.0, clip_x0=True),
    "ddim50_w1": dict(method="ddim", num_steps=50, guidance_scale=1.0, clip_x0=True),
    "ddim50_w1.5": dict(method="ddim", num_steps=50, guidance_scale=1.5, clip_x0=True),
    "ddim50_w3": dict(method="ddim", num_steps=50, guidance_scale=3.0, clip_x0=True),
    "ddim50_w4": dict(method="ddim", num_steps=50, guidance_scale=4.0, clip_x0=True),
}
MAIN_SAMPLERS = ("ddim50_w2", "ddim50_w2_noclip")


@dataclass(frozen=True)
class ColdVariant:
    """A cold start on the target: ColdStartDiT arguments and steps (``pretrained`` added from --prior)."""

    describe: str
    model: dict[str, Any]
    steps: int
    guidances: tuple[float, ...] = (2.0,)
    extra: dict[str, Any] = field(default_factory=dict)


COLD_BASE = {"init_rows": "null", "ema_decay": 0.99, "warmup_steps": 20, "min_snr_gamma": 5.0}
COLD: dict[str, ColdVariant] = {
    "table_1e-2_600": ColdVariant(
        "label table only, lr 1e-2", {**COLD_BASE, "trainable": "label_table", "lr": 1e-2}, 600
    ),
    "adaln_1e-3_600": ColdVariant(
        "table + adaLN, lr 1e-3 (table 1e-2)",
        {**COLD_BASE, "trainable": "adaln", "lr": 1e-3, "table_lr": 1e-2},
        600,
    ),
    "all_1e-4_600": ColdVariant(
        "all, lr 1e-4 (table 1e-2)", {**COLD_BASE, "trainable": "all", "lr": 1e-4, "table_lr": 1e-2}, 600
    ),
    "all_3e-4_500": ColdVariant(
        "all, lr 3e-4 (table 3e-3): today's demo",
        {**COLD_BASE, "trainable": "all", "lr": 3e-4, "table_lr": 3e-3},
        500,
        (1.0, 2.0, 3.0),
    ),
    "all_1e-4_1200": ColdVariant(
        "all, lr 1e-4 (table 1e-2), 1,200 steps",
        {**COLD_BASE, "trainable": "all", "lr": 1e-4, "table_lr": 1e-2},
        1200,
        (1.0, 2.0, 3.0),
    ),
}


# ------------------------------------------------------------------------------------------- training
class _Flipped(Dataset):
    """In-memory (image, label) pairs with a random horizontal flip (the generator's augmentation),
    cycled to at least ``min_length`` items so a tiny set still fills whole batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, min_length: int = 0) -> None:
        self.images, self.labels = images, labels
        self.length = max(len(images), min_length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = i % len(self.images)
        img = self.images[i]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return {"image": img, "label": self.labels[i]}


class _LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_generator(
    folder: Path, model_args: dict[str, Any], steps: int, batch_size: int, data: ToyImages
) -> dict[str, Any]:
    """Train ColdStartDiT on in-memory data and export it to ``folder/export`` (cached with train.json)."""
    record = folder / "train.json"
    if record.is_file() and (folder / "export" / "labels.json").is_file():
        return json.loads(record.read_text())
    L.seed_everything(0, verbose=False)
    model = ColdStartDiT(
        len(data.names),
        image_size=32,
        channels=3,
        grid={"identities": 0},
        **{"trainable": "all", **model_args},
    )
    loader = DataLoader(
        _Flipped(data.images, data.labels, min_length=batch_size),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
    )
    log = _LossLog()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[log],
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - start
    model.export(folder / "export")
    window = max(1, min(250, steps // 4))
    out = {
        "steps": steps,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "loss_first": sum(log.losses[:window]) / window,
        "loss_last": sum(log.losses[-window:]) / window,
        "loss_window": window,
        "params_m": sum(p.numel() for p in model.generator.transformer.parameters()) / 1e6,
    }
    record.write_text(json.dumps(out, indent=1))
    return out


@torch.no_grad()
def generate(gen: DiTGenerator, labels: torch.Tensor, settings: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Seeded samples (seed = request index) in batches of 96; returns images and seconds."""
    start = time.perf_counter()
    seeds = list(range(len(labels)))
    out = [
        sample(gen, labels[i : i + 96], seeds=seeds[i : i + 96], **settings).images
        for i in range(0, len(labels), 96)
    ]
    return torch.cat(out), time.perf_counter() - start


def save_grid(
    path: Path, real: ToyImages, fake: torch.Tensor, fake_labels: torch.Tensor, rows: int = 8
) -> str:
    """Grid: 3 real | 7 samples per identity, for the first ``rows`` identities; returns the file name."""
    lines = []
    for k in sorted(set(fake_labels.tolist()))[:rows]:
        lines.append(list(real.images[real.labels == k][:3]) + list(fake[fake_labels == k][:7]))
    save_png(to_uint8(image_grid(lines).unsqueeze(0))[0], path)
    return path.name


# ------------------------------------------------------------------------------------------- sections
class Report:
    """``<out>/<name>.json`` + ``.md``: results by section and entry, merged with what is on disk on every
    write (so runs of different sections or variants, also side by side, add to one report)."""

    def __init__(self, out: Path, name: str, command: str) -> None:
        self.json, self.md, self.command = out / f"{name}.json", out / f"{name}.md", command

    def add(self, section: str, key: str, entry: dict[str, Any]) -> None:
        report = json.loads(self.json.read_text()) if self.json.is_file() else {"results": {}, "commands": []}
        report["results"].setdefault(section, {})[key] = entry
        if self.command not in report["commands"]:
            report["commands"].append(self.command)
        report["environment"] = environment()
        atomic_write_json(self.json, report)
        atomic_write_text(self.md, render(report))


class Study:
    """The cached data, judges and paths of one benchmark run."""

    def __init__(self, work: Path, out: Path, report: Report, quick: bool = False) -> None:
        self.work, self.grids, self.report, self.quick = work, out / report.json.stem, report, quick
        self.grids.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, Any] = {}

    def spec(self, spec: ToySpec) -> ToySpec:
        """The data set of a role (its toy-sized stand-in with --quick)."""
        return QUICK_SPECS.get(spec, spec) if self.quick else spec

    def data(self, spec: ToySpec) -> ToyImages:
        spec = self.spec(spec)
        key = f"data{spec}"
        if key not in self._cache:
            self._cache[key] = toy_images(spec, self.work)
        return self._cache[key]

    def judge(self, spec: ToySpec):
        spec = self.spec(spec)
        key = f"judge{spec}"
        if key not in self._cache:
            path = self.work / "judges" / f"judge_s{spec.seed}_{spec.ids}x{spec.per_id}.pt"
            self._cache[key] = load_or_train_judge(self.data(spec), path, 30 if self.quick else 1500)
        return self._cache[key]

    def prior(self, name: str) -> tuple[Path, dict[str, Any]]:
        v = VARIANTS[name]
        folder = self.work / "priors" / name
        print(f"[prior_recipe] prior {name}: {v.describe}, {v.steps} steps", flush=True)
        steps = self.steps(v.steps)
        return folder / "export", fit_generator(folder, v.model, steps, v.batch_size, self.data(v.data))

    def steps(self, steps: int) -> int:
        """Optimizer steps of a run (10 with --quick)."""
        return 10 if self.quick else steps

    @property
    def eval_ids(self) -> int:
        return QUICK_EVAL_IDS if self.quick else EVAL_IDS

    def sampler(self, name: str, **changes: Any) -> dict[str, Any]:
        """``sample()`` settings of a named sampler (4 steps with --quick)."""
        settings = {**SAMPLERS[name], **changes}
        if self.quick:
            settings["num_steps"] = QUICK_SAMPLE_STEPS
        return settings

    def score_prior(self, export: Path, sampler: str, grid: str | None) -> dict[str, Any]:
        gen = DiTGenerator.from_pretrained(export)
        labels = torch.arange(self.eval_ids).repeat_interleave(EVAL_PER_ID)
        fake, seconds = generate(gen, labels, self.sampler(sampler))
        result = {
            **quality(self.judge(PRIOR_JUDGE), self.data(PRIOR_JUDGE), fake, labels),
            "sample_s": seconds,
        }
        if grid:
            result["grid"] = save_grid(self.grids / grid, self.data(PRIOR_DATA), fake, labels)
        print(f"[prior_recipe]   {sampler}: {json.dumps(result)}", flush=True)
        return result


def section_overfit(study: Study, steps: int) -> None:
    """One identity, four images: the trained generator's samples must reproduce them."""
    data = study.data(TARGET)
    keep = data.labels == 0
    one = ToyImages(data.images[keep][:4], torch.zeros(4, dtype=torch.long), data.names[:1], [])  # 4 or fewer
    model = {**RECIPE, "label_dropout": 0.0, "warmup_steps": 50, "ema_decay": None}
    folder = study.work / "overfit" / f"recipe_{steps}"
    result: dict[str, Any] = {"train": fit_generator(folder, model, study.steps(steps), 16, one)}
    result["samplers"] = {}
    gen = DiTGenerator.from_pretrained(folder / "export")
    pair = ((one.images[:, None] - one.images[None]) ** 2).mean((2, 3, 4))
    for name in ("ddim50_w2", "ddim50_w2_noclip"):
        settings = study.sampler(name, guidance_scale=1.0)
        fake, _ = generate(gen, torch.zeros(8, dtype=torch.long), settings)
        d = ((fake[:, None] - one.images[None]) ** 2).mean((2, 3, 4))
        result["samplers"][name] = {
            "nn_mse_median": float(d.min(1).values.median()),
            "nn_mse_max": float(d.min(1).values.max()),
            "train_pair_mse_min": float(pair[~torch.eye(len(one.images), dtype=torch.bool)].min()),
            "images_hit": len(set(d.argmin(1).tolist())),
            "grid": f"overfit_{steps}_{name}.png",
        }
        grid = image_grid([list(one.images), list(fake)])
        save_png(to_uint8(grid.unsqueeze(0))[0], study.grids / f"overfit_{steps}_{name}.png")
    study.report.add("overfit", f"recipe_{steps}", result)


def section_ingredients(study: Study, variants: list[str]) -> None:
    for name in variants:
        export, train = study.prior(name)
        scores = {s: study.score_prior(export, s, f"prior_{name}_{s}.png") for s in MAIN_SAMPLERS}
        entry = {"describe": VARIANTS[name].describe, "train": train, "samplers": scores}
        study.report.add("ingredients", name, entry)


def section_samplers(study: Study, name: str) -> None:
    export, _ = study.prior(name)
    scores = {s: study.score_prior(export, s, f"sampler_{name}_{s}.png") for s in SAMPLERS}
    study.report.add("samplers", name, {"samplers": scores})


LEGACY_GROUPS = {  # flat ColdStartDiT arguments of checkpoints written before the grouped config
    "sampler": ("sampler", "method"),
    "sample_steps": ("sampler", "steps"),
    "guidance_scale": ("sampler", "guidance_scale"),
    "eta": ("sampler", "eta"),
    "clip_x0": ("sampler", "clip_x0"),
    "grid_identities": ("grid", "identities"),
    "grid_samples": ("grid", "samples"),
    "grid_seed": ("grid", "seed"),
}


def cold_start_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """ColdStartDiT arguments from a checkpoint's hyper-parameters, also of the earlier flat form (its
    sampler and grid arguments become the ``sampler`` / ``grid`` groups)."""
    known = set(inspect.signature(ColdStartDiT.__init__).parameters) - {"self"}
    args: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in hparams.items():
        if key in LEGACY_GROUPS and not isinstance(value, dict):
            group, field_name = LEGACY_GROUPS[key]
            groups.setdefault(group, {})[field_name] = value
        elif key in known:
            args[key] = value
    for group, values in groups.items():
        args[group] = {**(args.get(group) or {}), **values}
    return args


def export_checkpoint(ckpt: Path, folder: Path) -> Path:
    """The generator export (EMA weights) of a ColdStartDiT training checkpoint (cached)."""
    if (folder / "labels.json").is_file():
        return folder
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = ColdStartDiT(**cold_start_arguments(dict(state["hyper_parameters"])))
    model.load_state_dict(state["state_dict"])
    model.on_load_checkpoint(state)
    model.export(folder)
    return folder


def section_checkpoints(study: Study, run: Path) -> None:
    """Quality along one prior training run (its ``checkpoints/*step=N.ckpt``): the effect of steps."""
    for ckpt in sorted(run.glob("checkpoints/*step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1])):
        step = int(ckpt.stem.split("step=")[1])
        export = export_checkpoint(ckpt, study.work / "checkpoints" / run.name / f"step{step}")
        print(f"[prior_recipe] checkpoint {ckpt}", flush=True)
        scores = study.score_prior(export, "ddim50_w2", f"steps_{run.name}_{step}.png")
        study.report.add("checkpoints", f"{run}/{step}", {"run": str(run), "step": step, "scores": scores})


def section_cold(study: Study, prior: str, variants: list[str], per_id: int = 12) -> None:
    target = study.data(TARGET)
    num_ids = len(target.names)
    shots = torch.cat([torch.nonzero(target.labels == k).flatten()[:SHOTS] for k in range(num_ids)])
    train = ToyImages(
        target.images[shots], target.labels[shots], target.names, [target.records[i] for i in shots.tolist()]
    )
    judge, judge_data = study.judge(TARGET_JUDGE), study.data(TARGET_JUDGE)
    labels = torch.arange(num_ids).repeat_interleave(per_id)
    tag = prior.replace("builtin:", "").replace("/", "_")
    for name in variants:
        v = COLD[name]
        print(f"[prior_recipe] cold {name} from {prior}: {v.describe}", flush=True)
        folder = study.work / "cold" / tag / name
        fit = fit_generator(folder, {"pretrained": prior, **v.model}, study.steps(v.steps), 32, train)
        gen = DiTGenerator.from_pretrained(folder / "export")
        res: dict[str, Any] = {"prior": prior, "variant": name, "describe": v.describe, "train": fit}
        res["guidance"] = {}
        for w in v.guidances:
            fake, seconds = generate(gen, labels, study.sampler("ddim50_w2", guidance_scale=w))
            scores = quality(judge, judge_data, fake, labels)
            scores.update(near_copies(judge, train, fake, labels))
            scores["grid"] = save_grid(study.grids / f"cold_{tag}_{name}_w{w:g}.png", train, fake, labels)
            res["guidance"][f"{w:g}"] = scores
            print(f"[prior_recipe]   w={w:g}: {json.dumps(scores)}", flush=True)
        study.report.add("cold", f"{tag}/{name}", res)


# ------------------------------------------------------------------------------------------- report
def render_overfit(results: dict[str, Any]) -> str:
    parts = ["## Overfit check: one identity, four images\n"]
    for key, r in results.items():
        t = r["train"]
        rows = [
            [
                k,
                f"{v['nn_mse_median']:.4f}",
                f"{v['nn_mse_max']:.4f}",
                f"{v['train_pair_mse_min']:.4f}",
                v["images_hit"],
            ]
            for k, v in r["samplers"].items()
        ]
        parts.append(
            f"\n`{key}`: {t['steps']} steps at batch 16 (recipe, no label dropout, no EMA), loss "
            f"{t['loss_first']:.4f} -> {t['loss_last']:.4f}; 8 samples at guidance 1.\n\n"
            + md_table(
                ["sampler", "NN MSE median", "NN MSE max", "closest training pair MSE", "images hit"], rows
            )
        )
    parts.append(
        "\nNN MSE: mean squared error (images in [-1, 1]) between a sample and its nearest training image; "
        "images hit: how many of the 4 training images are some sample's nearest. Grids: "
        "`prior_recipe/overfit_<steps>_<sampler>.png` (top row the training images).\n"
    )
    return "".join(parts)


def render_ingredients(results: dict[str, Any]) -> str:
    headers = [
        "prior variant",
        "steps",
        "params (M)",
        "train min",
        "loss",
        "fidelity %",
        "spread syn/real",
        "FID",
        "fidelity % no clip",
        "FID no clip",
    ]
    rows = []
    for name, r in results.items():
        t, c, n = r["train"], r["samplers"]["ddim50_w2"], r["samplers"]["ddim50_w2_noclip"]
        rows.append(
            [
                f"`{name}`: {r['describe']}",
                t["steps"],
                f"{t['params_m']:.2f}",
                f"{t['wall_s'] / 60:.1f}",
                f"{t['loss_last']:.4f}",
                f"{100 * c['fidelity']:.1f}",
                f"{c['spread_ratio']:.2f}",
                f"{c['fid']:.3f}",
                f"{100 * n['fidelity']:.1f}",
                f"{n['fid']:.3f}",
            ]
        )
    return (
        "## Ingredients: priors on the demo's prior data (48 toy identities x 8 images)\n\n"
        + md_table(headers, rows)
        + f"\nScored on {EVAL_IDS} identities x {EVAL_PER_ID} samples, DDIM 50 steps, guidance 2, x0 clipped "
        "(last two columns: not clipped), in the feature space of a judge trained on 40 images per identity "
        "(real vs real: fidelity 100 %, FID about 0.01). Loss: plain ε-MSE per sample (unweighted, whatever "
        "the training weighting), mean of the last 250 steps; not comparable across noise schedules. Train "
        "minutes on a shared 2-core machine (1 torch thread, other jobs running: +-40 %). Grids: "
        "`prior_recipe/prior_<variant>_<sampler>.png` (3 real | 7 samples per identity).\n"
    )


def render_samplers(results: dict[str, Any]) -> str:
    parts = []
    for prior, r in results.items():
        rows = [
            [
                name,
                f"{100 * v['fidelity']:.1f}",
                f"{v['spread_ratio']:.2f}",
                f"{v['fid']:.3f}",
                f"{v['kid']:.4f}",
                f"{v['sample_s']:.0f}",
            ]
            for name, v in r["samplers"].items()
        ]
        headers = [
            "sampler",
            "fidelity %",
            "spread syn/real",
            "FID",
            "KID",
            f"s / {EVAL_IDS * EVAL_PER_ID} images",
        ]
        parts.append(f"## Samplers on prior `{prior}`\n\n" + md_table(headers, rows))
    parts.append(
        "\n`ddimN_wG`: DDIM (η = 0), N steps, guidance G, x0 clipped unless `noclip`, timesteps spaced "
        "'leading' (diffusers' default: the chain starts at t = T - T/N) unless `trailing` (starts at "
        "t = T - 1); `ddpm250`: ancestral DDPM, 250 steps. "
        "Grids: `prior_recipe/sampler_<prior>_<sampler>.png`.\n"
    )
    return "\n".join(parts)


def render_checkpoints(results: dict[str, Any]) -> str:
    rows = [
        [
            f"`{r['run']}`",
            r["step"],
            f"{100 * r['scores']['fidelity']:.1f}",
            f"{r['scores']['spread_ratio']:.2f}",
            f"{r['scores']['fid']:.3f}",
            f"{r['scores']['kid']:.4f}",
        ]
        for r in sorted(results.values(), key=lambda r: (r["run"], r["step"]))
    ]
    return (
        "## Steps: checkpoints of the shipped prior's training run\n\n"
        "`experiments/toy/prior.yaml` (the recipe on toy_market seed 1, 128 identities x 16 images), EMA "
        f"weights of each checkpoint, scored like the ingredients ({EVAL_IDS} identities x {EVAL_PER_ID} "
        "samples, DDIM 50, guidance 2, x0 clipped).\n\n"
        + md_table(["run", "step", "fidelity %", "spread syn/real", "FID", "KID"], rows)
        + "\nGrids: `prior_recipe/steps_<run>_<step>.png`.\n"
    )


def render_cold(results: dict[str, Any]) -> str:
    headers = [
        "prior",
        "cold start",
        "steps",
        "train min",
        "guidance",
        "fidelity %",
        "spread syn/real",
        "FID",
        "near copies %",
    ]
    rows = []
    for r in results.values():
        for w, s in r["guidance"].items():
            rows.append(
                [
                    f"`{r['prior']}`",
                    f"`{r['variant']}`: {r['describe']}",
                    r["train"]["steps"],
                    f"{r['train']['wall_s'] / 60:.1f}",
                    w,
                    f"{100 * s['fidelity']:.1f}",
                    f"{s['spread_ratio']:.2f}",
                    f"{s['fid']:.3f}",
                    f"{100 * s['near_copy_fraction']:.1f}",
                ]
            )
    return (
        "## Cold start on the demo target\n\n"
        f"Target: toy_market seed 0, {TARGET.ids} identities, {SHOTS} real images each (identities the "
        "prior never saw). 12 samples per identity, DDIM 50, x0 clipped. Judge: trained on 40 images of each "
        "target identity. Near copies: the privacy audit (library defaults; pixel descriptor + judge "
        "features) against the 3 training images of each identity.\n\n"
        + md_table(headers, rows)
        + "\nGrids: `prior_recipe/cold_<prior>_<variant>_w<G>.png` (the 3 training images | 7 samples).\n"
    )


RENDERERS = {
    "overfit": render_overfit,
    "ingredients": render_ingredients,
    "samplers": render_samplers,
    "checkpoints": render_checkpoints,
    "cold": render_cold,
}


def render(report: dict[str, Any]) -> str:
    parts = ["# Prior recipe: small pixel DiTs on toy persons\n\n", md_environment(report["environment"])]
    parts.append("\nCommands:\n\n" + "".join(f"- `{c}`\n" for c in report["commands"]))
    for name, renderer in RENDERERS.items():
        if report["results"].get(name):
            parts.append("\n" + renderer(report["results"][name]))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks prior_recipe", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--sections", default="overfit,ingredients,samplers,cold")
    p.add_argument("--variants", default="demo_1500,cosine_1500,minsnr_1500,recipe_1500")
    p.add_argument("--sweep", default="recipe_1500", help="prior variant of the sampler sweep")
    p.add_argument("--prior", default="builtin:toy_prior", help="prior export of the cold-start section")
    p.add_argument("--cold", default=",".join(COLD), help="cold-start variants")
    p.add_argument("--overfit-steps", type=int, default=1500)
    p.add_argument("--run", default="runs/toy/prior", help="training run of the checkpoints section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="cache of trained runs (default runs/<name>)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="report name (default prior_recipe[_quick])")
    p.add_argument("--quick", action="store_true", help="toy sizes everywhere: a smoke test")
    args = p.parse_args(argv)
    name = args.name or ("prior_recipe_quick" if args.quick else "prior_recipe")
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks prior_recipe " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = Report(Path(args.out), name, command.strip())
    study = Study(Path(args.work or f"runs/{name}"), Path(args.out), report, quick=args.quick)
    run = {
        "overfit": lambda: section_overfit(study, args.overfit_steps),
        "ingredients": lambda: section_ingredients(study, args.variants.split(",")),
        "samplers": lambda: section_samplers(study, args.sweep),
        "cold": lambda: section_cold(study, args.prior, args.cold.split(",")),
        "checkpoints": lambda: section_checkpoints(study, Path(args.run)),
    }
    for name in args.sections.split(","):
        if name not in run:
            p.error(f"unknown section {name!r}; expected {sorted(run)}")
        start = time.perf_counter()
        run[name]()
        print(f"[prior_recipe] {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
