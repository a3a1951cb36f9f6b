"""One rich console, progress-bar factory and error exit for every command, so output looks the same everywhere."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=False, highlight=False)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


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


def fail(message: object) -> NoReturn:
    """End the command: one line on stderr saying what and why, exit code 2."""
    errors.print(f"[red]error:[/red] {escape(' '.join(str(message).split()))}")
    raise typer.Exit(2)


def _expected() -> tuple[type[BaseException], ...]:
    from stages.embed import EmbedError
    from storage.locks import LockError
    from storage.store import StoreError

    try:  # an object store that cannot be reached or refuses the credentials (s3fs passes these through)
        from botocore.exceptions import BotoCoreError, ClientError

        remote: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
    except ImportError:
        remote = ()
    return ValueError, OSError, StoreError, LockError, EmbedError, *remote


@contextlib.contextmanager
def user_errors(where: str) -> Iterator[None]:
    """Failures a user can cause or fix end the command with ``fail``: bad input or config, a store or
    run that cannot be used, a lock another writer holds, an I/O error (full disk, read-only store),
    an object store that cannot be reached, or a Ray task that failed with one of these. ``where`` (the path being written) prefixes an I/O
    error that does not name its file. Anything else is a bug and keeps its traceback."""
    expected = _expected()
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        cause = _cause(exc)
        if isinstance(cause, expected):
            fail(_describe(cause, where))
        raise


def _cause(exc: BaseException) -> BaseException:
    """A Ray task's own exception (``RayTaskError.cause``; its message holds the remote traceback)."""
    while type(exc).__module__.startswith("ray.") and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def _describe(exc: BaseException, where: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and (exc.filename is None or str(exc.filename) not in text):
        text = f"{where}: {text}"
    return text
