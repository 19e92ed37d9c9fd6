"""``rgsd pipeline --config FILE``: run a pipeline YAML (see ``rgsd_lightning.pipeline``), resumably."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from rgsd_lightning.pipeline import load_pipeline, run_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages of a pipeline YAML; finished stages are skipped, interrupted ones resume."""
    p = argparse.ArgumentParser(prog="rgsd pipeline", description=main.__doc__)
    p.add_argument(
        "--config", required=True, help="pipeline YAML (e.g. experiments/market1501/pipeline.yaml)"
    )
    p.add_argument("--only", nargs="*", default=None, help="run only these stages")
    p.add_argument("--force", nargs="*", default=[], help="rerun these stages even if finished")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their configs, run nothing")
    args = p.parse_args(argv)
    output, stages = load_pipeline(args.config)
    if args.dry_run:
        for stage in stages:
            print(f"# {stage.name} ({stage.command}{', test' if stage.test else ''})")
            print(json.dumps(stage.config, indent=1))
        return 0
    results = run_pipeline(output, stages, only=args.only, force=args.force)
    print(json.dumps({name: r.as_dict() for name, r in results.items()}, indent=1))
    return 0
