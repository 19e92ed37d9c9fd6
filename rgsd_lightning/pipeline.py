"""Run the stages of the method as one resumable chain (``rgsd pipeline``, and ``rgsd demo`` on top of it).

A pipeline is a list of stages; each stage is one LightningCLI run (``fit`` or ``predict``) of a stage YAML
with overrides, in its own folder ``<output>/<stage>/``. Stages hand artifacts to later stages by path
(``${baseline.export}``, ``${generate.output}``), never by ``--ckpt_path``. A stage is skipped when its
``stage.json`` exists (its outputs are complete); a stage that was interrupted resumes from its
``checkpoints/last.ckpt``.

Pipeline YAML::

    output: runs/market1501
    defaults:                          # dotted keys set in every stage (``${paths.x}`` substituted)
      data.init_args.root: ${paths.data_root}
    paths:
      data_root: /path/to/Market-1501-v15.09.15
    stages:
      - name: baseline
        config: experiments/market1501/reid_resnet50.yaml
        test: true                     # run `test` after `fit`, metrics into <stage>/metrics.json
      - name: reward_dpok
        config: experiments/market1501/reward_dpok.yaml
        set:
          model.init_args.reward_extractor: ${baseline.export}
      - name: generate
        command: predict
        config: experiments/market1501/generate.yaml

Each stage's resolved config is written to ``<output>/<stage>/config.yaml`` before it runs.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgsd_lightning.data.records import atomic_write_json, atomic_write_text

EXPORT_CALLBACK = "rgsd_lightning.callbacks.export.ExportArtifact"
WRITER_CALLBACK = "rgsd_lightning.callbacks.writer.SyntheticSetWriter"
CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"
_REF = re.compile(r"\$\{([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\}")


@dataclass
class Stage:
    """One step of a pipeline.

    Attributes:
        name: folder name and reference name (``${name.export}``).
        config: the LightningCLI config (trainer / model / data / seed_everything) as a dict.
        command: "fit" or "predict".
        test: after ``fit``, run ``test`` on the fitted model and store the metrics.
        describe: one line shown when the stage starts.
    """

    name: str
    config: dict[str, Any]
    command: str = "fit"
    test: bool = False
    describe: str = ""


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "folder": str(self.folder),
            "export": str(self.export) if self.export else None,
            "output": str(self.output) if self.output else None,
            "metrics": self.metrics,
        }


# ------------------------------------------------------------------------------------ config plumbing
def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"]["c"] = value`` for ``key = "a.b.c"`` (intermediate dicts created)."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def substitute(value: Any, refs: dict[str, dict[str, str | None]], strict: bool = True) -> Any:
    """Replace ``${group.key}`` references in strings (recursively in dicts and lists).

    With ``strict`` an unknown group or key is an error; otherwise it is left for a later pass.
    """
    if isinstance(value, str):

        def repl(m: re.Match) -> str:
            group, key = m.group(1), m.group(2)
            if group in refs and refs[group].get(key) is not None:
                return str(refs[group][key])
            if strict:
                raise ValueError(f"unresolved reference ${{{group}.{key}}} (no earlier stage produced it)")
            return m.group(0)

        return _REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute(v, refs, strict) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, refs, strict) for v in value]
    return value


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


def load_pipeline(path: str | Path) -> tuple[Path, list[Stage]]:
    """Read a pipeline YAML: its output folder and stages (stage YAMLs loaded, ``set`` applied)."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "stages" not in spec:
        raise ValueError(f"{path}: a pipeline needs 'output' and a list of 'stages'")
    paths = {k: str(v) for k, v in (spec.get("paths") or {}).items()}
    stages = []
    for entry in spec["stages"]:
        missing = [k for k in ("name", "config") if k not in entry]
        if missing:
            raise ValueError(f"{path}: stage {entry!r} lacks {missing}")
        cfg_path = Path(entry["config"])
        if not cfg_path.is_absolute() and not cfg_path.exists():
            cfg_path = path.parent / cfg_path
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path}: stage {entry['name']!r}: config not found: {entry['config']}")
        config = yaml.safe_load(cfg_path.read_text())
        for key, value in {**(spec.get("defaults") or {}), **(entry.get("set") or {})}.items():
            set_dotted(config, key, substitute(value, {"paths": paths}, strict=False))
        stages.append(
            Stage(entry["name"], config, entry.get("command", "fit"), bool(entry.get("test", False)))
        )
    return Path(spec.get("output", "runs/pipeline")), stages


# ------------------------------------------------------------------------------------------ running
def run_stage(
    stage: Stage, output: Path, refs: dict[str, dict[str, str]], force: bool = False
) -> StageResult:
    """Run one stage (or skip it when its ``stage.json`` says it is complete)."""
    from rgsd_lightning.cli import build_cli

    folder = output / stage.name
    marker = folder / "stage.json"
    if marker.is_file() and not force:
        saved = json.loads(marker.read_text())
        return StageResult(
            stage.name,
            "skipped",
            0.0,
            folder,
            Path(saved["export"]) if saved.get("export") else None,
            Path(saved["output"]) if saved.get("output") else None,
            saved.get("metrics", {}),
        )
    config, export, out = place_stage(substitute(stage.config, refs), folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(config, sort_keys=False))
    start = time.time()
    cli = build_cli(["--config", str(cfg_path)], run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    metrics: dict[str, float] = {}
    if stage.command == "fit":
        last = folder / "checkpoints" / "last.ckpt"
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        if stage.test:
            results = trainer.test(model, datamodule=datamodule, verbose=False)
            metrics = {k: float(v) for r in results for k, v in r.items()}
    elif stage.command == "predict":
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    else:
        raise ValueError(f"stage {stage.name!r}: command must be 'fit' or 'predict', got {stage.command!r}")
    result = StageResult(stage.name, "ran", time.time() - start, folder, export, out, metrics)
    if trainer.is_global_zero:
        if metrics:
            atomic_write_json(folder / "metrics.json", metrics)
        atomic_write_json(marker, result.as_dict())
    return result


def run_pipeline(
    output: str | Path,
    stages: Sequence[Stage],
    *,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    announce: Callable[[str], None] | None = None,
) -> dict[str, StageResult]:
    """Run stages in order, wiring ``${stage.export}`` / ``${stage.output}`` references between them."""
    announce = announce or (lambda line: print(line, flush=True))
    output = Path(output)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    unknown = sorted(set(only or []) - set(names)) + sorted(set(force) - set(names))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the pipeline has {names}")
    results: dict[str, StageResult] = {}
    refs: dict[str, dict[str, str]] = {}
    for i, stage in enumerate(stages):
        if only and stage.name not in only:
            marker = output / stage.name / "stage.json"
            if marker.is_file():  # earlier results still feed later stages
                saved = json.loads(marker.read_text())
                refs[stage.name] = {
                    "export": saved.get("export"),
                    "output": saved.get("output"),
                    "folder": str(output / stage.name),
                }
            continue
        label = f"[{i + 1}/{len(stages)}] {stage.name}"
        announce(f"{label}: {stage.describe or stage.command} ...")
        result = run_stage(stage, output, refs, force=stage.name in force)
        results[stage.name] = result
        refs[stage.name] = {
            "export": str(result.export) if result.export else None,
            "output": str(result.output) if result.output else None,
            "folder": str(result.folder),
        }
        summary = ", ".join(f"{k}={v:.3f}" for k, v in list(result.metrics.items())[:4])
        where = result.export or result.output or result.folder
        announce(
            f"{label}: {result.status} in {result.seconds:.0f}s -> {where}"
            + (f" ({summary})" if summary else "")
        )
    return results
