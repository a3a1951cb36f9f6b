"""`pipeline cache-teachers`: thin CLI over stages.cache.run_cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from config import load_cli_config
from stages.config import CacheConfig

from .options import ComputeDtype, Device, GpusPerWorker, accelerator_flags
from ..console import console, failures_text, phase_reporter, progress, user_errors


def cache_teachers(
    images: Annotated[str, typer.Argument(help="a folder (recursive), a text file of paths, or tar shards (a.tar, 'shard-{000..009}.tar')")],
    store: Annotated[str, typer.Option("--store", help="store directory or fsspec URL (created if absent)")],
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="SPEC: timm:MODEL or open_clip:MODEL[,key=value...]")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="teacher group name in the store")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="safetensors / torch state dict")] = None,
    random_init: Annotated[Optional[bool], typer.Option("--random-init/--no-random-init", help="seeded random weights")] = None,
    codec: Annotated[Optional[str], typer.Option(
        "--codec", help="how targets are stored: float16 (default), float32, bfloat16 or int8 (under half of "
                        "float16's bytes; read back as float32 by plain zarr)")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="older name of --codec: float16 or float32")] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="fewest student tokens per image")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="most student tokens per image")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV path,label stored as the labels array")] = None,
    masks: Annotated[Optional[Path], typer.Option(
        "--masks", help="CSV path,mask: per-pixel label maps stored with the images (segmentation probes; "
                        "--set mask_kind=values for a regression target such as depth)")] = None,
    mask_classes: Annotated[Optional[Path], typer.Option(
        "--mask-classes", help="names of the mask classes, one per line (line i = value i)")] = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="also cache these teacher blocks (1-based, comma-separated, e.g. 8,10,12) as layers/<k>; "
                         "on a cached teacher only they are computed")] = None,
    text_classes: Annotated[Optional[Path], typer.Option(
        "--text-classes", help="class names, one per line (line i names label i): the text tower's class "
                               "embeddings into text/classes (zero-shot evaluation)")] = None,
    text_templates: Annotated[Optional[Path], typer.Option(
        "--text-templates", help="prompt templates with one {} each (default: six CLIP templates)")] = None,
    captions: Annotated[Optional[Path], typer.Option(
        "--captions", help="CSV path,caption (several rows per image allowed): the text tower's caption embeddings "
                           "into text/captions (retrieval)")] = None,
    classifier: Annotated[Optional[bool], typer.Option(
        "--classifier/--no-classifier", help="the teacher's linear classifier as class embeddings with bias "
                                             "(EfficientNet-Lite's ImageNet head) into text/classifier")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="join this Ray cluster")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="teacher actors (default: one per GPU share on CUDA, 1 on CPU)")] = None,
    device: Device = None,
    compute_dtype: ComputeDtype = None,
    gpus_per_worker: GpusPerWorker = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with CacheConfig fields")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any config field: key=value")] = None,
) -> None:
    """Run a teacher once over IMAGES and write its targets, pixels and PHI-S statistics into STORE."""
    from stages.cache import run_cache

    given = {
        "teacher": teacher, "name": name, "weights": str(weights) if weights else None, "random_init": random_init,
        "codec": codec, "dtype": dtype, "min_tokens": min_tokens, "max_tokens": max_tokens, "labels": str(labels) if labels else None,
        "ray_address": ray_address, "workers": workers, **accelerator_flags(device, compute_dtype, gpus_per_worker),
        "text_classes": str(text_classes) if text_classes else None,
        "text_templates": str(text_templates) if text_templates else None, "classifier": classifier,
        "captions": str(captions) if captions else None, "masks": str(masks) if masks else None,
        "mask_classes": str(mask_classes) if mask_classes else None,
    }
    with user_errors(store):
        if layers is not None:
            try:
                given["layers"] = [int(k) for k in layers.split(",") if k.strip()]
            except ValueError:
                raise ValueError(f"--layers {layers!r}: give block numbers separated by commas, e.g. 8,10,12") from None
        cfg = load_cli_config(CacheConfig, config, given, set_)
        with progress() as bar:
            report = run_cache(images, store, cfg, on_progress=phase_reporter(bar))
    _print_summary(report)


def _print_summary(report) -> None:
    from rich.table import Table

    ing = report.ingest
    table = Table(title=f"cache-teachers -> {report.store}", show_header=False)
    table.add_row("teacher", report.teacher + ("  (resumed)" if report.resumed else ""))
    table.add_row("images", f"{ing.num_images}" + ("  (already in store)" if ing.skipped else ""))
    table.add_row("failed images", failures_text(ing.num_failed, ing.failure_reasons))
    if ing.masked is not None:
        table.add_row("images with a mask", f"{ing.masked} of {ing.num_images}")
    if ing.labelled is not None:
        changed = f"  ({ing.labels_changed} changed from the stored labels)" if ing.skipped and ing.labels_changed else ""
        table.add_row("labelled images", f"{ing.labelled} of {ing.num_images}{changed}")
    table.add_row("computed on", report.placement)
    table.add_row("units", f"{report.units_total} ({report.units_skipped} already committed)")
    if report.units_lost:
        table.add_row("units run again", f"{len(report.units_lost)} (answered by a worker lost with its node, "
                      "never written)")
    table.add_row("images computed / tokens written", f"{report.images_computed} / {report.tokens}")
    for k, (worker, memory) in enumerate(sorted(report.workers.items())):
        table.add_row(f"worker {k} memory" if len(report.workers) > 1 else "worker memory",
                      f"{memory.describe()} ({worker})")
    for feature, info in report.phis.items():
        table.add_row(f"PHI-S {feature}", f"{info['method']}, scale {info['scale']:.4g}, from {info['count']} rows")
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    console.print(table)
