"""Run pipeline stages as one resumable chain of LightningCLI runs.

Each stage is one LightningCLI run (``fit`` [+ ``test``] or ``predict``) in ``<output>/<stage>/`` with its
resolved ``config.yaml``. A stage is skipped when its ``stage.json`` exists (its outputs are complete); an
interrupted stage resumes from its ``checkpoints/last.ckpt``. ``stage.json`` records the wall and CPU
seconds, the export / synthetic-set paths and the test metrics.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgsd_lightning.io import atomic_write_json, atomic_write_text
from rgsd_lightning.pipeline.spec import Stage, stage_dependencies, substitute

EXPORT_CALLBACK = "rgsd_lightning.callbacks.export.ExportArtifact"
WRITER_CALLBACK = "rgsd_lightning.callbacks.writer.SyntheticSetWriter"
CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"
SPEC_NAME = "pipeline.yaml"
"""The merged pipeline spec a run writes into its output folder (``rgsd report`` reads it)."""


@dataclass
class StageResult:
    """What a stage produced."""

    name: str
    status: str  # "ran" or "skipped"
    seconds: float
    folder: Path
    export: Path | None = None
    output: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "folder": str(self.folder),
            "export": str(self.export) if self.export else None,
            "output": str(self.output) if self.output else None,
            "metrics": self.metrics,
        }

    @classmethod
    def from_marker(cls, folder: Path) -> StageResult | None:
        """The result recorded in ``<folder>/stage.json`` (status "skipped"), or None if unfinished."""
        marker = folder / "stage.json"
        if not marker.is_file():
            return None
        saved = json.loads(marker.read_text())
        return cls(
            str(saved.get("name", folder.name)),
            "skipped",
            float(saved.get("seconds", 0.0)),
            folder,
            Path(saved["export"]) if saved.get("export") else None,
            Path(saved["output"]) if saved.get("output") else None,
            saved.get("metrics", {}),
            float(saved.get("cpu_seconds", 0.0)),
        )

    def refs(self) -> dict[str, str | None]:
        """What later stages may reference: ``${name.export}``, ``${name.output}``, ``${name.folder}``."""
        return {
            "export": str(self.export) if self.export else None,
            "output": str(self.output) if self.output else None,
            "folder": str(self.folder),
        }


# ------------------------------------------------------------------------------------ placing a stage
def _export_name(class_path: str) -> str:
    """The artifact kind a module exports ("generator" / "backbone"), read from the class."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(getattr(importlib.import_module(module), name), "export_name", "artifact")
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model class {class_path!r}: {err}") from err


def _callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    trainer["callbacks"] = callbacks
    return callbacks


def place_stage(config: dict[str, Any], folder: Path) -> tuple[dict[str, Any], Path | None, Path | None]:
    """Point the stage's run folder, checkpoints, export and synthetic output into ``folder``.

    Returns the config and the export / synthetic-set paths the stage will produce (or None).
    """
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(folder)
    export = output = None
    has_checkpoint = False
    for cb in _callbacks(config):
        init = cb.setdefault("init_args", {})
        if cb.get("class_path") == EXPORT_CALLBACK:
            export = folder / "export" / _export_name(config.get("model", {}).get("class_path", ""))
            init["dirpath"] = str(export)
        elif cb.get("class_path") == WRITER_CALLBACK:
            output = folder / "synthetic"
            init["output_dir"] = str(output)
        elif cb.get("class_path") == CHECKPOINT_CALLBACK:
            init["dirpath"] = str(folder / "checkpoints")
            init.setdefault("save_last", True)
            has_checkpoint = True
    if not has_checkpoint and trainer.get("enable_checkpointing", True) is not False:
        # every epoch, also when validation is rare: the stage can resume from last.ckpt
        resume = {"dirpath": str(folder / "checkpoints"), "save_last": True, "save_on_train_epoch_end": True}
        trainer["callbacks"].append({"class_path": CHECKPOINT_CALLBACK, "init_args": resume})
    return config, export, output


def run_stage(
    stage: Stage, output: Path, refs: dict[str, dict[str, str | None]], force: bool = False
) -> StageResult:
    """Run one stage (or skip it when its ``stage.json`` says it is complete)."""
    from rgsd_lightning.cli import build_cli

    folder = output / stage.name
    config, export, out = place_stage(substitute(stage.config, refs), folder)
    if not force:
        done = StageResult.from_marker(folder)
        if done is not None:
            _warn_if_changed(folder, config)
            return done
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(config, sort_keys=False))
    wall, cpu = time.perf_counter(), time.process_time()
    cli = build_cli(["--config", str(cfg_path)], run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    metrics: dict[str, float] = {}
    if stage.command == "fit":
        last = folder / "checkpoints" / "last.ckpt"
        if last.is_file():
            _check_resume(last, config, model)
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        if stage.test:
            results = trainer.test(model, datamodule=datamodule, verbose=False)
            metrics = {k: float(v) for r in results for k, v in r.items()}
    elif stage.command == "predict":
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    else:
        raise ValueError(f"stage {stage.name!r}: command must be 'fit' or 'predict', got {stage.command!r}")
    result = StageResult(
        stage.name,
        "ran",
        time.perf_counter() - wall,
        folder,
        export,
        out,
        metrics,
        time.process_time() - cpu,
    )
    if trainer.is_global_zero:
        if metrics:
            atomic_write_json(folder / "metrics.json", metrics)
        atomic_write_json(folder / "stage.json", {**result.as_dict(), "spec": config})
    _release(cli)
    return result


def _warn_if_changed(folder: Path, config: dict[str, Any]) -> None:
    """A finished stage is reused as it is; if the pipeline now gives it other settings than it ran with
    (recorded in its ``stage.json``), say which, and how to run it again. A stage taken from another run
    folder (``reuse``) is compared with its own folder's paths mapped to this one."""
    from rgsd_lightning.cli import flat_options

    marker = json.loads((folder / "stage.json").read_text())
    saved = marker.get("spec")
    if saved is None:  # finished before stages recorded their settings
        return
    if marker.get("reused_from"):
        saved = _moved(saved, str(marker["reused_from"]), str(folder))
    before, after = flat_options(saved), flat_options(json.loads(json.dumps(config)))
    changed = [
        f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    if changed:
        warnings.warn(
            f"stage {folder.name!r} finished with other settings than the pipeline now gives it, and its "
            f"results are reused as they are: {'; '.join(changed[:8])}"
            + (f" (and {len(changed) - 8} more)" if len(changed) > 8 else "")
            + f". To run it with the new settings, delete {folder} "
            f"(rgsd pipeline: --force '[{folder.name}]').",
            stacklevel=3,
        )


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` with the folder ``old`` replaced by ``new`` in every path (string) it holds."""
    if isinstance(value, str):
        return re.sub(re.escape(old) + r"(?=/|$)", lambda _: new, value)
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    return value


def _release(cli: Any) -> None:
    """Drop the CLI's references to the stage's model, data and trainer.

    jsonargparse keeps the last parser in a context variable and the parser reaches this CLI object, so
    without this the previous stage's model (gigabytes at paper scale) stays alive into the next stage.
    """
    for name in ("model", "datamodule", "trainer", "config_init"):
        if hasattr(cli, name):
            setattr(cli, name, None)


def _check_resume(last: Path, config: dict[str, Any], model: Any) -> None:
    """The interrupted stage's own ``last.ckpt`` resumes it only if it is still the same stage (class,
    input artifact, identity count); edited options are listed in a warning (``rgsd fit --ckpt_path``)."""
    from rgsd_lightning.cli import check_resume

    spec = config.get("model") or {}
    saved = check_resume(str(last), spec.get("class_path", ""), spec.get("init_args") or {})
    current = getattr(model, "hparams", {}).get("num_identities")
    if saved.get("num_identities") is not None and current is not None and saved["num_identities"] != current:
        raise ValueError(
            f"{last} was trained on {saved['num_identities']} identities but the stage's data now has "
            f"{current}: delete the stage folder {last.parent.parent} to start it afresh"
        )


def run_pipeline(
    output: str | Path,
    stages: Sequence[Stage],
    *,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    announce: Callable[[str], None] | None = None,
) -> dict[str, StageResult]:
    """Run stages in order, wiring ``${stage.export}`` / ``${stage.output}`` references between them.

    ``only`` names stages or shell-style patterns of them (``k3_*_s[3-7]``). Stages left out by ``only`` are
    not run; their earlier results (if finished) still feed later stages and are returned with status
    "skipped". (Independent stages side by side: :func:`rgsd_lightning.pipeline.parallel.run_parallel`.)
    """
    announce = announce or (lambda line: print(line, flush=True))
    output = Path(output)
    only = stages_to_run(stages, only, force)
    results = finished_outside(output, stages, only)
    refs = {name: result.refs() for name, result in results.items()}
    for i, stage in enumerate(stages):
        if only and stage.name not in only:
            continue
        label = f"[{i + 1}/{len(stages)}] {stage.name}"
        announce(f"{label}: {stage.describe or stage.command} ...")
        result = run_stage(stage, output, refs, force=stage.name in force)
        results[stage.name], refs[stage.name] = result, result.refs()
        announce(done_line(label, result))
    return results


def adopt_stages(
    output: str | Path, stages: Sequence[Stage], source: str | Path, patterns: Sequence[str]
) -> list[str]:
    """Let the finished stages of run folder ``source`` that match ``patterns`` stand in for this run's
    stages of the same names (a pipeline's ``reuse`` block): each gets a ``stage.json`` in ``output`` that
    records the original's results and artifact paths (which stay in ``source``) and ``reused_from``, the
    folder the stage ran in (for a stage ``source`` itself reused, that stage's own ``reused_from``).

    A stage already finished here is left alone. Returns the names adopted now; ValueError, before any
    marker is written, naming a matched stage that has not finished in ``source``.
    """
    output, source = Path(output), Path(source)
    if output.resolve() == source.resolve():
        raise ValueError(f"reuse.from is this run's own folder ({source})")
    names = select_stages(patterns, [s.name for s in stages])
    todo = [n for n in names if not (output / n / "stage.json").is_file()]
    missing = [n for n in todo if not (source / n / "stage.json").is_file()]
    if missing:
        raise ValueError(
            f"reuse: stages {missing} have not finished in {source} (no {source / missing[0] / 'stage.json'})"
        )
    for name in todo:
        marker = json.loads((source / name / "stage.json").read_text())
        # a stage the source itself took from a third run points to the folder it ran in
        ran_in = marker.get("reused_from") or str(source / name)
        (output / name).mkdir(parents=True, exist_ok=True)
        atomic_write_json(output / name / "stage.json", {**marker, "reused_from": ran_in})
    return todo


def stages_to_run(
    stages: Sequence[Stage], only: Sequence[str] | None, force: Sequence[str]
) -> list[str] | None:
    """Check a run's stage names (unique; ``force`` names only known stages) and expand ``only``'s
    patterns (:func:`select_stages`); None when every stage runs."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    unknown = sorted(set(force) - set(names))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the pipeline has {names}")
    return select_stages(only, names) if only else None


def finished_outside(
    output: Path, stages: Sequence[Stage], only: Sequence[str] | None
) -> dict[str, StageResult]:
    """The finished stages ``only`` leaves out (they feed the selected ones), after checking that every
    selected stage references only selected or finished stages: a ValueError naming them before anything
    runs, instead of a failure in the middle of the run."""
    if not only:
        return {}
    finished = {s.name: StageResult.from_marker(output / s.name) for s in stages if s.name not in only}
    finished = {name: result for name, result in finished.items() if result is not None}
    available = set(only) | set(finished)
    missing = {name: sorted(needs - available) for name, needs in stage_dependencies(stages).items()}
    missing = {name: needs for name, needs in missing.items() if name in only and needs}
    if missing:
        listed = "; ".join(f"{name} needs {needs}" for name, needs in list(missing.items())[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"the selected stages need stages that are neither selected nor finished: {listed}{more}. "
            "Select those too, or narrow the patterns that selected these."
        )
    return finished


def select_stages(patterns: Sequence[str], names: Sequence[str]) -> list[str]:
    """The stage names matching any of ``patterns`` (names or shell-style patterns such as
    ``k3_real_s[3-7]``), in pipeline order; ValueError naming a pattern that matches no stage."""
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f"unknown stages {unmatched}; the pipeline has {list(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def done_line(label: str, result: StageResult) -> str:
    """The progress line of a stage that ran or was skipped: time, what it produced, its first metrics."""
    summary = ", ".join(f"{k}={v:.3f}" for k, v in list(result.metrics.items())[:4])
    where = result.export or result.output or result.folder
    return f"{label}: {result.status} in {result.seconds:.0f}s -> {where}" + (
        f" ({summary})" if summary else ""
    )


def collect_results(output: str | Path, stages: Sequence[Stage]) -> dict[str, StageResult]:
    """The finished stages of a run folder (from their ``stage.json``), in pipeline order."""
    output = Path(output)
    found = {s.name: StageResult.from_marker(output / s.name) for s in stages}
    return {name: r for name, r in found.items() if r is not None}


def save_spec(output: str | Path, spec: dict[str, Any]) -> Path:
    """Write the merged spec into the run folder (what ``rgsd report RUN`` reads back)."""
    path = Path(output) / SPEC_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(copy.deepcopy(spec), sort_keys=False))
    return path
