"""The ``rgsd`` command.

``rgsd fit|validate|test|predict`` is a LightningCLI in subclass mode: the model is any of the stage
modules (``--model ColdStartDiT``, ``RewardDPOK``, ``LookaheadReID``, ``CosFaceRecognizer``) and the data
an ``IdentityDataModule``; ``--config`` files, ``--print_config`` and dotted overrides work as in any
Lightning project. The resolved config is saved with every run, ``data.num_identities`` is linked into
the model, and the trainer defaults to ``use_distributed_sampler=False`` because the datamodule shards its
own P x K batches per rank.

Other commands (``rgsd demo``, ``rgsd pipeline``, ``rgsd report``, ``rgsd audit``,
``rgsd import-synthetic``, ``rgsd make-toy``) are dispatched before LightningCLI; each is a typed function
parsed by jsonargparse (``rgsd_lightning.commands.parser``).

``--ckpt_path`` only resumes the same stage. Plain LightningCLI would load the checkpoint's hyper-parameters,
class path included, into the config, so a checkpoint of another stage silently replaced the configured
model. Here, before anything is built, run or written, a checkpoint is refused (ValueError naming both
sides) when it was written by another stage class, or by the same class for another input artifact
(``pretrained`` of ColdStartDiT, ``generator`` of RewardDPOK, ``export`` of SyntheticGenerator); after the
datamodule is built, also when it was trained on another number of identities. The configured options
win over the checkpoint's: a model option edited since the checkpoint was written is used as configured,
and a warning lists every such option (checkpoint value -> configured value). What the checkpoint restores
is Lightning's: weights, optimizer and LR-scheduler state (learning rates included, so an edited ``lr``
takes effect only in a new run) and the loop position.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from rgsd_lightning.data.datamodule import IdentityDataModule

# name -> "module:function"; each function takes the remaining argv list and returns an exit code
EXTRA_COMMANDS: dict[str, str] = {
    "demo": "rgsd_lightning.demo:main",
    "pipeline": "rgsd_lightning.commands.pipeline:main",
    "report": "rgsd_lightning.commands.report:main",
    "audit": "rgsd_lightning.commands.audit:main",
    "make-toy": "rgsd_lightning.commands.make_toy:main",
    "import-synthetic": "rgsd_lightning.commands.import_synthetic:main",
}


def _register_modules() -> None:
    """Import the stage modules so ``--model ColdStartDiT`` resolves by short name."""
    importlib.import_module("rgsd_lightning.modules")


# per stage class: the constructor arguments naming the artifact a run starts from (a checkpoint resumes
# only a run of the same class from the same artifact)
ARTIFACT_ARGS: dict[str, tuple[str, ...]] = {
    "ColdStartDiT": ("pretrained",),
    "RewardDPOK": ("generator",),
    "SyntheticGenerator": ("export",),
}
_INTERNAL_HPARAMS = ("_class_path", "_instantiator")


class RGSDCLI(LightningCLI):
    """LightningCLI with the rgsd argument links; ``--ckpt_path`` only resumes the same stage (module doc)."""

    _resume: dict[str, Any] | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_identities", "model.init_args.num_identities", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Check a ``--ckpt_path`` against the configured model instead of loading its hyper-parameters.

        Replaces LightningCLI's hook of the same name (which parses the checkpoint's hyper-parameters, class
        path included, over the config): here the config wins and another stage's checkpoint is refused.
        """
        self._resume = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last" / "best" / a missing file: Lightning's
            return
        model = self.config[subcommand].get("model")
        if model is None or not getattr(model, "class_path", None):
            return
        init_args = model.get("init_args")
        configured = init_args.as_dict() if init_args is not None else {}
        self._resume = check_resume(str(ckpt_path), model.class_path, configured)

    def after_instantiate_classes(self) -> None:
        """Refuse a checkpoint trained on another number of identities (known once the data is built)."""
        if not self._resume or self._resume.get("num_identities") is None:
            return
        saved = self._resume["num_identities"]
        current = getattr(self.model, "hparams", {}).get("num_identities")
        if current is not None and int(current) != int(saved):
            raise ValueError(
                f"--ckpt_path {self._resume['path']} was trained on {saved} identities but the configured "
                f"data has {current}: --ckpt_path only resumes the same stage on the same data"
            )


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def _read_hparams(path: str) -> dict[str, Any]:
    try:
        try:  # memory-mapped: only the hyper-parameters are read from a large checkpoint
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (not zip) file cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reason a checkpoint cannot be read is reported the same way
        raise ValueError(f"--ckpt_path {path}: cannot read it as a Lightning checkpoint ({err})") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (no dict at the top level)")
    hparams = checkpoint.get("hyper_parameters") or {}
    return dict(hparams) if isinstance(hparams, dict) else {}


def _plain(value: Any) -> Any:
    """A JSON-comparable form (config groups as mappings, tuples as lists, unknown objects as their repr)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "as_dict") and callable(value.as_dict):  # a jsonargparse Namespace
        value = value.as_dict()
    return json.loads(json.dumps(value, default=repr))


def flat_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Options as dotted keys: a config group's fields compare one by one (``sampler.steps``)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        value = _plain(value)
        if isinstance(value, dict) and value:
            out.update(flat_options(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_artifact(saved: Any, configured: Any) -> bool:
    if saved == configured:
        return True
    if isinstance(saved, str) and isinstance(configured, str):
        a, b = Path(saved).expanduser(), Path(configured).expanduser()
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def check_resume(path: str, class_path: str, configured: dict[str, Any]) -> dict[str, Any]:
    """Raise ValueError unless the checkpoint at ``path`` is one of the configured stage (``class_path`` with
    its ``configured`` init args); warn about the options that differ (the configured values are used).

    Returns ``{"path", "num_identities"}`` (the checkpoint's identity count, None when unknown) for the check
    made once the data is built.
    """
    saved = _read_hparams(path)
    saved_class = saved.get("_class_path")
    args = {k: v for k, v in saved.items() if k not in _INTERNAL_HPARAMS}
    if saved_class and saved_class != class_path:
        raise ValueError(
            f"--ckpt_path {path} is a checkpoint of {_short(saved_class)} ({saved_class}) but the config "
            f"runs {_short(class_path)} ({class_path}): --ckpt_path only resumes the same stage; hand a "
            "stage's result to the next one by path (its export folder), not by --ckpt_path"
        )
    if not saved_class and args:  # written outside the CLI: the argument names still tell the stage apart
        module, _, name = class_path.rpartition(".")
        params = set(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)
        foreign = sorted(set(args) - params)
        if foreign:
            raise ValueError(
                f"--ckpt_path {path} has hyper-parameters {foreign} that {_short(class_path)} does not take: "
                "it is a checkpoint of another stage; --ckpt_path only resumes the same stage"
            )
    for name in ARTIFACT_ARGS.get(_short(class_path), ()):
        if name in args and name in configured and not _same_artifact(args[name], configured[name]):
            raise ValueError(
                f"--ckpt_path {path} was trained from {name}={args[name]!r} but the config names "
                f"{name}={configured[name]!r}: a checkpoint only resumes the run it came from (its weights "
                f"would silently replace those of {configured[name]!r})"
            )
    before, after = flat_options(args), flat_options(configured)
    edited = [
        f"{key}: {before[key]!r} (checkpoint) -> {after[key]!r} (config)"
        for key in sorted(set(before) & set(after) - {"num_identities"})
        if before[key] != after[key]
    ]
    if edited:
        rank_zero_warn(
            f"--ckpt_path {path}: these model options differ from the checkpoint's and the configured "
            f"values are used: {'; '.join(edited)}. The weights, the optimizer and LR-scheduler state "
            "(learning rates included) and the loop position come from the checkpoint."
        )
    return {"path": path, "num_identities": args.get("num_identities")}


def build_cli(args: Sequence[str] | dict | None = None, run: bool = True) -> RGSDCLI:
    """Build (and by default run) the Lightning CLI; ``run=False`` returns it configured but idle."""
    _register_modules()
    return RGSDCLI(
        model_class=None,
        datamodule_class=IdentityDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},
        auto_configure_optimizers=False,
        parser_kwargs={"epilog": _epilog()},
        args=args,
        run=run,
    )


def _epilog() -> str:
    return "other commands: " + ", ".join(f"rgsd {name}" for name in EXTRA_COMMANDS) + " (each has --help)"


def _resolve(target: str) -> Callable[[list[str]], int | None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``rgsd`` console script and ``python -m rgsd_lightning``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        code = _resolve(EXTRA_COMMANDS[argv[0]])(argv[1:])
        return int(code or 0)
    build_cli(None if args is None else argv)  # None: LightningCLI reads sys.argv itself
    return 0
