"""Flags shared by the commands that run a teacher on a Ray actor pool (cache-teachers, curate)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

__all__ = ["ComputeDtype", "Device", "GpusPerWorker", "accelerator_flags"]

Device = Annotated[Optional[str], typer.Option(
    "--device", help="auto (default: CUDA when the Ray cluster has GPUs), cpu or cuda (refused at once without a GPU)")]
ComputeDtype = Annotated[Optional[str], typer.Option(
    "--compute-dtype", help="float32, bfloat16 or float16 forward (default: bfloat16 on CUDA, float32 on CPU); "
    "part of the teacher's fingerprint")]
GpusPerWorker = Annotated[Optional[float], typer.Option(
    "--gpus-per-worker", help="GPUs per replica on CUDA (default 1; 0.5 puts two replicas on one GPU)")]


def accelerator_flags(device: str | None, compute_dtype: str | None, gpus_per_worker: float | None) -> dict:
    """The config fields these flags set (None = not given: the config file or default decides)."""
    return {"device": device, "compute_dtype": compute_dtype, "gpus_per_worker": gpus_per_worker}
