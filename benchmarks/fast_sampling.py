"""Images per second at matched quality: our fast solvers vs diffusers' ``DiTPipeline`` defaults (issue 15).

    python -m benchmarks fast_sampling --threads 1 [--out benchmarks/results] [--work runs/fast_sampling]
    python -m benchmarks fast_sampling --threads 1 --guidance-scale 4 --name fast_sampling_w4  # recipes' w
    python -m benchmarks fast_sampling --quick --out DIR          # toy sizes (the tests)

The model is a trained one, so quality means something: the demo's cold-started generator
(``experiments/toy/pipeline.yaml``: prior -> cold start on the 16 target identities), with the demo's judge
recognizer (trained on every real image of those identities). Missing stages are run first into ``--work``
(finished ones are skipped). Then, side by side in one process:

* reference: ``DiTPipeline`` with its defaults (50 steps, the DDIM scheduler DiT ships) on the same
  transformer (``benchmarks.dit_reference``), at the recipe's guidance scale;
* ours: ``sample`` with DPM-Solver++(2M) (``method="dpmsolver"``) and with DDIM at several step counts.

Every setting generates the same requests (identity, seed) - the same initial noise, so the settings differ
only by how they integrate (a paired comparison). Generation is timed batch by batch, interleaved (one batch
of each setting per round, the order reversed every other round; one untimed warm-up batch), and images/s is
the batch size over the median batch time. Quality of each setting's full set in the judge's feature space
(``Judge.score_images``; images quantised to 8 bits as a written set would be): FID, KID, identity fidelity,
spread. A second seed set of the reference (our DDIM-50, equal to the pipeline's output) shows how much FID
moves between seed sets. The chosen setting is the fastest whose FID is within 5 % of the reference's and
whose fidelity is within 5 % of it too (fewer steps lose fidelity before FID moves); the fastest by the FID
rule alone is reported beside it.
Optionally the chosen setting with ``torch.compile`` (compile time and steady-state speed).

Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (FID and fidelity against speed) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import command_line, environment, interleaved_times, md_environment, md_table, median
from benchmarks.dit_reference import dit_pipeline, pipeline_images

FULL: dict[str, Any] = {
    "solvers": {"dpmsolver": [5, 8, 10, 12, 15, 20], "ddim": [10, 15, 20, 25]},
    "reference_steps": 50,
    "per_identity": 12,
    "batch": 32,
    "warmup": 1,
    "fid_tolerance": 0.05,
    "fidelity_tolerance": 0.05,
    "compile": True,
    "compile_repeats": 3,
}
QUICK: dict[str, Any] = {
    "solvers": {"dpmsolver": [2, 3], "ddim": [3]},
    "reference_steps": 4,
    "per_identity": 2,
    "batch": 4,
    "warmup": 1,
    "fid_tolerance": 0.05,
    "fidelity_tolerance": 0.05,
    "compile": False,
    "compile_repeats": 1,
}
STAGES = ("prior", "judge", "cold_start")


# ============================================================================================== models
def prepare(work: Path, quick: bool) -> dict[str, Any]:
    """Run (or skip, when finished) the demo stages the benchmark needs; returns exports and data facts."""
    from rgsd_lightning.demo import demo_file
    from rgsd_lightning.pipeline import expand, read_spec, resolve_vars, run_pipeline

    spec = read_spec(demo_file(quick), [f"output={work}"])
    variables = resolve_vars(spec)
    output, stages = expand(spec)
    results = run_pipeline(output, stages, only=list(STAGES))
    sampler = _stage_sampler(results["cold_start"].folder)
    return {
        "generator": results["cold_start"].export,
        "judge": results["judge"].export,
        "data": Path(output) / "data" / "target",
        "image_size": int(variables["image_size"]),
        "guidance_scale": float(sampler.get("guidance_scale", 2.0)),
    }


def _stage_sampler(folder: Path) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load((folder / "config.yaml").read_text())
    return dict(config["model"]["init_args"].get("sampler") or {})


def build_judge(facts: dict[str, Any], kid_subset_size: int = 100) -> Any:
    """The judge: the judge recognizer on every real training image of the target identities."""
    from rgsd_lightning.backbones import FeatureExtractor
    from rgsd_lightning.data import read_market1501
    from rgsd_lightning.evaluation.quality import Judge

    real = read_market1501(facts["data"])["train"]
    extractor = FeatureExtractor.from_export(facts["judge"]).eval()
    return Judge(extractor, real, facts["image_size"], 3, kid_subset_size)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as an 8-bit PNG would hold them."""
    return torch.round((images.clamp(-1, 1) + 1.0) * 127.5) / 127.5 - 1.0


# ============================================================================================== settings
def settings(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The reference first, then ours: ``{"name", "kind", "method", "steps"}`` per setting."""
    ref = {"name": f"DiTPipeline-{cfg['reference_steps']}", "kind": "pipeline"}
    rows = [{**ref, "method": "ddim", "steps": cfg["reference_steps"]}]
    for method, steps in cfg["solvers"].items():
        rows += [{"name": f"{method}-{n}", "kind": "ours", "method": method, "steps": n} for n in steps]
    return rows


def generation_fn(
    gen: Any, pipe: Any, setting: dict[str, Any], guidance_scale: float
) -> Callable[[Sequence[int], Sequence[int]], torch.Tensor]:
    """``fn(labels, seeds) -> images in [-1, 1]`` for one setting."""
    from rgsd_lightning.diffusion import sample

    if setting["kind"] == "pipeline":

        def run_pipe(labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
            return pipeline_images(
                pipe, labels, seeds, guidance_scale=guidance_scale, num_inference_steps=setting["steps"]
            )

        return run_pipe

    def run_ours(labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        out = sample(
            gen,
            list(labels),
            seeds=list(seeds),
            num_steps=setting["steps"],
            guidance_scale=guidance_scale,
            method=setting["method"],
        )
        return out.images

    return run_ours


def requests(num_identities: int, per_identity: int, seed_offset: int = 0) -> tuple[list[int], list[int]]:
    """(labels, seeds) of the generated set: every identity ``per_identity`` times, one seed per image."""
    labels = [i for i in range(num_identities) for _ in range(per_identity)]
    return labels, [seed_offset + j for j in range(len(labels))]


def _batches(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def generate_timed(
    fns: dict[str, Callable[[Sequence[int], Sequence[int]], torch.Tensor]],
    labels: Sequence[int],
    seeds: Sequence[int],
    batch: int,
    warmup: int,
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Generate the whole request list with every setting, one batch of each per round (interleaved).

    Full batches only are timed (a smaller last batch is generated untimed); warm-up rounds repeat the
    first batch and are not timed. Returns the batch times and each setting's images (request order).
    """
    label_batches, seed_batches = _batches(labels, batch), _batches(seeds, batch)
    full = [i for i, b in enumerate(label_batches) if len(b) == batch]
    if not full:
        raise ValueError(f"batch={batch} exceeds the {len(labels)} requests")
    images: dict[str, dict[int, torch.Tensor]] = {name: {} for name in fns}
    order = [full[0]] * warmup + full
    counters = dict.fromkeys(fns, 0)

    def call(name: str) -> None:
        k = order[counters[name]]
        counters[name] += 1
        images[name][k] = fns[name](label_batches[k], seed_batches[k]).cpu()

    calls = {name: (lambda name=name: call(name)) for name in fns}
    times, _ = interleaved_times(calls, len(full), warmup=warmup)
    for k, (lb, sb) in enumerate(zip(label_batches, seed_batches, strict=True)):
        if k not in full:
            for name, fn in fns.items():
                images[name][k] = fn(lb, sb).cpu()
    return times, {name: torch.cat([got[k] for k in sorted(got)]) for name, got in images.items()}


# ============================================================================================== compile
def compile_probe(gen: Any, setting: dict[str, Any], guidance_scale: float, batch: int, repeats: int) -> dict:
    """The chosen setting with ``torch.compile`` on a copy of the generator vs eager, interleaved.

    Compiles with an empty inductor cache (a temporary ``TORCHINDUCTOR_CACHE_DIR``: what a first run pays)
    and reports the first compiled call (compilation included) and steady-state batch times of both.
    """
    labels, seeds = requests(gen.num_identities, 1 + batch // gen.num_identities)
    labels, seeds = labels[:batch], seeds[:batch]
    eager = generation_fn(gen, None, setting, guidance_scale)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            torch._dynamo.reset()
            compiled_gen = copy.deepcopy(gen)
            compiled_gen.transformer.compile()
            compiled = generation_fn(compiled_gen, None, setting, guidance_scale)
            start = time.perf_counter()
            first = compiled(labels, seeds)
            first_call_s = time.perf_counter() - start
            calls = {"eager": lambda: eager(labels, seeds), "compiled": lambda: compiled(labels, seeds)}
            times, outputs = interleaved_times(calls, repeats, warmup=1)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    t_eager, t_compiled = median(times["eager"]), median(times["compiled"])
    saved_per_batch = t_eager - t_compiled
    return {
        "setting": setting["name"],
        "batch": batch,
        "inductor_cache": "empty (temporary directory)",
        "first_compiled_call_s": first_call_s,
        "eager_batch_s": t_eager,
        "compiled_batch_s": t_compiled,
        "speedup": t_eager / t_compiled,
        "break_even_images": (
            None if saved_per_batch <= 0 else batch * (first_call_s - t_compiled) / saved_per_batch
        ),
        "max_abs_pixel_diff": float((outputs["compiled"] - outputs["eager"]).abs().max()),
        "first_call_equal_shape": list(first.shape) == list(outputs["eager"].shape),
        "times_s": times,
    }


# ============================================================================================== the run
def run(
    out: Path,
    *,
    quick: bool = False,
    work: Path | None = None,
    name: str | None = None,
    guidance_scale: float | None = None,
    compile_probe_enabled: bool = True,
    command: str | None = None,
) -> dict:
    """Measure the quality-speed curve; write ``<name>.json/.md/.png`` into ``out``; returns the report.

    ``guidance_scale``: the CFG scale of every row (default: the toy recipe's, from the cold-start stage).
    ``compile_probe_enabled=False`` skips the ``torch.compile`` measurement.
    """
    from rgsd_lightning.diffusion import DiTGenerator

    cfg = QUICK if quick else FULL
    name = name or ("fast_sampling_quick" if quick else "fast_sampling")
    work = Path(work) if work is not None else Path("runs") / name
    started = time.perf_counter()
    facts = prepare(work, quick)
    gen = DiTGenerator.from_pretrained(facts["generator"]).eval().requires_grad_(False)
    pipe = dit_pipeline(gen)
    w = facts["guidance_scale"] if guidance_scale is None else float(guidance_scale)
    judge = build_judge(facts)
    rows = settings(cfg)
    labels, seeds = requests(gen.num_identities, cfg["per_identity"])
    fns = {s["name"]: generation_fn(gen, pipe, s, w) for s in rows}
    times, images = generate_timed(fns, labels, seeds, cfg["batch"], cfg["warmup"])
    names = [gen.identities[y] for y in labels]
    ref = rows[0]["name"]
    for s in rows:
        s["batch_s"] = median(times[s["name"]])
        s["images_per_s"] = cfg["batch"] / s["batch_s"]
        s["times_s"] = times[s["name"]]
        s["quality"] = judge.score_images(quantise(images[s["name"]]), names)
    for s in rows:
        s["speed_ratio"] = s["images_per_s"] / rows[0]["images_per_s"]
        s["fid_ratio"] = s["quality"]["fid"] / rows[0]["quality"]["fid"]
    # the pipeline and our DDIM at the reference steps are one sampler: check on the first batch, then use
    # ours for a second seed set (how much FID moves between seed sets)
    ddim_ref = {"kind": "ours", "method": "ddim", "steps": cfg["reference_steps"]}
    ours_ref = generation_fn(gen, pipe, ddim_ref, w)
    b = cfg["batch"]
    parity = float((ours_ref(labels[:b], seeds[:b]).cpu() - images[ref][:b]).abs().max())
    other_labels, other_seeds = requests(gen.num_identities, cfg["per_identity"], seed_offset=10**6)
    other = torch.cat(
        [
            ours_ref(lb, sb).cpu()
            for lb, sb in zip(_batches(other_labels, b), _batches(other_seeds, b), strict=True)
        ]
    )
    other_quality = judge.score_images(quantise(other), [gen.identities[y] for y in other_labels])
    limit = (1.0 + cfg["fid_tolerance"]) * rows[0]["quality"]["fid"]
    fidelity_floor = (1.0 - cfg["fidelity_tolerance"]) * rows[0]["quality"]["fidelity"]
    by_fid = [s for s in rows[1:] if s["quality"]["fid"] <= limit]
    matched = [s for s in by_fid if s["quality"]["fidelity"] >= fidelity_floor]
    chosen = max(matched, key=lambda s: s["images_per_s"]) if matched else None
    fid_only = max(by_fid, key=lambda s: s["images_per_s"]) if by_fid else None
    compiled = None
    if cfg["compile"] and compile_probe_enabled and chosen is not None:
        compiled = compile_probe(gen, chosen, w, cfg["batch"], cfg["compile_repeats"])
    report = {
        "benchmark": "fast_sampling",
        "quick": quick,
        "command": command or "python -m benchmarks fast_sampling" + (" --quick" if quick else ""),
        "environment": environment(),
        "threads": torch.get_num_threads(),
        "model": {
            "generator": str(facts["generator"]),
            "judge": str(facts["judge"]),
            "identities": gen.num_identities,
            "image_size": gen.image_size,
            "latent_shape": list(gen.latent_shape),
            "parameters": sum(p.numel() for p in gen.transformer.parameters()),
        },
        "settings": {**cfg, "guidance_scale": w, "num_images": len(labels)},
        "judge": judge.describe(),
        "rows": rows,
        "reference_other_seeds": other_quality,
        "pipeline_vs_ours_ddim_max_abs_pixel_diff": parity,
        "fid_limit": limit,
        "fidelity_floor": fidelity_floor,
        "chosen": None if chosen is None else {k: chosen[k] for k in ("name", "method", "steps")},
        "chosen_speed_ratio": None if chosen is None else chosen["speed_ratio"],
        "chosen_by_fid_only": None if fid_only is None else {k: fid_only[k] for k in ("name", "speed_ratio")},
        "compile": compiled,
        "seconds": time.perf_counter() - started,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"{name}.png")
    (out / f"{name}.md").write_text(markdown(report, f"{name}.png"))
    return report


# ============================================================================================== output
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict[str, Any], figure: str) -> str:
    """The report as markdown: setup, the curve table, the chosen setting, compile, the seed-set spread."""
    cfg, model, judge = report["settings"], report["model"], report["judge"]
    rows = report["rows"]
    ref = rows[0]
    chosen = report["chosen"]
    table = []
    for s in rows:
        q = s["quality"]
        mark = " **(chosen)**" if chosen and s["name"] == chosen["name"] else ""
        table.append(
            [
                ("reference: " if s is ref else "") + s["name"] + mark,
                s["steps"],
                f"{s['images_per_s']:.2f}",
                f"**{s['speed_ratio']:.2f}x**",
                f"{q['fid']:.3f}",
                f"{100 * (s['fid_ratio'] - 1):+.1f}%",
                f"{q['kid']:.4f}",
                _pct(q["fidelity"]),
                f"{q['diversity_ratio']:.2f}" if q.get("diversity_ratio") is not None else "-",
            ]
        )
    other = report["reference_other_seeds"]
    lines = [
        "# Generation speed at matched quality (issue 15)",
        "",
        md_environment(report["environment"]).strip(),
        "",
        f"Command: `{report['command']}` ({report['threads']} torch thread(s)); "
        f"{report['seconds'] / 60:.0f} min.",
        "",
        f"Model: the demo's cold-started generator ({model['parameters'] / 1e6:.2f} M parameters, "
        f"{model['identities']} identities, {model['image_size']}px, latent "
        f"{'x'.join(map(str, model['latent_shape']))}), guidance scale {cfg['guidance_scale']:g} on every "
        f"row. Each row generates the same {cfg['num_images']} requests ({cfg['per_identity']} per identity, "
        "same seeds = same initial noise), timed batch by batch interleaved with the other rows in one "
        f"process (batch {cfg['batch']}, median of the batch times, one untimed warm-up batch); speed ratios "
        "are from this one run. Quality in the judge's feature space (a recognizer trained on all "
        f"{judge['num_real_images']} real images of the identities; its own accuracy on them "
        f"{_pct(judge['real_fidelity'])} %): FID, KID, fidelity = share of samples assigned to their "
        "identity, spread = intra-identity feature spread syn/real.",
        "",
        md_table(
            [
                "setting",
                "steps",
                "img/s",
                "speed vs reference",
                "FID",
                "FID vs reference",
                "KID",
                "fidelity %",
                "spread syn/real",
            ],
            table,
        ).strip(),
        "",
        f"Reference = `DiTPipeline` defaults ({ref['steps']} steps, DiT's DDIM scheduler) on the same "
        "transformer (null label mapped, see `benchmarks/dit_reference.py`); our DDIM at the same steps "
        "gives the same images (max pixel difference "
        f"{report['pipeline_vs_ours_ddim_max_abs_pixel_diff']:.1e})."
        f" The reference on another seed set: FID {other['fid']:.3f} "
        f"({100 * (other['fid'] / ref['quality']['fid'] - 1):+.1f}%), fidelity {_pct(other['fidelity'])} % - "
        "the spread between seed sets, which the paired rows above do not have.",
        "",
    ]
    rule = (
        f"FID within {100 * cfg['fid_tolerance']:.0f} % of the reference's (<= {report['fid_limit']:.3f}) "
        f"and fidelity within {100 * cfg['fidelity_tolerance']:.0f} % of it (>= "
        f"{100 * report['fidelity_floor']:.1f} %)"
    )
    if chosen is None:
        lines.append(f"No setting has {rule}.")
    else:
        lines.append(
            f"**Chosen: `{chosen['method']}` with {chosen['steps']} steps**, the fastest setting with "
            f"{rule}: {report['chosen_speed_ratio']:.2f}x the reference's images/s."
        )
    fid_only = report.get("chosen_by_fid_only")
    if fid_only is not None and (chosen is None or fid_only["name"] != chosen["name"]):
        lines.append(
            f"By the FID rule alone the fastest would be {fid_only['name']} "
            f"({fid_only['speed_ratio']:.2f}x), at a lower fidelity."
        )
    comp = report.get("compile")
    if comp:
        even = comp["break_even_images"]
        lines += [
            "",
            f"`torch.compile` of the transformer, {comp['setting']}, batch {comp['batch']}: first call "
            f"(compilation) {comp['first_compiled_call_s']:.0f} s, then {comp['compiled_batch_s']:.2f} s per "
            f"batch vs {comp['eager_batch_s']:.2f} s eager ({comp['speedup']:.2f}x); it pays after "
            + ("never" if even is None else f"about {even:.0f} images")
            + f" (max pixel difference to eager {comp['max_abs_pixel_diff']:.1e}). Off by default "
            "(`SyntheticGenerator(compile=...)`).",
        ]
    lines += ["", f"![quality vs speed]({figure})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """FID and fidelity against images/s (relative to the reference), one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ref = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "fid", "FID (judge features)"), (axes[1], "fidelity", "fidelity")):
        for method, marker in (("dpmsolver", "o"), ("ddim", "s")):
            pts = [s for s in rows[1:] if s["method"] == method]
            if not pts:
                continue
            xs = [s["speed_ratio"] for s in pts]
            ys = [s["quality"][key] for s in pts]
            ax.plot(xs, ys, marker=marker, label=method)
            for s, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(str(s["steps"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([1.0], [ref["quality"][key]], marker="*", markersize=14, linestyle="", label=ref["name"])
        if key == "fid":
            ax.axhline(
                report["fid_limit"], linestyle="--", color="grey", linewidth=1, label="reference + 5 %"
            )
        else:
            ax.axhline(
                report["fidelity_floor"], linestyle="--", color="grey", linewidth=1, label="reference - 5 %"
            )
        ax.set_xscale("log")
        ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16) if t <= 1.2 * max(s["speed_ratio"] for s in rows)]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("images/s relative to the reference (labels: steps)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks fast_sampling``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks fast_sampling", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder of <name>.json / .md / .png")
    p.add_argument("--work", default=None, help="stage folders (default runs/<name>)")
    p.add_argument("--name", default=None, help="file stem (default fast_sampling[_quick])")
    p.add_argument("--quick", action="store_true", help="toy sizes (the tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier when shared)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the recipe's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(
        Path(args.out),
        quick=args.quick,
        work=args.work,
        name=args.name,
        guidance_scale=args.guidance_scale,
        compile_probe_enabled=not args.no_compile,
        command=command_line("fast_sampling", argv),
    )
    print(markdown(report, "figure"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
