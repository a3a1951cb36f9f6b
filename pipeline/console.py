"""One rich console and progress-bar factory for every command, so output looks the same everywhere."""

from __future__ import annotations

import sys
from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=False, highlight=False)


def progress(disable: bool | None = None) -> Progress:
    """A progress bar with count, elapsed and remaining time; plain output when not a terminal."""
    if disable is None:
        disable = False
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=not sys.stdout.isatty(),
    )


def phase_reporter(bar: Progress, prefix: str = "") -> Callable[[str, int, int], None]:
    """The ``on_progress(phase, done, total)`` callback the stages take: one bar row per phase."""
    rows: dict[str, int] = {}

    def on_progress(phase: str, done: int, total: int) -> None:
        key = f"{prefix}{phase}"
        if key not in rows:
            rows[key] = bar.add_task(key, total=total, info="")
        bar.update(rows[key], completed=done, total=total)

    return on_progress


def failures_text(count: int, reasons: dict[str, int]) -> str:
    """``"3  (corrupt: 1, empty: 2)"``: a failure count with its kinds, as every summary prints it."""
    return f"{count}" + (f"  ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else "")
