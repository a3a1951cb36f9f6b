"""`pipeline compare RUN RUN... --out DIR`: one table of runs trained from one store (config differences,
eval metrics, final losses) as Markdown, JSON and bar charts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console, user_errors


def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories written by `pipeline train` (two or more)")],
    out: Annotated[Path, typer.Option("--out", help="folder for compare.md, compare.json and compare.png")],
) -> None:
    """Compare runs side by side; runs evaluated on different eval stores are refused."""
    from eval.compare import write_comparison

    with user_errors(str(out)):
        result = write_comparison(runs, out)
    console.print(f"{len(result['runs'])} runs, {len(result['config_keys'])} differing config keys, "
                  f"{len(result['eval_metrics'])} eval metrics -> {out / 'compare.md'}")
