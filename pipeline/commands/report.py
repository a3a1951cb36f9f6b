"""`pipeline report RUN`: Markdown + PNG loss curves from a run's metrics and eval results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console, fail, user_errors


def report(run: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Write RUN/report.md (loss curves, kNN, student-teacher cosine)."""
    from eval.report import write_report
    from train.rundir import RunDir

    if not RunDir(run).metrics.exists():
        fail(f"{run} has no {RunDir(run).metrics.name}: is it a `pipeline train` run directory?")
    with user_errors(str(run)):
        path = write_report(run)
    console.print(f"report -> {path}")
