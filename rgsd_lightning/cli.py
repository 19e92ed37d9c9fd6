"""The ``rgsd`` command.

``rgsd fit|validate|test|predict`` is a LightningCLI in subclass mode: the model is any of the stage
modules (``--model ColdStartDiT``, ``RewardDPOK``, ``LookaheadReID``, ``CosFaceRecognizer``) and the data
an ``IdentityDataModule``; ``--config`` files, ``--print_config`` and dotted overrides work as in any
Lightning project. The resolved config is saved with every run, ``data.num_identities`` is linked into
the model, and the trainer defaults to ``use_distributed_sampler=False`` because the datamodule shards its
own P x K batches per rank.

Other commands (``rgsd demo``, ``rgsd pipeline``, ``rgsd report``, ``rgsd audit``,
``rgsd import-synthetic``, ``rgsd make-toy``) are plain functions dispatched before LightningCLI.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

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


class RGSDCLI(LightningCLI):
    """LightningCLI with the rgsd argument links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_identities", "model.init_args.num_identities", apply_on="instantiate")


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
