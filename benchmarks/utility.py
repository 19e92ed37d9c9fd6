"""``python -m benchmarks utility --config benchmarks/configs/utility_faces.yaml [--quick] [--out DIR]``.

The paper's claim tested at CPU scale on real data: synthetic data from a generator adapted from a broader
prior, refined by the reward and selected by lookahead, improves a recognizer trained on scarce real data.

A study is a pipeline file (``benchmarks/configs/utility_{faces,reid}.yaml``; ``--quick`` takes the
``*_quick.yaml`` overlay next to it): its stages are LightningCLI runs in ``runs/utility/<name>/`` (a rerun
skips finished stages, an interrupted one resumes) and its ``report:`` block is the results file. This
command is ``rgsd pipeline`` + ``rgsd report RUN --out <out> --name <name>`` with a thread setting and quieter
logs; both can also be run by hand.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks utility``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks utility", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, help="study pipeline (benchmarks/configs/utility_*.yaml)")
    p.add_argument("--quick", action="store_true", help="the *_quick.yaml overlay (<= 10 min on 2 cores)")
    p.add_argument("--out", default="benchmarks/results", help="folder of the result md / json / figures")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. vars.seeds=[0]")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (per stage with --jobs > 1; default: torch's choice / the CPUs it shares)",
    )
    p.add_argument("--only", nargs="*", default=None, help="run only these stages (the report shows all)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="independent stages run at once, each in a worker process of its own",
    )
    return p


def study_file(config: str | Path, quick: bool) -> Path:
    """The study's pipeline file (its ``_quick`` overlay with ``quick``)."""
    path = Path(config)
    if quick:
        path = path.with_name(path.stem + "_quick" + path.suffix)
    if not path.is_file():
        raise FileNotFoundError(f"study pipeline not found: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the study and write ``<out>/<name>.md`` / ``.json``; returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import lightning  # noqa: F401  (imported first: it sets its loggers' levels on import)

    from rgsd_lightning.pipeline import prepare, read_spec, run_stages
    from rgsd_lightning.report import make_report

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        path = study_file(args.config, args.quick)
    except FileNotFoundError as err:
        print(f"utility: error: {err}", file=sys.stderr)
        return 2
    spec = read_spec(path, args.set)
    run, stages = prepare(spec)
    run_stages(run, stages, only=args.only, jobs=args.jobs, threads=args.threads)
    # the report of this study file (another study may have saved its spec in a shared run folder since)
    report = make_report(run, out=args.out, name=path.stem, spec=spec)
    print(f"[utility] results: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
