"""`pipeline eval RUN --store EVAL_STORE --tasks knn`: kNN of student, heads and teachers -> RUN/eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import console


def evaluate(
    run: Annotated[Path, typer.Argument(help="run directory written by `pipeline train`")],
    store: Annotated[str, typer.Option("--store", help="labelled store to evaluate on (queries)")],
    bank: Annotated[Optional[str], typer.Option("--bank", help="labelled store of kNN neighbours (default: the run's training store)")] = None,
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated: knn")] = "knn",
    k: Annotated[int, typer.Option("--k", help="neighbours")] = 20,
    temperature: Annotated[float, typer.Option("--temperature", help="vote weight exp(sim / T)")] = 0.07,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
) -> None:
    """Evaluate the run's latest checkpoint; results are merged into RUN/eval.json."""
    from eval.evaluate import TASKS, EvalError, evaluate_run

    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TASKS]
    if unknown or not wanted:
        raise typer.BadParameter(f"unknown task(s) {unknown or tasks!r}; available: {', '.join(TASKS)}")
    try:
        result = evaluate_run(run, store, wanted, bank=bank, device=device,
                              options={"knn": {"k": k, "temperature": temperature}})
    except (EvalError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if "knn" in result:
        teachers = [name.split("/", 1)[1] for name in result["knn"]["top1"] if name.startswith("teacher/")]
        _print(result, teachers)


def _print(result: dict, teachers: list[str]) -> None:
    from rich.table import Table

    top1 = result["knn"]["top1"]
    table = Table(title=f"kNN top-1 (k={result['knn']['k']}, T={result['knn']['temperature']}), "
                        f"{result['knn']['query_images']} queries vs {result['knn']['bank_images']} neighbours")
    for col in ("features", "top-1", "student / teacher", "cosine summary", "cosine patches"):
        table.add_column(col)
    table.add_row("student CLS", f"{top1['student/cls']:.3f}", "", "", "")
    for t in teachers:
        teacher = top1[f"teacher/{t}"]
        ratio = f"{top1[f'student/{t}'] / teacher:.3f}" if teacher else "n/a"
        table.add_row(f"student head {t}", f"{top1[f'student/{t}']:.3f}", ratio,
                      f"{result['cosine'].get(f'{t}/summary', float('nan')):.3f}",
                      f"{result['cosine'].get(f'{t}/patches', float('nan')):.3f}")
        table.add_row(f"teacher {t}", f"{teacher:.3f}", "", "", "")
    console.print(table)
