"""`pipeline eval RUN --store EVAL_STORE --tasks knn`: kNN of student, heads and teachers -> RUN/eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import console
from ..runs import RunError, read_run

TASKS = ("knn",)


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
    import numpy as np
    import torch

    from eval.features import extract_features, load_trained
    from eval.knn import knn_accuracy
    from train.config import TrainConfig

    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TASKS]
    if unknown or not wanted:
        raise typer.BadParameter(f"unknown task(s) {unknown or tasks!r}; available: {', '.join(TASKS)}")
    try:
        cfg_dict, record = read_run(run)
    except RunError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    cfg = TrainConfig.model_validate(cfg_dict)
    teachers = record["teachers"]
    bank = bank or record["url"]
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, meta = load_trained(run, store, cfg, teachers, dev)
        queries = extract_features(model, store, cfg, teachers, dev)
        neighbours = extract_features(model, bank, cfg, teachers, dev)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    qm, bm = queries.labels >= 0, neighbours.labels >= 0
    if not qm.any() or not bm.any():
        console.print(f"[red]error:[/red] kNN needs labels in both stores ({int(qm.sum())} labelled queries in {store}, "
                      f"{int(bm.sum())} labelled neighbours in {bank}); cache them with --labels")
        raise typer.Exit(1)
    top1 = {name: knn_accuracy(neighbours.features[name][bm], neighbours.labels[bm], feats[qm], queries.labels[qm],
                               k=k, temperature=temperature)
            for name, feats in queries.features.items()}
    result = {
        "checkpoint_step": meta["step"],
        "knn": {"k": k, "temperature": temperature, "bank": bank, "queries": store, "bank_images": int(bm.sum()),
                "query_images": int(qm.sum()), "classes": int(len(np.unique(queries.labels[qm]))), "top1": top1},
        "cosine": queries.cosine,
    }
    path = run / "eval.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **result}, indent=1))
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
