"""``rgsd report RUN``: render the report of a pipeline run folder from its stage artifacts."""

from __future__ import annotations

from collections.abc import Sequence

from rgsd_lightning.commands.parser import run_command
from rgsd_lightning.report import make_report


def command(run: str, out: str | None = None, name: str = "report") -> int:
    """Write <name>.md / .html / .json for a run folder (its pipeline.yaml says which sections).

    Args:
        run: the run folder (e.g. runs/demo).
        out: folder of the report files (default: the run folder).
        name: file-name stem of the report files.
    """
    print(make_report(run, out=out, name=name))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rgsd report`` with ``argv`` (without the command name); returns the exit code."""
    return run_command(command, argv, "rgsd report", positional=True)
