"""Cold-start label rows: ``init_rows="zero"`` (the paper) vs ``"null"`` (our default), table-only.

``python -m benchmarks init_rows --out DIR [--quick]``

On the toy identities: a small DiT prior is pre-trained on a broad toy domain (the demo's stage a), then
cold-started on the target identities with only the new label table trainable (the paper's setting),
once with the identity rows zero-initialised and once initialised from the prior's null row. Reported for
each: the held-out denoising loss before and after, and identity fidelity of generated images - the share
of samples that a judge (a ReID recognizer trained on all real images of the target identities) assigns
to the intended identity by nearest class mean. Writes ``init_rows.json`` and ``init_rows.md``
(``init_rows_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from rgsd_lightning.backbones import FeatureExtractor
from rgsd_lightning.data import read_market1501
from rgsd_lightning.demo import demo_file
from rgsd_lightning.diffusion import DiTGenerator, sample
from rgsd_lightning.evaluation.quality import embed, load_images
from rgsd_lightning.io import atomic_write_text
from rgsd_lightning.pipeline import expand, read_spec, resolve_vars, run_pipeline

STAGES = Path(__file__).resolve().parent / "configs" / "init_rows.yaml"


def _spec(runs: Path, quick: bool, steps: int) -> dict:
    """The benchmark's stages (configs/init_rows.yaml) with the demo's vars (its prior, target and sizes)."""
    spec = read_spec(demo_file(quick), [f"output={runs}", f"vars.init_rows_steps={steps}"])
    return {**spec, "stages": read_spec(STAGES)["stages"], "report": None}


@torch.no_grad()
def _heldout_loss(export: Path, data_args: dict) -> dict[str, float]:
    """Held-out denoising loss of an export with fixed noise, with the identity label and with the null label.

    The difference (``label_gain``) is how much the identity label helps the denoiser: about 0 means the
    generator ignores which identity it is asked for.
    """
    from rgsd_lightning import IdentityDataModule
    from rgsd_lightning.diffusion.schedule import denoising_loss

    gen = DiTGenerator.from_pretrained(export)
    dm = IdentityDataModule(**data_args)
    total, total_null, count = 0.0, 0.0, 0
    for i, batch in enumerate(dm.val_dataloader()):
        x0 = gen.encode(batch["image"])
        rng = torch.Generator().manual_seed(1000 + i)
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, gen.num_train_timesteps, (len(x0),), generator=rng)
        null = torch.full_like(batch["label"], gen.null_label)
        total += float(denoising_loss(gen, x0, batch["label"], noise=noise, timesteps=t)) * len(x0)
        total_null += float(denoising_loss(gen, x0, null, noise=noise, timesteps=t)) * len(x0)
        count += len(x0)
    loss, loss_null = total / count, total_null / count
    return {"heldout_loss": loss, "heldout_loss_null": loss_null, "label_gain": loss_null - loss}


def _fidelity(export: Path, judge: FeatureExtractor, real, size: int, per_id: int, w: float) -> float:
    gen = DiTGenerator.from_pretrained(export)
    names = gen.identities
    protos = []
    for name in names:
        feats = embed(judge, load_images([r for r in real if r.identity == name], size, 3))
        protos.append(feats.mean(0))
    protos = torch.nn.functional.normalize(torch.tensor(np.stack(protos)), dim=1)
    labels = torch.arange(len(names)).repeat_interleave(per_id)
    images = sample(gen, labels, seeds=list(range(len(labels))), num_steps=25, guidance_scale=w).images
    with torch.no_grad():
        pred = (judge(images) @ protos.T).argmax(1)
    return float((pred == labels).float().mean())


def run(out: Path, quick: bool = False, work: Path | None = None) -> dict:
    """Run the comparison; returns the result dict (also written as JSON + markdown into ``out``).

    Stage folders (checkpoints, exports, toy data) go to ``work`` (default ``runs/init_rows``, ignored by
    git), never into ``out``; a rerun skips the finished stages.
    """
    steps = 20 if quick else 400
    runs = Path(work) if work is not None else Path("runs") / ("init_rows_quick" if quick else "init_rows")
    start = time.time()
    spec = _spec(runs, quick, steps)
    variables = resolve_vars(spec)
    image_size, num_ids = variables["image_size"], variables["target_toy"]["num_train_ids"]
    results = run_pipeline(*expand(spec))
    judge = FeatureExtractor.from_export(results["judge"].export)
    real = read_market1501(runs / "data" / "target")["train"]
    prior_export = results["prior"].export
    rows = {}
    for key in ("zero", "null"):
        stage = results[f"cold_{key}"]
        cfg = yaml.safe_load((stage.folder / "config.yaml").read_text())
        rows[key] = {
            **_heldout_loss(stage.export, cfg["data"]["init_args"]),
            **{
                f"fidelity_w{w:g}": _fidelity(stage.export, judge, real, image_size, 4 if quick else 10, w)
                for w in (1.0, 3.0)
            },
        }
    report = {
        "command": f"python -m benchmarks init_rows --out {out}" + (" --quick" if quick else ""),
        "prior": str(prior_export),
        "cold_start_steps": steps,
        "chance": 1.0 / num_ids,
        "rows": rows,
        "seconds": round(time.time() - start, 1),
    }
    name = "init_rows_quick" if quick else "init_rows"
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=1) + "\n")
    lines = [
        "# Cold start: zero vs null label rows (table only, toy identities)",
        "",
        f"Command: `{report['command']}`; {steps} cold-start steps from the demo's prior; fidelity = share "
        "of samples a judge recognizer assigns to the intended identity "
        f"(chance {report['chance']:.3f}).",
        "",
        "| init_rows | held-out loss | loss with null label | label gain | fidelity w=1 | fidelity w=3 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        lines.append(
            f"| {key} | {r['heldout_loss']:.5f} | {r['heldout_loss_null']:.5f} | {r['label_gain']:.2e} "
            f"| {r['fidelity_w1']:.3f} | {r['fidelity_w3']:.3f} |"
        )
    lines += [
        "",
        "Label gain: held-out loss with the null label minus with the identity label (about 0: the generator "
        "does not use the identity label, and the two initialisations cannot differ).",
    ]
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks init_rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="where init_rows.json / .md go")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--work", default=None, help="stage folders (default runs/init_rows[_quick])")
    args = p.parse_args(argv)
    report = run(Path(args.out), args.quick, None if args.work is None else Path(args.work))
    print(json.dumps(report["rows"], indent=1))
    return 0
