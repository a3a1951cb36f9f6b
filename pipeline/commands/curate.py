"""`pipeline curate`: thin CLI over stages.curate.run_curate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from config import load_cli_config
from stages.config import CurateConfig

from .options import ComputeDtype, Device, GpusPerWorker, accelerator_flags
from ..console import console, failures_text, phase_reporter, progress, user_errors


def curate(
    images: Annotated[str, typer.Argument(help="the pool: a folder (recursive), a text file of paths, or tar shards")],
    out: Annotated[str, typer.Option("--out", help="run folder, a path or fsspec URL (s3://bucket/run): embeddings, manifest, metrics.json, plots (reused on rerun)")],
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="SPEC of the embedding model, e.g. timm:efficientnet_lite0")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="safetensors / torch state dict for the embedder")] = None,
    random_init: Annotated[Optional[bool], typer.Option("--random-init/--no-random-init", help="seeded random embedder weights")] = None,
    levels: Annotated[Optional[str], typer.Option("--levels", help="clusters per level, finest first: K1,K2,... (strictly decreasing)")] = None,
    target: Annotated[Optional[int], typer.Option("--target", help="number of images to select")] = None,
    fit_sample: Annotated[Optional[int], typer.Option("--fit-sample", help="fit level 1 on M random rows, assign the rest")] = None,
    fit_workers: Annotated[Optional[int], typer.Option("--fit-workers", help="fit level 1 with N Ray actors, each holding a shard of the fit rows (0/1: in this process)")] = None,
    selection: Annotated[Optional[str], typer.Option("--selection", help="random (default) or closest to the centroid")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="seed of fitting and sampling")] = None,
    concepts: Annotated[Optional[Path], typer.Option("--concepts", help="CSV path,concept: concept entropy and coverage vs random")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float16 (default) or float32 embeddings")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="join this Ray cluster")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="embedder actors (default: one per GPU share on CUDA, 1 on CPU)")] = None,
    device: Device = None,
    compute_dtype: ComputeDtype = None,
    gpus_per_worker: GpusPerWorker = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with CurateConfig fields")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any config field: key=value")] = None,
) -> None:
    """Embed IMAGES, cluster them hierarchically (k-means per level) and select a balanced subset.

    Writes OUT/manifest (the selected images, usable as IMAGES by `pipeline cache-teachers`),
    OUT/metrics.json (cluster sizes, inertia, entropy of curated vs random per level, concepts),
    OUT/plots/*.png, OUT/hierarchy.npz, OUT/clusters and OUT/embeddings. A killed run resumes where it
    stopped. OUT may be in a bucket (s3://..., credentials and endpoint from the AWS environment).

    Example: pipeline curate pool/ --out runs/curated --embedder timm:efficientnet_lite0
    --levels 200,20 --target 500 --concepts pool/concepts.csv
    """
    from stages.curate import run_curate

    given = {
        "embedder": embedder, "weights": str(weights) if weights else None, "random_init": random_init,
        "levels": levels, "target": target, "fit_sample": fit_sample, "fit_workers": fit_workers, "selection": selection, "seed": seed,
        "concepts": str(concepts) if concepts else None, "dtype": dtype, "ray_address": ray_address,
        "workers": workers, **accelerator_flags(device, compute_dtype, gpus_per_worker),
    }
    with user_errors(str(out)):
        cfg = load_cli_config(CurateConfig, config, given, set_)
        with progress() as bar:
            report = run_curate(images, str(out), cfg, on_progress=phase_reporter(bar))
    _print_summary(report)


def _print_summary(report) -> None:
    from rich.table import Table

    m, e = report.metrics, report.embed
    table = Table(title=f"curate -> {report.out}", show_header=False)
    failed = failures_text(e.num_failed, e.failure_reasons)
    table.add_row("pool", f"{e.num_images} images, {report.num_ok} embedded (dim {e.dim}), failed {failed}")
    table.add_row("embedding units", f"{e.units_total} ({e.units_skipped} already committed)")
    table.add_row("embedded on", e.placement)
    table.add_row("selected", f"{report.num_selected} of {report.num_ok}")
    for row in m["per_level"]:
        s = row["sizes"]
        table.add_row(f"level {row['level']} (K={s['k']})",
                      f"sizes {s['min']}..{s['max']} (median {s['median']:.0f}), inertia {row['inertia']:.4g}; "
                      f"entropy pool {row['entropy_pool']:.3f} / random {row['entropy_random']:.3f} / "
                      f"curated {row['entropy_curated']:.3f}")
    if "concepts" in m:
        c = m["concepts"]
        table.add_row(f"concepts ({c['num_labels']})",
                      f"entropy pool {c['entropy_pool']:.3f} / random {c['entropy_random']:.3f} / curated "
                      f"{c['entropy_curated']:.3f}; coverage random {c['coverage_random']:.0%} / curated "
                      f"{c['coverage_curated']:.0%}")
    for name, path in report.files.items():
        table.add_row(name, path)
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    console.print(table)
    console.print(f"cache the selection with: pipeline cache-teachers {report.out}/manifest --store STORE --teacher SPEC")
