"""Pipeline YAML: read, overlay, expand into stages (pure; nothing runs here).

A pipeline file is the single definition of a run: which LightningCLI stage configs run, in which order,
with which overrides, and what the report shows::

    extends: pipeline.yaml        # optional: overlay another pipeline file (mappings merge, lists replace)
    output: runs/demo             # the run folder; ``${output}`` in any value
    vars:                         # ``${name}`` anywhere below (a value that is exactly "${name}" keeps the
      image_size: 32              # var's type: ints, lists, mappings); vars may use ``${output}`` and
      seeds: [0, 1, 2]            # vars defined above them
    defaults:                     # dotted keys set in every stage's config
      trainer.accelerator: cpu
    stages:
      - name: prior
        config: prior.yaml        # a LightningCLI config; relative: to this file's folder, else the cwd
        describe: pre-train the prior
        set:                      # dotted keys set in this stage's config (after ``defaults``)
          model.init_args.image_size: ${image_size}
      - name: down_real
        config: reid.yaml
        test: true                # after ``fit``, run ``test``; metrics into <stage>/metrics.json
        seeds: ${seeds}           # one stage per seed: down_real_s0, ... (``seed_everything`` and ${seed})
      - name: prior
        config: prior.yaml
        when: ${train_prior}      # optional: a boolean var; false leaves the stage out of the run
      - foreach: {shot: [1, 3]}   # or a list of mappings [{shot: 1, label: k1}, ...]; each item's keys
        stages: [...]             # become vars of the nested entries (names must stay unique)
    report: {...}                 # sections of ``rgsd report`` (rgsd_lightning.report.sections)
    reuse:                        # optional: finished stages of another run folder stand in for these
      from: runs/study            # (names or shell-style patterns); their artifacts stay where they are,
      stages: [prior, k3_gen_*]   # each gets a stage.json here pointing to them (:func:`reuse_plan`)

``${stage.export}``, ``${stage.output}`` and ``${stage.folder}`` name what an earlier stage produced; they
are resolved when the stage runs (:func:`substitute`). Stages hand artifacts over by path, never by
``--ckpt_path``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REF = re.compile(r"\$\{([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\}")
_STAGE_KEYS = {"name", "config", "set", "describe", "command", "test", "seeds", "when"}
_TOP_KEYS = {"extends", "output", "vars", "defaults", "stages", "report", "reuse"}


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


# ------------------------------------------------------------------------------------ dict plumbing
def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"]["c"] = value`` for ``key = "a.b.c"`` (intermediate dicts created).

    A numeric part indexes an existing list (``trainer.callbacks.0.init_args.x``).
    """
    parts = key.split(".")
    node: Any = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{key}: {part!r} is not an index of the list at {'.'.join(parts[:i])}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]


def merge(base: Any, overlay: Any) -> Any:
    """``overlay`` on ``base``: mappings merge key by key (recursively), anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(overlay)


def substitute(value: Any, refs: dict[str, dict[str, str | None]], strict: bool = True) -> Any:
    """Replace ``${stage.key}`` references in strings (recursively in dicts and lists).

    With ``strict`` an unknown stage or key is an error; otherwise it is left for a later pass.
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


def referenced_stages(value: Any) -> set[str]:
    """The stage names of the ``${stage.key}`` references in ``value`` (strings, recursively in dicts and
    lists): what :func:`substitute` will need from earlier stages."""
    if isinstance(value, str):
        return {group for group, _ in _REF.findall(value)}
    if isinstance(value, dict):
        return set().union(*(referenced_stages(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(referenced_stages(v) for v in value))
    return set()


def stage_dependencies(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """For each stage, the earlier stages its config references (``${name.export|output|folder}``).

    A reference to a later stage or to no stage of the pipeline is not a dependency (running the stage
    fails on it with the sequential runner's message).
    """
    deps: dict[str, set[str]] = {}
    for stage in stages:
        deps[stage.name] = {n for n in referenced_stages(stage.config) if n in deps}  # earlier stages only
    return deps


def substitute_vars(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Replace ``${name}`` (no dot) by pipeline vars, recursively; ``${stage.key}`` references stay.

    A string that is exactly one ``${name}`` becomes the var's value with its type; inside a longer string
    the var is formatted with ``str``, and so it is in mapping keys (a key stays a string). Unknown names
    raise an error naming ``where``.
    """
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole:
            return copy.deepcopy(_lookup(variables, whole.group(1), where))
        return substitute_in_text(value, variables, where)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = substitute_in_text(key, variables, where) if isinstance(key, str) else key
            out[name] = substitute_vars(item, variables, f"{where}.{key}")
        return out
    if isinstance(value, list):
        return [substitute_vars(v, variables, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def substitute_in_text(text: str, variables: dict[str, Any], where: str) -> str:
    """``text`` with every ``${name}`` var formatted into it (innermost first: ``"${k${shot}_cold.export}"``
    -> ``"${k1_cold.export}"``); ``${stage.key}`` references stay."""
    previous = None
    while previous != text:
        previous = text
        text = _VAR.sub(lambda m: _format(_lookup(variables, m.group(1), where)), text)
    return text


def _lookup(variables: dict[str, Any], name: str, where: str) -> Any:
    if name not in variables:
        known = ", ".join(sorted(variables)) or "none"
        raise ValueError(f"{where}: unknown variable ${{{name}}} (vars: {known})")
    return variables[name]


def _format(value: Any) -> str:
    if value is None:
        return "null"
    return value if isinstance(value, str) else str(value)


# ------------------------------------------------------------------------------------------ reading
def _resolve_configs(entries: Any, folder: Path, where: str) -> Any:
    """Make each stage's ``config`` path absolute (relative to ``folder``, the pipeline file's folder, if it
    exists there, else to the cwd), so a saved spec works from anywhere."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'stages' must be a list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}[{i}]: a stage must be a mapping, got {entry!r}")
        entry = dict(entry)
        if "stages" in entry:
            entry["stages"] = _resolve_configs(entry["stages"], folder, f"{where}[{i}].stages")
        elif isinstance(entry.get("config"), str) and "${" not in entry["config"]:
            path = Path(entry["config"])
            if not path.is_absolute():
                path = folder / path if (folder / path).exists() or not path.exists() else path
                entry["config"] = str(path.resolve())
        out.append(entry)
    return out


def read_spec(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A pipeline file with its ``extends`` chain merged and ``key=value`` overrides applied.

    Args:
        path: the pipeline YAML.
        overrides: dotted ``key=value`` strings on the spec (values parsed as YAML), e.g.
            ``vars.seeds=[0]`` or ``output=runs/x``.
    """
    spec = _read_file(Path(path), seen=())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value (e.g. vars.seeds=[0])")
        set_dotted(spec, key.strip(), yaml.safe_load(text))
    return spec


def _read_file(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"pipeline file not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' loops back to itself")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a pipeline file must be a mapping")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(_TOP_KEYS)})")
    if "stages" in data:
        data["stages"] = _resolve_configs(data["stages"], path.parent, f"{path}: stages")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    base_path = Path(base_name)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return merge(_read_file(base_path, (*seen, path.resolve())), data)


def resolve_vars(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec's vars, each substituted with ``output`` and the vars defined before it."""
    variables: dict[str, Any] = {"output": str(spec.get("output", "runs/pipeline"))}
    raw = spec.get("vars") or {}
    if not isinstance(raw, dict):
        raise ValueError("'vars' must be a mapping of names to values")
    for name, value in raw.items():
        if name == "output":
            raise ValueError("'output' is set at the top of the pipeline file, not in vars")
        variables[name] = substitute_vars(value, variables, f"vars.{name}")
    return variables


# ---------------------------------------------------------------------------------------- expanding
def foreach_items(foreach: Any, where: str) -> list[dict[str, Any]]:
    """The items of a ``foreach``: a list of mappings, or ``{name: [values]}`` for one var."""
    if isinstance(foreach, dict) and len(foreach) == 1:
        ((name, values),) = foreach.items()
        if not isinstance(values, list):
            raise ValueError(f"{where}.foreach.{name}: expected a list of values")
        return [{name: v} for v in values]
    if isinstance(foreach, list) and all(isinstance(item, dict) for item in foreach):
        return [dict(item) for item in foreach]
    raise ValueError(f"{where}.foreach: expected {{name: [values]}} or a list of mappings, got {foreach!r}")


def expand_entries(
    entries: Iterable[dict[str, Any]], variables: dict[str, Any], where: str, children: str = "stages"
) -> Iterable[tuple[dict[str, Any], dict[str, Any], str]]:
    """Flatten ``foreach`` groups (``{foreach, <children>}``): yields (entry, its vars, where) per leaf."""
    for i, entry in enumerate(entries):
        here = f"{where}[{i}]"
        if "foreach" in entry or children in entry:
            if set(entry) != {"foreach", children}:
                raise ValueError(
                    f"{here}: a group holds exactly 'foreach' and '{children}' (got {sorted(entry)})"
                )
            items = foreach_items(substitute_vars(entry["foreach"], variables, here), here)
            for item in items:
                yield from expand_entries(entry[children], {**variables, **item}, here, children)
        else:
            yield entry, variables, here


def _leaves(spec: dict[str, Any]) -> Iterable[tuple[dict[str, Any], dict[str, Any], str, int | None]]:
    """Every stage entry with its vars, where, and seed (None without ``seeds``), validated."""
    if not spec.get("stages"):
        raise ValueError("a pipeline needs a list of 'stages'")
    for entry, local, where in expand_entries(spec["stages"], resolve_vars(spec), "stages"):
        unknown = sorted(set(entry) - _STAGE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(_STAGE_KEYS)})")
        missing = [k for k in ("name", "config") if k not in entry]
        if missing:
            raise ValueError(f"{where}: stage {entry!r} lacks {missing}")
        when = substitute_vars(entry.get("when", True), local, f"{where}.when")
        if not isinstance(when, bool):
            raise ValueError(f"{where}.when: expected true or false, got {when!r}")
        if not when:
            continue
        seeds = substitute_vars(entry.get("seeds"), local, f"{where}.seeds")
        if seeds is not None and not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
            raise ValueError(f"{where}.seeds: expected a list of ints, got {seeds!r}")
        for seed in [None] if seeds is None else seeds:
            yield entry, (local if seed is None else {**local, "seed": seed}), where, seed


def _stage_name(entry: dict[str, Any], scope: dict[str, Any], where: str, seed: int | None) -> str:
    name = str(substitute_vars(entry["name"], scope, f"{where}.name"))
    return name if seed is None else seed_stage(name, seed)


def _unique(names: list[str]) -> list[str]:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"stage names must be unique; repeated: {duplicates}")
    return names


def stage_names(spec: dict[str, Any]) -> list[str]:
    """The names of a spec's stages in run order (no stage file is read)."""
    return _unique([_stage_name(entry, scope, where, seed) for entry, scope, where, seed in _leaves(spec)])


def expand(spec: dict[str, Any]) -> tuple[Path, list[Stage]]:
    """The run folder and the stages of a spec (stage YAMLs loaded, defaults and ``set`` applied)."""
    defaults = spec.get("defaults") or {}
    stages = [_make_stage(entry, scope, defaults, where, seed) for entry, scope, where, seed in _leaves(spec)]
    _unique([s.name for s in stages])
    return Path(resolve_vars(spec)["output"]), stages


def _make_stage(
    entry: dict[str, Any], scope: dict[str, Any], defaults: dict[str, Any], where: str, seed: int | None
) -> Stage:
    name = _stage_name(entry, scope, where, seed)
    cfg_path = Path(substitute_vars(entry["config"], scope, f"{where}.config"))
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{where}: stage {name!r}: config not found: {cfg_path}")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    for key, value in {**defaults, **(entry.get("set") or {})}.items():
        dotted = substitute_in_text(key, scope, f"{where}.set.{key}")
        set_dotted(config, dotted, substitute_vars(value, scope, f"{where}.set.{key}"))
    if seed is not None:
        config["seed_everything"] = seed
    command = str(substitute_vars(entry.get("command", "fit"), scope, f"{where}.command"))
    if command not in ("fit", "predict"):
        raise ValueError(f"{where}: command must be 'fit' or 'predict', got {command!r}")
    describe = str(substitute_vars(entry.get("describe", ""), scope, f"{where}.describe"))
    return Stage(name, config, command, bool(entry.get("test", False)), describe)


def seed_stage(name: str, seed: int) -> str:
    """Name of the copy of stage ``name`` trained with ``seed`` (``down_rl`` -> ``down_rl_s0``)."""
    return f"{name}_s{seed}"


def reuse_plan(spec: dict[str, Any]) -> tuple[Path, list[str]] | None:
    """The spec's ``reuse`` block as (the other run folder, stage names or patterns); None without one."""
    block = spec.get("reuse")
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) != {"from", "stages"}:
        raise ValueError(f"reuse: expected {{from: RUN_FOLDER, stages: [names or patterns]}}, got {block!r}")
    patterns = block["stages"]
    if not isinstance(block["from"], str) or not block["from"]:
        raise ValueError(f"reuse.from: expected a run folder, got {block['from']!r}")
    if not (isinstance(patterns, list) and patterns and all(isinstance(p, str) for p in patterns)):
        raise ValueError(f"reuse.stages: expected a list of stage names or patterns, got {patterns!r}")
    return Path(block["from"]), list(patterns)


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, list[Stage]]:
    """Read a pipeline YAML (``extends`` merged, overrides applied): its output folder and stages."""
    return expand(read_spec(path, overrides))
