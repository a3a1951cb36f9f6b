"""`pipeline sweep SWEEP.toml --store STORE --out DIR`: a grid of students from one store, trained, evaluated and
compared (pipeline/sweep.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import console, user_errors


def sweep(
    sweep_file: Annotated[Path, typer.Argument(
        help="SWEEP.toml: a base config, a grid table and/or runs tables, the eval tasks (format: pipeline/sweep.py)")],
    store: Annotated[str, typer.Option("--store", help="feature store every run trains on")],
    out: Annotated[Path, typer.Option("--out", help="sweep folder: one run directory per run, compare/")],
    eval_store: Annotated[Optional[str], typer.Option("--eval-store", help="store to evaluate on (default: --store)")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="run each as a Ray task on this cluster (one GPU each where it has GPUs); 'local' "
                              "starts an embedded one")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda (evaluation)")] = "auto",
) -> None:
    """Train, evaluate and compare every run of SWEEP; finished runs are skipped, killed ones resumed."""
    from ..sweep import run_sweep

    with user_errors(str(out)):
        done = run_sweep(sweep_file, store, out, eval_store=eval_store, ray_address=ray_address, device=device,
                         on_run=lambda name, what: console.print(f"{name}: {what}"))
    console.print(f"{len(done)} runs -> {out}; comparison: {out / 'compare' / 'compare.md'}")
