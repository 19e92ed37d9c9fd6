"""``rgsd demo``: the whole method on the embedded toy identities, on a CPU, with a report.

The demo is the pipeline file ``experiments/toy/pipeline.yaml`` (``pipeline_quick.yaml`` with ``--quick``):
the shipped toy prior (``builtin:toy_prior``, a small DiT pre-trained on a broad toy domain; ``--train-prior``
trains it again first), the baseline recognizer on scarce target data, cold start, RL, generation, and the
downstream variants x seeds; then ``rgsd report`` on the run folder. Every stage runs
in ``<output>/<stage>/``; finished stages are skipped and an interrupted one resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rgsd_lightning.commands.parser import run_command
from rgsd_lightning.pipeline import run_file
from rgsd_lightning.report import make_report

TOY_PIPELINES = Path(__file__).resolve().parents[1] / "experiments" / "toy"
TRAIN_PRIOR = ("vars.train_prior=true", "vars.prior=${prior.export}")
"""The overrides of ``--train-prior``: run the prior stage and cold-start from its export."""


def demo_file(quick: bool = False) -> Path:
    """The demo's pipeline file (the repository's ``experiments/toy``)."""
    path = TOY_PIPELINES / ("pipeline_quick.yaml" if quick else "pipeline.yaml")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: rgsd demo runs the pipeline files of a repository checkout "
            "(pip install -e . in the cloned repository), or run `rgsd pipeline --config FILE`"
        )
    return path


def run_demo(
    output: str | Path | None = None,
    *,
    quick: bool = False,
    force: Sequence[str] = (),
    overrides: Sequence[str] = (),
    train_prior: bool = False,
) -> Path:
    """Run (or resume) the demo pipeline and write its report; returns the report path.

    ``train_prior``: train the prior stage (``experiments/toy/prior.yaml``) instead of starting from the
    shipped one (the quick demo always trains its own tiny prior).
    """
    settings = [*TRAIN_PRIOR] if train_prior else []
    settings += [*overrides] + ([f"output={output}"] if output is not None else [])
    path = demo_file(quick)
    print(f"rgsd demo: {path} ({'quick' if quick else 'full'} size); finished stages are skipped", flush=True)
    run, _ = run_file(path, settings, force=force)
    report = make_report(run)
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return report


def command(
    output: str | None = None,
    quick: bool = False,
    force: list[str] | None = None,
    set: list[str] | None = None,
    train_prior: bool = False,
) -> int:
    """The whole method on the embedded toy identities, on a CPU, with a report.

    Args:
        output: run folder (default runs/demo, runs/demo_quick).
        quick: tiny sizes (seconds per stage; for tests).
        force: stages to rerun even if finished.
        set: pipeline overrides KEY=VALUE, e.g. vars.seeds=[0] (repeatable).
        train_prior: train the toy prior again (experiments/toy/prior.yaml's recipe, tens of minutes on 2
            cores) instead of starting from the shipped builtin:toy_prior.
    """
    run_demo(output, quick=quick, force=force or (), overrides=set or (), train_prior=train_prior)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rgsd demo`` with ``argv`` (without the command name); returns the exit code."""
    return run_command(command, argv, "rgsd demo")
