"""The side commands' command lines (rgsd_lightning.commands.parser): typed jsonargparse options with the
docstring as help, and the argparse spellings of earlier versions still accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest

from rgsd_lightning.cli import EXTRA_COMMANDS, main
from rgsd_lightning.commands.parser import run_command

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _record(calls: list):
    def command(
        config: str,
        set: list[str] | None = None,
        only: list[str] | None = None,
        dry_run: bool = False,
        kind: Literal["market", "faces"] = "market",
        steps: int | None = None,
    ) -> int:
        """Record the call.

        Args:
            config: a file.
            set: overrides.
            only: stages.
            dry_run: print only.
            kind: which data.
            steps: how many.
        """
        calls.append(dict(config=config, set=set, only=only, dry_run=dry_run, kind=kind, steps=steps))
        return 3

    return command


OLD = "--config c --set a=1 --set b=[2] --only x y --dry-run --kind faces"
NATIVE = "--config=c --set+ a=1 --set+ b=[2] --only [x,y] --dry_run true --kind=faces"


@pytest.mark.parametrize("argv", [OLD, NATIVE], ids=["argparse spelling", "jsonargparse spelling"])
def test_both_spellings_give_the_same_typed_call(argv):
    calls: list = []
    assert run_command(_record(calls), argv.split(), "rgsd x") == 3
    expected = dict(config="c", set=["a=1", "b=[2]"], only=["x", "y"], dry_run=True, kind="faces", steps=None)
    assert calls == [expected]


def test_defaults_empty_lists_and_bad_values(capsys):
    calls: list = []
    run_command(_record(calls), ["--config", "c", "--only", "--steps", "4"], "rgsd x")
    assert calls[-1] == dict(config="c", set=None, only=[], dry_run=False, kind="market", steps=4)
    with pytest.raises(SystemExit) as info:
        run_command(_record(calls), ["--config", "c", "--kind", "cats"], "rgsd x")
    assert info.value.code == 2 and "kind" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_command(_record(calls), ["--config", "c", "--steps", "many"], "rgsd x")
    assert info.value.code == 2 and len(calls) == 1


@pytest.mark.parametrize("name", sorted(EXTRA_COMMANDS))
def test_every_side_command_documents_its_options(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: rgsd {name}")
    assert "(type: " in out and "default: " in out  # typed, with the docstring's line per option


def test_pipeline_dry_run_applies_repeated_set(capsys, tmp_path):
    config = EXPERIMENTS / "toy" / "pipeline_quick.yaml"
    argv = ["pipeline", "--config", str(config), "--dry-run", "--set", f"output={tmp_path}"]
    assert main([*argv, "--set", "vars.seeds=[7]"]) == 0
    printed = capsys.readouterr().out
    assert f'"root": "{tmp_path}/data/target"' in printed
    stages = [line.split()[1] for line in printed.splitlines() if line.startswith("# ")]
    assert "down_real_s7" in stages and not any(s.endswith("_s0") for s in stages)
    assert not (tmp_path / "pipeline.yaml").exists()  # a dry run writes nothing
    assert json.loads(printed[printed.index("{") : printed.index("\n}") + 2])["seed_everything"] == 0


def test_pipeline_dry_run_shows_what_only_selects(capsys, tmp_path):
    config = EXPERIMENTS / "toy" / "pipeline_quick.yaml"
    argv = ["pipeline", "--config", str(config), "--dry-run", "--set", f"output={tmp_path}"]
    assert main(argv) == 0
    every = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    down = [name for name in every if name.startswith("down_")]
    assert len(down) >= 2 and len(every) > len(down)
    assert main([*argv, "--only", "down_*", every[0]]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"# --only 'down_*' selects {len(down)}: {', '.join(down)}"
    assert printed[1] == f"# --only '{every[0]}' selects 1: {every[0]}"
    listed = [line.split()[1] for line in printed[2:] if line.startswith("# ")]
    assert listed == [name for name in every if name in {*down, every[0]}]  # pipeline order
    with pytest.raises(ValueError, match=r"unknown stages \['nope_\*'\]"):
        main([*argv, "--only", "nope_*"])
