"""`pipeline eval RUN --store EVAL_STORE --tasks knn,zeroshot,retrieval,seg,ensemble,routing`: kNN, zero-shot,
retrieval and dense probes of student, heads and teachers, entropy-weighted head ensembling, and the routing
analysis of an MoE student -> RUN/eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import console, user_errors


def evaluate(
    run: Annotated[Path, typer.Argument(help="run directory written by `pipeline train`")],
    store: Annotated[str, typer.Option("--store", help="labelled store to evaluate on (queries)")],
    bank: Annotated[Optional[str], typer.Option("--bank", help="labelled store of kNN neighbours (default: the run's training store)")] = None,
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated: knn, zeroshot (class embeddings cached with "
                                                    "--text-classes or --classifier), retrieval (captions cached with "
                                                    "--captions), seg (linear probes on patch features vs "
                                                    "per-pixel masks cached with --masks), ensemble "
                                                    "(entropy-weighted heads), "
                                                    "routing (MoE students: experts' tokens, stability, teacher "
                                                    "affinity, CKA)")] = "knn",
    seg_store: Annotated[Optional[str], typer.Option(
        "--seg-store", help="store with per-pixel masks for the seg task (default: --store)")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="kNN neighbours (default 20)")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="kNN vote weight exp(sim / T) (default 0.07)")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
) -> None:
    """Evaluate the run's latest checkpoint; results are merged into RUN/eval.json."""
    from eval.evaluate import evaluate_run

    knn = {key: value for key, value in (("k", k), ("temperature", temperature)) if value is not None}
    with user_errors(str(run)):
        if seg_store is not None and "seg" not in tasks.split(","):
            raise ValueError(f"--seg-store {seg_store} is read by the seg task only: add seg to --tasks")
        result = evaluate_run(run, store, [t.strip() for t in tasks.split(",") if t.strip()], bank=bank, device=device,
                              options={"knn": knn, "ensemble": dict(knn), "seg": {"store": seg_store}})
    if "knn" in result:
        _print(result, result["teachers"])
    if "zeroshot" in result:
        _print_zeroshot(result["zeroshot"])
    if "retrieval" in result:
        _print_retrieval(result["retrieval"])
    if "seg" in result:
        _print_seg(result["seg"])
    if "ensemble" in result:
        _print_ensemble(result["ensemble"])
    if "routing" in result:
        _print_routing(result["routing"])


def _print_routing(routing: dict) -> None:
    from rich.table import Table

    from eval.routing import best_teachers

    against = ", ".join(routing["teacher_layers"]) or "no cached teacher layer"
    table = Table(title=f"routing over {routing['images']} images (top-1 experts; CKA vs {against})")
    for col in ("MoE block", "tokens per expert", "changed since previous checkpoint", "best-predicted teacher per expert",
                "max CKA per expert"):
        table.add_column(col)
    for layer, entry in routing["layers"].items():
        best = best_teachers(entry)
        cka = [max((v[e] for v in entry["cka"].values() if v[e] is not None), default=None)
               for e in range(len(entry["tokens"]))]
        stability = entry.get("stability")
        table.add_row(layer, " ".join(map(str, entry["tokens"])), "-" if stability is None else f"{100 * stability:.1f}%",
                      " ".join(best), " ".join("-" if v is None else f"{v:.2f}" for v in cka))
    console.print(table)


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


def _print_zeroshot(zeroshot: dict) -> None:
    from rich.table import Table

    table = Table(title=f"zero-shot over {zeroshot['images']} images")
    for col in ("set", "classes", "head agrees with teacher", "head top-1", "teacher top-1"):
        table.add_column(col)
    for key, entry in zeroshot["sets"].items():
        t, top1 = entry["teacher"], entry.get("top1", {})
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(key, str(entry["classes"]), fmt(entry["agreement"][f"student/{t}"]),
                      fmt(top1.get(f"student/{t}")), fmt(top1.get(f"teacher/{t}")))
    console.print(table)


def _print_retrieval(retrieval: dict) -> None:
    from rich.table import Table

    table = Table(title="image-text retrieval (recall@1 / recall@5)")
    for col in ("set", "images / captions", "features", "image -> text", "text -> image"):
        table.add_column(col)
    for key, entry in retrieval["sets"].items():
        for name, i2t in entry["image_to_text"].items():
            t2i = entry["text_to_image"][name]
            table.add_row(key, f"{entry['images']} / {entry['captions']}", name,
                          " / ".join(f"{v:.3f}" for v in i2t.values()), " / ".join(f"{v:.3f}" for v in t2i.values()))
    console.print(table)


def _print_seg(seg: dict) -> None:
    from rich.table import Table

    metric = "mIoU" if seg["kind"] == "classes" else "RMSE"
    table = Table(title=f"dense linear probe ({metric}; {seg['train_images']} training / {seg['test_images']} test "
                        f"images of {seg['store']})")
    for col in ("features", metric, *(("pixel accuracy",) if seg["kind"] == "classes" else ())):
        table.add_column(col)
    for name, value in (seg["miou"] if seg["kind"] == "classes" else seg["rmse"]).items():
        table.add_row(name, f"{value:.3f}", *((f"{seg['pixel_accuracy'][name]:.3f}",) if seg["kind"] == "classes" else ()))
    if seg["kind"] == "values":
        table.add_row("(the training mean)", f"{seg['rmse_of_train_mean']:.3f}")
    else:
        ref = seg["majority_class"]
        table.add_row(f"(class {seg['classes'][ref['class']]} everywhere)", f"{ref['miou']:.3f}",
                      f"{ref['pixel_accuracy']:.3f}")
    console.print(table)


def _print_ensemble(ensemble: dict) -> None:
    from rich.table import Table

    table = Table(title=f"entropy-weighted head ensembling (gamma={ensemble['gamma']})")
    for col in ("task", "features", "each head", "ensemble"):
        table.add_column(col)
    if "knn" in ensemble:
        for side in ("student", "teacher"):
            entry = ensemble["knn"][side]
            heads = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in entry.items() if "/" in k)
            table.add_row("kNN top-1", side, heads, f"{entry['ensemble']:.3f}")
    for name, entry in ensemble.get("zeroshot", {}).items():
        agree = entry["agreement_with_teacher_ensemble"]
        heads = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in agree.items() if "/" in k)
        table.add_row(f"zero-shot {name}: agreement with the teachers' ensemble", "student", heads,
                      f"{agree['ensemble']:.3f}")
        for side, top1 in entry.get("top1", {}).items():
            heads = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in top1.items() if "/" in k)
            table.add_row(f"zero-shot {name} top-1", side, heads, f"{top1['ensemble']:.3f}")
    for name, entry in ensemble.get("retrieval", {}).items():
        for side in ("student", "teacher"):
            r1 = {k: v["image_to_text"]["r1"] for k, v in entry[side].items()}
            heads = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in r1.items() if "/" in k)
            table.add_row(f"retrieval {name}: image -> text R@1", side, heads, f"{r1['ensemble']:.3f}")
    console.print(table)
