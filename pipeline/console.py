"""One rich console and progress-bar factory for every command, so output looks the same everywhere."""

from __future__ import annotations

import sys

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
