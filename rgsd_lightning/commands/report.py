"""``rgsd report RUN``: render the report of a pipeline run folder from its stage artifacts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rgsd_lightning.report import make_report


def main(argv: Sequence[str] | None = None) -> int:
    """Write <name>.md / .html / .json for a run folder (its pipeline.yaml says which sections)."""
    p = argparse.ArgumentParser(prog="rgsd report", description=main.__doc__)
    p.add_argument("run", help="the run folder (e.g. runs/demo)")
    p.add_argument("--out", default=None, help="folder of the report files (default: the run folder)")
    p.add_argument("--name", default="report", help="file-name stem of the report files")
    args = p.parse_args(argv)
    print(make_report(args.run, out=args.out, name=args.name))
    return 0
