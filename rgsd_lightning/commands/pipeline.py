"""``rgsd pipeline --config FILE``: run a pipeline YAML (see ``rgsd_lightning.pipeline``), resumably."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rgsd_lightning.commands.parser import run_command
from rgsd_lightning.pipeline import expand, prepare, read_spec, run_stages
from rgsd_lightning.pipeline.runner import select_stages, stages_to_run


def command(
    config: str,
    set: list[str] | None = None,
    only: list[str] | None = None,
    force: list[str] | None = None,
    dry_run: bool = False,
    no_report: bool = False,
    jobs: int = 1,
    threads: int | None = None,
) -> int:
    """Run the stages of a pipeline YAML (finished stages are skipped, interrupted ones resume), then
    write the report its ``report:`` block describes.

    Args:
        config: pipeline YAML (e.g. experiments/market1501/pipeline.yaml).
        set: overrides KEY=VALUE, e.g. vars.data_root=/d (repeatable).
        only: run only these stages.
        force: rerun these stages even if finished.
        dry_run: print the stages and their configs, run nothing (with ``only``: the selected stages, after
            a line per pattern naming the stages it matches).
        no_report: do not write the report at the end.
        jobs: run up to this many independent stages at once, each in a worker process of its own.
        threads: torch threads of each stage with jobs > 1 (default: the CPUs divided among the stages
            running side by side when it starts).
    """
    spec = read_spec(config, set or [])
    if dry_run:
        _, stages = expand(spec)
        selected = stages_to_run(stages, only, force or [])
        names = [stage.name for stage in stages]
        for pattern in only or []:
            matched = select_stages([pattern], names)
            print(f"# --only {pattern!r} selects {len(matched)}: {', '.join(matched)}")
        for stage in stages:
            if selected is not None and stage.name not in selected:
                continue
            print(f"# {stage.name} ({stage.command}{', test' if stage.test else ''})")
            print(json.dumps(stage.config, indent=1))
        return 0
    output, stages = prepare(spec)
    results = run_stages(output, stages, only=only, force=force or [], jobs=jobs, threads=threads)
    print(json.dumps({name: r.as_dict() for name, r in results.items()}, indent=1))
    if spec.get("report") and not no_report:
        from rgsd_lightning.report import make_report

        print(f"report: {make_report(output)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rgsd pipeline`` with ``argv`` (without the command name); returns the exit code."""
    return run_command(command, argv, "rgsd pipeline")
