"""The section kinds of a run report (``report.sections`` in a pipeline file).

Every section names stages of the run; its numbers and pictures come from their artifacts (metrics.json,
exports, synthetic sets, stage.json). A section whose stages have not finished says so instead of failing.

==========  =====================================================================================
kind        keys
==========  =====================================================================================
table       metrics {key: column title}, rows [{group, method, stage}]: a stage's seed copies
            (``<stage>_s<seed>``) give mean ± sample std
quality     judge (a recognizer stage: its export is the feature space, its training images the real
            reference), sets {label: generation stage}: fidelity, median rank of the requested
            identity, spread vs real, FID/KID, reward means, near copies (cached in each set's
            quality.json)
coverage    extractor (a recognizer stage trained on real images only), sets {label: generation stage}:
            1-NN identification of the extractor's held-out real images of its identities with its
            training images as the gallery, then with each set added (the gain predicts a set's use)
selection   judge, rows [{method, stage}]: selection precision of recognizer stages that selected
            (their selection.json): judge-correct share among kept vs among all seen synthetic samples
samples     real (a stage whose data gives the real images), sets {label: stage}, identities, per_cell
            (samples and features draw the finished sets and name those still running)
rewards     sets {label: stage}: mean reward components recorded in the sets' manifests
curves      stage (an RL stage): reward components and KL over the rollouts
features    extractor (a recognizer stage), real (a stage), sets {label: stage}, identities: PCA plot
audit       set (a generation stage): the privacy audit summary
run         the stages' status, wall and CPU seconds, and the environment
text        body: free markdown
==========  =====================================================================================

Every section may carry ``title`` and ``caption`` (figures also ``figure``, a short file name); strings may
use the pipeline's ``${vars}``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from rgsd_lightning.data.records import IdentityRecord, read_manifest
from rgsd_lightning.data.synthetic_set import CARD, MANIFEST, best_per_identity
from rgsd_lightning.io import atomic_write_json
from rgsd_lightning.pipeline.runner import StageResult
from rgsd_lightning.report.render import Row, markdown_table, results_table


@dataclass
class Section:
    """A rendered section: heading, markdown body and the numbers behind it (for the JSON report)."""

    title: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)


class RunContext:
    """What sections read: the run folder, its finished stages, and cached data modules and extractors.

    Args:
        run: the run folder.
        stage_names: every stage of the pipeline, in order.
        results: the finished stages.
        out: where figures are written.
        prefix: file-name prefix of the figures.
    """

    def __init__(
        self, run: Path, stage_names: list[str], results: dict[str, StageResult], out: Path, prefix: str
    ) -> None:
        self.run, self.stage_names, self.results, self.out, self.prefix = (
            run,
            stage_names,
            results,
            out,
            prefix,
        )
        self._datamodules: dict[str, Any] = {}
        self._extractors: dict[str, Any] = {}
        self._judges: dict[tuple[str, int], Any] = {}

    # -------------------------------------------------------------------------------- stages
    def require(self, stage: str) -> StageResult:
        """The result of a finished stage; KeyError naming it otherwise."""
        if stage not in self.stage_names:
            raise KeyError(f"the pipeline has no stage {stage!r}")
        if stage not in self.results:
            raise KeyError(f"stage {stage!r} has not finished")
        return self.results[stage]

    def copies(self, stage: str) -> list[str]:
        """The stage itself, or its seed copies ``<stage>_s<n>`` in pipeline order (finished or not)."""
        pattern = re.compile(re.escape(stage) + r"_s\d+")
        return [n for n in self.stage_names if n == stage or pattern.fullmatch(n)]

    def finished_copies(self, stage: str) -> list[str]:
        """The names of a stage's finished copies, in pipeline order."""
        return [n for n in self.copies(stage) if n in self.results]

    def synthetic(self, stage: str) -> list[IdentityRecord]:
        """The records of a generation stage's synthetic set."""
        result = self.require(stage)
        if result.output is None or not (Path(result.output) / MANIFEST).is_file():
            raise KeyError(f"stage {stage!r} wrote no synthetic set")
        return read_manifest(Path(result.output) / MANIFEST)

    def folder(self, stage: str) -> Path:
        """Where a finished stage's files are: its folder in this run, or for a stage taken from another run
        (``reuse``) the folder it ran in."""
        self.require(stage)
        marker = self.run / stage / "stage.json"
        reused = json.loads(marker.read_text()).get("reused_from") if marker.is_file() else None
        return Path(reused) if reused else self.run / stage

    # -------------------------------------------------------------------------------- data + models
    def datamodule(self, stage: str) -> Any:
        """The stage's IdentityDataModule, rebuilt from its resolved config.yaml."""
        if stage not in self._datamodules:
            from jsonargparse import ArgumentParser
            from lightning.pytorch import LightningDataModule

            config = yaml.safe_load((self.folder(stage) / "config.yaml").read_text())
            parser = ArgumentParser(exit_on_error=False)
            parser.add_subclass_arguments(LightningDataModule, "data")
            parsed = parser.parse_object({"data": config["data"]})
            self._datamodules[stage] = parser.instantiate_classes(parsed).data
        return self._datamodules[stage]

    def real(self, stage: str) -> tuple[list[IdentityRecord], int, int]:
        """A stage's real training images and the generator geometry (image_size, channels) of its data."""
        dm = self.datamodule(stage)
        return list(dm.train_records), int(dm.hparams.image_size), int(dm.hparams.channels)

    def extractor(self, stage: str) -> Any:
        """The recognizer export of a stage as a frozen feature extractor."""
        if stage not in self._extractors:
            from rgsd_lightning.backbones import FeatureExtractor

            export = self.require(stage).export
            if export is None:
                raise KeyError(f"stage {stage!r} exported no recognizer")
            self._extractors[stage] = FeatureExtractor.from_export(export).eval()
        return self._extractors[stage]

    def judge(self, stage: str, kid_subset_size: int) -> tuple[Any, str]:
        """A quality judge from a recognizer stage (its export, its real training images) and its key."""
        if (stage, kid_subset_size) not in self._judges:
            from rgsd_lightning.evaluation.quality import Judge
            from rgsd_lightning.provenance import folder_fingerprint

            real, size, channels = self.real(stage)
            heldout = self.datamodule(stage).heldout_records()  # its identities' images it never saw
            judge = Judge(self.extractor(stage), real, size, channels, kid_subset_size, heldout=heldout)
            key = f"{folder_fingerprint(self.require(stage).export)}:{kid_subset_size}:{judge.reference}"
            self._judges[(stage, kid_subset_size)] = (judge, key)
        return self._judges[(stage, kid_subset_size)]

    def figure(self, label: str) -> Path:
        """Path of a figure in the report folder (``<prefix>_<label>.png``, label slugified)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
        return self.out / f"{self.prefix}_{slug}.png"


# ------------------------------------------------------------------------------------------ sections
def table(ctx: RunContext, spec: dict[str, Any]) -> Section:
    columns = [(str(k), str(v)) for k, v in (spec.get("metrics") or {}).items()]
    if not columns:
        raise ValueError("a table section needs 'metrics': {metric key: column title}")
    rows, data, missing = [], [], []
    for entry in spec.get("rows") or []:
        copies = ctx.finished_copies(entry["stage"])  # which seed each run is: rows pair by it
        runs = [ctx.results[n].metrics for n in copies]
        if not runs:
            missing.append(entry["stage"])
            continue
        row = Row.over_runs(str(entry.get("group", "")), str(entry["method"]), runs)
        rows.append(row)
        data.append({**entry, "runs": runs, "copies": copies, "mean": row.metrics, "std": row.spread or {}})
    body = results_table(rows, columns) if rows else "No row has finished yet."
    if missing:
        body += f"\n\nNot finished: {', '.join(missing)}."
    return Section(spec.get("title", "Results"), _with_caption(body, spec), {"rows": data})


QUALITY_VERSION = 2
"""Part of the quality caches' key: raised when the judge's scores gain a field (2: the median rank), so
that caches written before recompute."""

QUALITY_HEADERS = (
    "Set",
    "images",
    "fidelity %",
    "median rank",
    "spread",
    "spread syn/real",
    "FID",
    "KID",
    "sem",
    "cov",
    "exp",
    "near copies %",
)


def quality(ctx: RunContext, spec: dict[str, Any]) -> Section:
    from rgsd_lightning.evaluation.quality import records_summary, set_summary

    judge, key = ctx.judge(spec["judge"], int(spec.get("kid_subset_size", 100)))
    rows, data = [], {}
    for label, entry in (spec.get("sets") or {}).items():
        # a stage name, or {stage, keep, rank_by}: the share of the set a reward-filtered row trains on
        entry = entry if isinstance(entry, dict) else {"stage": entry}
        stage, keep, rank_by = entry.get("stage"), float(entry.get("keep", 1.0)), entry.get("rank_by", "sem")
        try:
            folder = Path(ctx.require(stage).output)
            manifest = (folder / MANIFEST).read_bytes()
            cache_key = f"{key}:v{QUALITY_VERSION}:" + hashlib.sha256(manifest).hexdigest()[:16]
            if keep < 1.0:
                records = best_per_identity(ctx.synthetic(stage), rank_by, keep)
                cache = folder / f"quality_{rank_by}_top{keep:g}.json"
                scores = _cached(cache, cache_key, lambda r=records: judge.score(r))
                q = {**scores, **records_summary(records)}
            else:  # the records are read only when the cached scores are stale
                scores = _cached(
                    folder / "quality.json", cache_key, lambda s=stage: judge.score(ctx.synthetic(s))
                )
                q = {**scores, **set_summary(json.loads((folder / CARD).read_text()))}
        except (KeyError, ValueError, FileNotFoundError, TypeError) as err:
            data[label] = {"error": str(err)}
            rows.append([label, f"n/a ({err})"] + ["n/a"] * (len(QUALITY_HEADERS) - 2))
            continue
        data[label] = q
        rewards, audit = q.get("rewards") or {}, q.get("audit") or {}
        rows.append(
            [
                label,
                str(q["num_images"]),
                _num(q["fidelity"], 1, 100),
                _rank(q),
                _num(q.get("diversity")),
                _num(q.get("diversity_ratio"), 2),
                _num(q.get("fid")),
                _num(q.get("kid"), 4),
                _num(rewards.get("sem")),
                _num(rewards.get("cov")),
                _num(rewards.get("exp")),
                _num(audit.get("fraction_flagged"), 1, 100) + _dropped(audit),
            ]
        )
    info = judge.describe()
    judge_line = judge_sentence(info, spec["judge"])
    body = markdown_table(QUALITY_HEADERS, rows) + "\n\n" + judge_line
    return Section(
        spec.get("title", "Generator quality"), _with_caption(body, spec), {"sets": data, "judge": info}
    )


def coverage(ctx: RunContext, spec: dict[str, Any]) -> Section:
    from rgsd_lightning.evaluation.quality import coverage_gain, embed, load_images
    from rgsd_lightning.provenance import folder_fingerprint

    stage = spec["extractor"]
    extractor = ctx.extractor(stage)
    train, size, channels = ctx.real(stage)
    test = ctx.datamodule(stage).heldout_records()
    if not test:
        body = f"No coverage: the data of `{stage}` has no held-out real image of its training identities."
        return Section(spec.get("title", "Coverage"), _with_caption(body, spec), {"sets": {}})
    gallery = embed(extractor, load_images(train, size, channels))
    queries = embed(extractor, load_images(test, size, channels))
    key = folder_fingerprint(ctx.require(stage).export) + f":{len(train)}:{len(test)}:split"
    known = {r.identity for r in train}
    rows, data = [], {}
    for label, set_stage in (spec.get("sets") or {}).items():
        try:
            folder = Path(ctx.require(set_stage).output)
            cache_key = key + ":" + hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()[:16]

            def compute(s: str = set_stage) -> dict[str, Any]:
                records = [r for r in ctx.synthetic(s) if r.identity in known]
                if not records:
                    raise ValueError(f"set {s!r} has no image of the extractor's identities")
                feats = embed(extractor, load_images(records, size, channels))
                gain = coverage_gain(
                    gallery,
                    [r.identity for r in train],
                    feats,
                    [r.identity for r in records],
                    queries,
                    [r.identity for r in test],
                )
                return {**gain, "num_images": len(records)}

            c = _cached(folder / f"coverage_{stage}.json", cache_key, compute)
        except (KeyError, ValueError, FileNotFoundError, TypeError) as err:
            data[label] = {"error": str(err)}
            rows.append([label, f"n/a ({err})", "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        data[label] = c
        rows.append(
            [
                label,
                str(c["num_images"]),
                _num(c["before"], 1, 100),
                _num(c["after"], 1, 100),
                f"{100 * c['gained']:+.1f}",
                f"{-100 * c['taken']:+.1f}",
                f"{100 * c['gain']:+.1f}",
            ]
        )
    headers = ("Set", "images", "1-NN % real only", "1-NN % with the set", "gained", "taken", "gain (points)")
    body = markdown_table(headers, rows) + (
        f"\n\nFeature space: `{stage}` (trained on {len(train)} real images); queries: its {len(test)} "
        "held-out real images of the same identities, none seen by any stage; gallery: its training images, "
        "then with the set's images under their identities. Gained: points of queries whose nearest gallery "
        "image turns to a sample of their own identity; taken: those a sample of another identity takes "
        "from their own. A set that takes more than it gains holds no new view of its people that this space "
        "can see (it can still act as an augmentation)."
    )
    summary = {"sets": data, "extractor": stage}
    return Section(spec.get("title", "Coverage"), _with_caption(body, spec), summary)


def _dropped(audit: dict[str, Any]) -> str:
    """The quality table's note on a set whose near copies were dropped (their share of the audited)."""
    if not audit.get("num_dropped"):
        return ""
    return f" ({_num(audit.get('fraction_dropped'), 1, 100)} dropped)"


def judge_sentence(info: dict[str, Any], name: str) -> str:
    """What a quality judge was trained on and what the syn/real spread compares with, from
    ``Judge.describe()`` (the report's and the benchmarks' line under a quality table)."""
    line = (
        f"Judge `{name}`: trained on {info['num_real_images']} real images of {info['num_identities']} "
        f"identities; its nearest-prototype accuracy on them {100 * info['real_fidelity']:.1f}%, their "
        f"spread {_num(info['train_diversity'])}."
    )
    if info["reference"] == "heldout":
        return line + (
            f" On {info['num_heldout']} held-out real images of the same identities (never seen by the "
            f"judge, like the samples): accuracy {100 * info['heldout_fidelity']:.1f}% (what a new real "
            f"image reaches), spread {_num(info['heldout_diversity'])} (the syn/real reference)."
        )
    return line + " No held-out real images: syn/real compares with the judge's training images."


def selection(ctx: RunContext, spec: dict[str, Any]) -> Section:
    from rgsd_lightning.evaluation.quality import selection_precision

    judge, _ = ctx.judge(spec["judge"], int(spec.get("kid_subset_size", 100)))
    keys = ("kept_share", "precision_seen", "precision_kept", "gain")
    rows, data = [], []
    for entry in spec.get("rows") or []:
        runs = []
        for name in ctx.copies(entry["stage"]):
            hits = sorted(ctx.folder(name).rglob("selection.json")) if name in ctx.results else []
            if not hits:
                continue
            images = json.loads(hits[0].read_text())["images"]
            records = [IdentityRecord(i["path"], i["identity"], 0, "synthetic", "train") for i in images]
            verdicts = judge.verdicts(records)
            runs.append(
                selection_precision([i["seen"] for i in images], [i["kept"] for i in images], verdicts)
            )
        if not runs:
            rows.append([entry["method"], "no selection log"] + [""] * (len(keys) - 1))
            continue
        row = Row.over_runs("", entry["method"], runs)
        data.append({**entry, "runs": runs, "mean": row.metrics, "std": row.spread or {}})
        cells = []
        for key in keys:
            cell = _num(row.metrics[key], 1, 100)
            sd = (row.spread or {}).get(key)
            cells.append(cell if sd is None else f"{cell} ± {100 * sd:.1f}")
        rows.append([entry["method"], *cells])
    headers = ["Row", "kept %", "judge-correct % (all seen)", "judge-correct % (kept)", "gain (points)"]
    body = markdown_table(headers, rows)
    return Section(spec.get("title", "Selection precision"), _with_caption(body, spec), {"rows": data})


def samples(ctx: RunContext, spec: dict[str, Any]) -> Section:
    from rgsd_lightning.report.figures import comparison_grid

    real, size, channels = ctx.real(spec["real"])
    sets, waiting = _finished_sets(ctx, spec)
    identities = _identities(sets.values(), int(spec.get("identities", 8)))
    title = spec.get("title", "Samples")
    path = comparison_grid(
        real,
        list(sets.values()),
        identities,
        ctx.figure(spec.get("figure", title)),
        per_cell=int(spec.get("per_cell", 3)),
        size=size,
        channels=channels,
    )
    columns = " | ".join(["real", *sets])
    body = f"![{columns}]({path.name})" + _waiting_note(waiting)
    data = {"figure": path.name, "identities": identities, "not_finished": waiting}
    return Section(title, _with_caption(body, spec), data)


def rewards(ctx: RunContext, spec: dict[str, Any]) -> Section:
    rows, data = [], {}
    for label, stage in (spec.get("sets") or {}).items():
        card = json.loads((Path(ctx.require(stage).output) / CARD).read_text())
        stats = card.get("reward_stats", {})
        data[label] = {c: stats[c]["mean"] for c in ("sem", "cov", "exp") if c in stats}
        rows.append([label, *(_num(data[label].get(c), 4) for c in ("sem", "cov", "exp"))])
    body = markdown_table(["set", "sem", "cov", "exp"], rows)
    return Section(spec.get("title", "Reward of each synthetic set"), _with_caption(body, spec), data)


def curves(ctx: RunContext, spec: dict[str, Any]) -> Section:
    from rgsd_lightning.rl.curves import plot_reward_curves

    hits = sorted(ctx.folder(spec["stage"]).rglob("reward_history.json"))
    title = spec.get("title", "Reward components over RL")
    if not hits:
        return Section(title, f"Stage `{spec['stage']}` recorded no reward history.")
    history = json.loads(hits[0].read_text())
    path = plot_reward_curves(history, ctx.figure(spec.get("figure", title)))
    return Section(title, _with_caption(f"![reward curves]({path.name})", spec), {"rollouts": len(history)})


def features(ctx: RunContext, spec: dict[str, Any]) -> Section:
    from rgsd_lightning.report.figures import feature_plot

    real, size, channels = ctx.real(spec["real"])
    sets, waiting = _finished_sets(ctx, spec)
    identities = _identities(sets.values(), int(spec.get("identities", 8)))
    title = spec.get("title", "Feature space")
    path = feature_plot(
        ctx.extractor(spec["extractor"]),
        {"real": real, **sets},
        identities,
        ctx.figure(spec.get("figure", title)),
        size=size,
        channels=channels,
    )
    body = f"![features]({path.name})" + _waiting_note(waiting)
    return Section(title, _with_caption(body, spec), {"figure": path.name, "not_finished": waiting})


def audit(ctx: RunContext, spec: dict[str, Any]) -> Section:
    card = json.loads((Path(ctx.require(spec["set"]).output) / CARD).read_text())
    summary = card.get("audit")
    title = spec.get("title", "Privacy audit")
    if not summary:
        return Section(title, "No privacy audit was recorded for this set.")
    lines = [
        f"- images audited: {summary['num_images']}; flagged as near copies of a real training image: "
        f"{summary['num_flagged']} ({100 * summary['fraction_flagged']:.1f}%)"
    ]
    for space in ("pixel", "feature"):
        syn = summary.get("synthetic_nn", {}).get(space)
        same = summary.get("baseline", {}).get(space, {}).get("same_identity")
        if syn and same and syn.get("q50") is not None and same.get("q50") is not None:
            lines.append(
                f"- {space} space: median similarity of a synthetic image to its nearest real image "
                f"{syn['q50']:.3f}, of a real image to its nearest other real image of the same identity "
                f"{same['q50']:.3f}"
            )
    return Section(title, _with_caption("\n".join(lines), spec), {"audit": summary})


def stage_status(ctx: RunContext, name: str) -> str:
    """A pipeline stage's state in the run: "finished" (it ran here), "reused" (taken from the run it ran
    in: :meth:`RunContext.folder` is elsewhere), "not finished" (its folder exists without a ``stage.json``:
    it started and stopped, or is running) or "not run" (no folder: e.g. ``--only`` left it out)."""
    if name in ctx.results:
        return "finished" if ctx.folder(name) == ctx.run / name else "reused"
    return "not finished" if (ctx.run / name).is_dir() else "not run"


def compact_names(names: list[str]) -> list[str]:
    """Stage names with the seed copies of a stage folded: ``a_s0, a_s1, a_s2`` -> ``a_s[0-2]`` (a run of
    consecutive seeds), other names unchanged, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.fullmatch(r"(.+_s)(\d+)", name)
        key, seed = (match.group(1), int(match.group(2))) if match else (name, None)
        groups.setdefault(key, [])
        if seed is not None:
            groups[key].append(seed)
    out = []
    for key, seeds in groups.items():
        if not seeds:
            out.append(key)
        elif len(seeds) > 1 and sorted(seeds) == list(range(min(seeds), max(seeds) + 1)):
            out.append(f"{key}[{min(seeds)}-{max(seeds)}]")
        else:
            out += [f"{key}{seed}" for seed in seeds]
    return out


def run(ctx: RunContext, spec: dict[str, Any]) -> Section:
    rows, data, not_run = [], [], []
    for name in ctx.stage_names:
        r = ctx.results.get(name)
        status = stage_status(ctx, name)
        if status == "not run":
            not_run.append(name)
        elif r is None:
            rows.append([name, status, "", ""])
        else:
            rows.append([name, status, f"{r.seconds:.0f}", f"{r.cpu_seconds:.0f}"])
            data.append({"name": name, "status": status, "wall_s": r.seconds, "cpu_s": r.cpu_seconds})
    own = [d for d in data if d["status"] == "finished"]
    wall, cpu = sum(d["wall_s"] for d in own), sum(d["cpu_s"] for d in own)
    reused_wall = sum(d["wall_s"] for d in data if d["status"] == "reused")
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    body = markdown_table(["stage", "status", "wall s", "CPU s"], rows, numeric_from=2)
    body += (
        f"\n\nStages' own times (recorded when each ran): the stages that ran here, total wall "
        f"{wall / 60:.1f} min, CPU {cpu / 60:.1f} min"
    )
    if reused_wall:
        body += (
            f"; the reused stages (taken from the run they ran in) took {reused_wall / 60:.1f} min wall there"
        )
    body += ". Environment of the report: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."
    if not_run:
        body += (
            f"\n\nNot run ({len(not_run)} of the pipeline's {len(ctx.stage_names)} stages, no folder: a run "
            f"with --only leaves them out): " + ", ".join(compact_names(not_run)) + "."
        )
    summary = {"stages": data, "wall_s": wall, "reused_wall_s": reused_wall, "not_run": not_run, "env": env}
    return Section(spec.get("title", "Run"), _with_caption(body, spec), summary)


def text(ctx: RunContext, spec: dict[str, Any]) -> Section:
    return Section(spec.get("title", ""), str(spec.get("body", "")))


KINDS: dict[str, Callable[[RunContext, dict[str, Any]], Section]] = {
    "table": table,
    "quality": quality,
    "coverage": coverage,
    "selection": selection,
    "samples": samples,
    "rewards": rewards,
    "curves": curves,
    "features": features,
    "audit": audit,
    "run": run,
    "text": text,
}


# ------------------------------------------------------------------------------------------ helpers
def _with_caption(body: str, spec: dict[str, Any]) -> str:
    caption = str(spec.get("caption") or "").strip()
    return body + ("\n\n" + caption if caption else "")


def _num(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{scale * float(value):.{digits}f}"


def _rank(scores: dict[str, Any]) -> str:
    """The median rank of the samples' own identity, "of C" (the judge's identities; chance is the middle)."""
    if scores.get("median_rank") is None:
        return "n/a"
    return f"{float(scores['median_rank']):g} of {scores['num_prototypes']}"


def _finished_sets(
    ctx: RunContext, spec: dict[str, Any]
) -> tuple[dict[str, list[IdentityRecord]], list[str]]:
    """The ``sets`` of a figure section whose stages have finished ({label: records}) and the labels of those
    still running; KeyError when none has finished or a stage is not in the pipeline (misspelt)."""
    sets, waiting = {}, []
    for label, stage in (spec.get("sets") or {}).items():
        if stage in ctx.stage_names and stage not in ctx.results:
            waiting.append(label)
        else:
            sets[label] = ctx.synthetic(stage)
    if waiting and not sets:
        raise KeyError(f"no set has finished (stages {sorted(spec['sets'].values())})")
    return sets, waiting


def _waiting_note(waiting: list[str]) -> str:
    return f"\n\nNot finished yet, so not shown: {', '.join(waiting)}." if waiting else ""


def _identities(sets: Any, n: int) -> list[str]:
    """The first ``n`` identities (sorted) that appear in any of the synthetic sets."""
    return sorted({r.identity for records in sets for r in records})[:n]


def _cached(path: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` cached in ``path`` under ``key`` (recomputed when the key changes)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value
