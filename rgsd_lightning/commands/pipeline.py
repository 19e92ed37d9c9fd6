"""``rgsd pipeline --config FILE``: run a pipeline YAML (see ``rgsd_lightning.pipeline``), resumably."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from rgsd_lightning.pipeline import expand, read_spec, run_pipeline, save_spec


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages of a pipeline YAML (finished stages are skipped, interrupted ones resume), then
    write the report its ``report:`` block describes."""
    p = argparse.ArgumentParser(prog="rgsd pipeline", description=main.__doc__)
    p.add_argument(
        "--config", required=True, help="pipeline YAML (e.g. experiments/market1501/pipeline.yaml)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. vars.data_root=/d"
    )
    p.add_argument("--only", nargs="*", default=None, help="run only these stages")
    p.add_argument("--force", nargs="*", default=[], help="rerun these stages even if finished")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their configs, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    args = p.parse_args(argv)
    spec = read_spec(args.config, args.set)
    output, stages = expand(spec)
    if args.dry_run:
        for stage in stages:
            print(f"# {stage.name} ({stage.command}{', test' if stage.test else ''})")
            print(json.dumps(stage.config, indent=1))
        return 0
    save_spec(output, spec)
    results = run_pipeline(output, stages, only=args.only, force=args.force)
    print(json.dumps({name: r.as_dict() for name, r in results.items()}, indent=1))
    if spec.get("report") and not args.no_report:
        from rgsd_lightning.report import make_report

        print(f"report: {make_report(output)}")
    return 0
