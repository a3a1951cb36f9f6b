"""`pipeline report RUN`: Markdown + PNG loss curves from a run's metrics and eval results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console


def report(run: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Write RUN/report.md (loss curves, kNN, student-teacher cosine)."""
    from eval.report import write_report

    if not (run / "metrics.jsonl").exists():
        console.print(f"[red]error:[/red] {run} has no metrics.jsonl: is it a `pipeline train` run directory?")
        raise typer.Exit(1)
    console.print(f"report -> {write_report(run)}")
