"""The utility study's configuration: one YAML file, read into typed dataclasses.

A config names the data by path (prior and target), the shot settings, the seeds, the rows to run, any
external synthetic sets, and the size of every stage. ``quick:`` holds dotted overrides applied by
``--quick``; ``--set key=value`` applies more (``--set target.path=/data/orl``). Relative data paths are
resolved against the current working directory (run the study from the repository root). Unknown keys
are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("face", "reid")
PRIOR_FORMATS = ("identity_folders", "unlabelled", "market1501", "manifest")
TARGET_FORMATS = ("identity_folders", "market1501")
REWARD_VARIANTS = {  # generator set -> reward lambdas (sem, cov, exp); "cold" has no RL stage
    "rl_semantic": (1.0, 0.0, 0.0),
    "rl_coverage": (1.0, 0.75, 0.0),
    "rl_full": (1.0, 0.75, 0.25),
}


@dataclass(frozen=True)
class RowSpec:
    """One downstream row: which synthetic set (if any) is mixed in, with which options."""

    key: str
    group: str
    method: str
    synthetic: str | None = None  # a generator set name ("cold", "rl_full"...) or "ext_<name>"
    erasing: bool = False
    selection: bool = False


ROWS: dict[str, RowSpec] = {
    r.key: r
    for r in (
        RowSpec("real", "Base", "real only"),
        RowSpec("erasing", "Real Aug.", "+ Random Erasing", erasing=True),
        RowSpec("cold", "Synthetic Aug.", "+ cold-start synthetic", "cold"),
        RowSpec("rl", "Synthetic Aug.", "+ RL synthetic", "rl_full"),
        RowSpec(
            "rl_selection", "Synthetic Aug.", "+ RL synthetic + selection (ours)", "rl_full", selection=True
        ),
        RowSpec("cold_selection", "Ablation", "base DiT + selection", "cold", selection=True),
        RowSpec("rl_semantic_selection", "Ablation", "+ semantic reward", "rl_semantic", selection=True),
        RowSpec("rl_coverage_selection", "Ablation", "+ coverage reward", "rl_coverage", selection=True),
    )
}
# the paper's Figure 5 order: base DiT, + selection, + semantic, + coverage, + expansion
ABLATION = (
    ("base DiT (cold start)", "cold"),
    ("+ selection", "cold_selection"),
    ("+ semantic reward", "rl_semantic_selection"),
    ("+ coverage reward", "rl_coverage_selection"),
    ("+ expansion reward (full)", "rl_selection"),
)


@dataclass
class DataSpec:
    """A dataset named by path.

    Attributes:
        path: dataset folder (relative paths resolve against the working directory).
        format: prior: identity_folders | unlabelled | market1501 | manifest; target: identity_folders |
            market1501.
        exclude: file-name patterns (fnmatch) to leave out, e.g. ``*_Ambient*`` for Yale B.
        split_seed: target identity folders: None = the first k images (natural order) of every identity
            train, an int draws them with this seed.
    """

    path: str = ""
    format: str = "identity_folders"
    exclude: list[str] = field(default_factory=list)
    split_seed: int | None = None


@dataclass
class PriorSize:
    """Pre-training of the prior DiT (from scratch, all parameters)."""

    preset: str = "small"
    steps: int = 3000
    lr: float = 1e-3
    warmup_steps: int = 200
    batch_size: int = 32
    ema_decay: float = 0.999


@dataclass
class ColdSize:
    """Cold start of the prior on the target identities (new label table, full fine-tune by default)."""

    steps: int = 1200
    trainable: str = "all"
    lr: float = 1e-4
    table_lr: float = 1e-2
    batch_size: int = 32
    ema_decay: float = 0.999


@dataclass
class RLSize:
    """RewardDPOK (CPU-sized DPOK: larger lr and ratio clip than the paper-scale defaults)."""

    rollouts: int = 24
    identities: int = 8
    samples_per_identity: int = 4
    sample_steps: int = 20
    guidance_scale: float = 2.0
    lr: float = 1e-3
    ratio_clip: float = 0.05
    reward_weight: float = 10.0
    kl_weight: float = 0.01
    policy_steps: int = 2
    micro_batch: int = 32
    grad_accum: int = 2
    timestep_fraction: float = 0.5


@dataclass
class GenerateSize:
    """Generation of each synthetic set (audited against the real training images)."""

    per_identity: int = 20
    sample_steps: int = 25
    guidance_scale: float = 2.0
    batch_size: int = 64


@dataclass
class RecognizerSize:
    """Downstream recognizer (and judge) training: CosFace for faces, BNNeck CE + triplet for ReID."""

    architecture: str = "test_resnet"
    embedding_dim: int = 128
    steps: int = 500
    batches_per_epoch: int = 50
    p: int = 16
    k: int = 4
    lr: float = 0.1
    input_size: list[int] = field(default_factory=lambda: [32, 32])
    synthetic_fraction: float = 0.25
    erasing: float = 0.5
    selection_keep_ratio: float = 0.5
    selection_lr: float = 0.01
    selection_scope: str = "full"
    judge_steps: int = 800
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExternalSet:
    """An external synthetic set shown as its own row.

    Attributes:
        name: row name (letters, digits, ``-``, ``_``).
        folder: one folder per identity, or a synthetic set folder (holding manifest.jsonl).
        identity_map: file renaming folders onto the target's identity names.
        unknown: "error" or "drop" for identities the target does not have.
        selection: train its row with lookahead selection.
    """

    name: str = ""
    folder: str = ""
    identity_map: str | None = None
    unknown: str = "drop"
    selection: bool = False


@dataclass
class StudyConfig:
    """The whole study (see the module docstring and benchmarks/configs/utility_*.yaml)."""

    name: str = "utility"
    task: str = "face"
    work_dir: str | None = None
    prior: DataSpec = field(default_factory=DataSpec)
    target: DataSpec = field(default_factory=DataSpec)
    shots: list[int | None] = field(default_factory=lambda: [3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    external: list[ExternalSet] = field(default_factory=list)
    reid_sources: dict[str, list[int]] = field(default_factory=dict)
    image_size: int = 32
    channels: int = 1
    num_pairs: int = 1000
    kid_subset_size: int = 100
    prior_stage: PriorSize = field(default_factory=PriorSize)
    cold: ColdSize = field(default_factory=ColdSize)
    rl: RLSize = field(default_factory=RLSize)
    generate: GenerateSize = field(default_factory=GenerateSize)
    recognizer: RecognizerSize = field(default_factory=RecognizerSize)
    quick: dict[str, Any] = field(default_factory=dict)

    def check(self) -> StudyConfig:
        """Validate values that the dataclass types do not (raises ValueError naming the field)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.prior.format not in PRIOR_FORMATS:
            raise ValueError(f"prior.format must be one of {PRIOR_FORMATS}, got {self.prior.format!r}")
        if self.target.format not in TARGET_FORMATS:
            raise ValueError(f"target.format must be one of {TARGET_FORMATS}, got {self.target.format!r}")
        for what, spec in (("prior", self.prior), ("target", self.target)):
            if not spec.path:
                raise ValueError(f"{what}.path is required")
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"rows: unknown {unknown}; known rows are {list(ROWS)}")
        if "real" not in self.rows:
            raise ValueError("rows must include 'real' (its first seed is the reward's feature extractor)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if not self.shots:
            raise ValueError("shots must list at least one setting (an int, or null for every image)")
        if self.task == "face" and None in self.shots:
            raise ValueError("face studies need an int per shot setting (held-out images make the test set)")
        names = [e.name for e in self.external]
        for e in self.external:
            if not e.name or not all(c.isalnum() or c in "-_" for c in e.name):
                raise ValueError(f"external set name {e.name!r}: use letters, digits, '-' and '_'")
            if not e.folder:
                raise ValueError(f"external set {e.name!r}: folder is required")
            if e.unknown not in ("error", "drop"):
                raise ValueError(f"external set {e.name!r}: unknown must be 'error' or 'drop'")
        if len(set(names)) != len(names):
            raise ValueError(f"external set names must be unique, got {names}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        return self

    def resolved_work_dir(self, quick: bool) -> Path:
        """Where the stage folders go (default ``runs/utility/<name>[_quick]``)."""
        if self.work_dir:
            return Path(self.work_dir)
        return Path("runs") / "utility" / (self.name + ("_quick" if quick else ""))

    def generator_sets(self) -> list[str]:
        """The generator sets the chosen rows need, in build order (cold first)."""
        needed = {ROWS[r].synthetic for r in self.rows if ROWS[r].synthetic}
        return [s for s in ("cold", *REWARD_VARIANTS) if s in needed]


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursing into dataclass fields; unknown keys raise."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(fields)})")
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get((cls, key))
        if sub is not None and isinstance(sub, list):
            kwargs[key] = [_build(sub[0], v, f"{where}.{key}[{i}]") for i, v in enumerate(value or [])]
        elif sub is not None:
            kwargs[key] = _build(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


_NESTED: dict[tuple[type, str], Any] = {
    (StudyConfig, "prior"): DataSpec,
    (StudyConfig, "target"): DataSpec,
    (StudyConfig, "prior_stage"): PriorSize,
    (StudyConfig, "cold"): ColdSize,
    (StudyConfig, "rl"): RLSize,
    (StudyConfig, "generate"): GenerateSize,
    (StudyConfig, "recognizer"): RecognizerSize,
    (StudyConfig, "external"): [ExternalSet],
}


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"`` (intermediate mappings created)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_config(
    path: str | os.PathLike, *, quick: bool = False, overrides: list[str] | None = None
) -> StudyConfig:
    """Read a study YAML, apply its ``quick:`` overrides (with ``quick``) and ``key=value`` overrides.

    Args:
        path: the YAML file.
        quick: apply the file's ``quick:`` mapping of dotted keys.
        overrides: ``key=value`` strings (values parsed as YAML), applied last.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    if quick:
        quick_overrides = data.get("quick") or {}
        if not isinstance(quick_overrides, dict):
            raise ValueError(f"{path}: 'quick' must map dotted keys to values")
        for key, value in quick_overrides.items():
            set_dotted(data, key, value)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        set_dotted(data, key.strip(), yaml.safe_load(text))
    return _build(StudyConfig, data, str(path)).check()
