"""Where a teacher job's replicas compute: device, precision, GPUs per replica, number of replicas.

Resolved once in the driver, before any work, from what the Ray cluster the job runs on offers:
``--device auto`` is CUDA when that cluster has GPUs. Each replica then asks Ray for
``gpus_per_worker`` GPUs (fractions share one GPU, e.g. 0.5 = two replicas per GPU), so a multi-node
cluster places one replica per GPU and Ray sets each actor's ``CUDA_VISIBLE_DEVICES``. The compute
dtype (autocast of the network call; default: the teacher's, ``Teacher.default_compute_dtype``) is
part of the teacher's fingerprint, the device is not: bf16- and fp32-computed targets never mix in
one teacher group, while the same precision on another device resumes the same group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["DeviceError", "Placement", "check_fits", "cluster_resources", "place_job", "replica_threads",
           "resolve_placement"]

Device = Literal["auto", "cpu", "cuda"]


class DeviceError(ValueError):
    """A device request the cluster cannot serve (no CUDA GPU, more GPUs per replica than there are)."""


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda" (inside an actor: the GPU Ray assigned to it)
    compute_dtype: str | None  # precision of the network call (COMPUTE_DTYPES); None: the teacher's default
    gpus_per_worker: float  # Ray's GPU request per replica; 0 on CPU
    workers: int  # replicas

    def for_teacher(self, teacher) -> "Placement":
        """The compute dtype settled: the one asked for, else the teacher's default on this device."""
        return replace(self, compute_dtype=self.compute_dtype or teacher.default_compute_dtype(self.device))

    def teacher_kwargs(self) -> dict:
        """The ``build_teacher`` arguments a replica adds to the job's model source."""
        return {"device": self.device, "compute_dtype": self.compute_dtype}

    def describe(self) -> str:
        gpus = f", {self.gpus_per_worker:g} GPU each" if self.device == "cuda" else ""
        return f"{self.device} {self.compute_dtype}, {self.workers} replica{'s' * (self.workers != 1)}{gpus}"


def cluster_resources(ray_address: str | None, num_cpus: int | None = None) -> tuple[float, float, str]:
    """(GPUs, CPUs of the cluster the job will run on, how to name it), without starting a cluster.

    A running Ray (or ``--ray-address``) is asked for its resources; otherwise the job starts an
    embedded cluster, which is given ``num_cpus`` (default: all) and the GPUs torch sees (``ray_cluster``).
    """
    import ray

    if ray.is_initialized():
        r = ray.cluster_resources()
        return float(r.get("GPU", 0.0)), float(r.get("CPU", 0.0)), "the running Ray cluster"
    if ray_address:
        from .ray_cluster import ray_cluster

        with ray_cluster(ray_address):
            r = ray.cluster_resources()
            return float(r.get("GPU", 0.0)), float(r.get("CPU", 0.0)), f"the Ray cluster at {ray_address}"
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(gpus), float(num_cpus or os.cpu_count() or 1), "this machine"


def replica_threads(threads: int | None, num_cpus: int | None, workers: int) -> int:
    """Torch threads per replica: as configured, else this machine's CPUs (or ``num_cpus``) shared out."""
    return threads or max(1, (num_cpus or len(os.sched_getaffinity(0))) // workers)


def resolve_placement(device: Device, compute_dtype: str | None, gpus_per_worker: float, workers: int | None,
                      gpus: float, where: str = "the cluster") -> Placement:
    """The placement for a request, or a ``DeviceError`` that names what is missing.

    workers: None = one replica per ``gpus_per_worker`` share of the cluster's GPUs on CUDA, 1 on CPU.
    compute_dtype: None = the teacher's default, settled by ``Placement.for_teacher``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and gpus <= 0:
        raise DeviceError(f"--device cuda: {where} has no CUDA GPU; use --device cpu or --device auto")
    chosen = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
    if chosen == "cpu":
        return Placement("cpu", compute_dtype, 0.0, workers or 1)
    if not gpus_per_worker > 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker)):
        raise DeviceError(f"--gpus-per-worker {gpus_per_worker:g}: use a fraction of one GPU or a whole number")
    if gpus_per_worker > gpus:
        raise DeviceError(f"--gpus-per-worker {gpus_per_worker:g}: {where} has only {gpus:g} GPUs")
    fits = math.floor(gpus / gpus_per_worker + 1e-9)
    if workers is not None and workers > fits:
        # an actor Ray cannot place would hold its units forever: refuse rather than hang
        raise DeviceError(f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g} needs "
                          f"{workers * gpus_per_worker:g} GPUs; {where} has {gpus:g} (or use --device cpu)")
    return Placement("cuda", compute_dtype, float(gpus_per_worker), workers or fits)


def check_fits(placement: Placement, threads: int, cpus: float, where: str = "the cluster") -> None:
    """Refuse replicas whose CPU request the cluster cannot grant all at once: an actor Ray cannot
    place holds the units handed to it forever (``ray.util.ActorPool``), so the job would hang."""
    if placement.workers * threads > cpus + 1e-9:
        raise DeviceError(f"{placement.workers} replica(s) x {threads} CPU threads need {placement.workers * threads} "
                          f"CPUs; {where} has {cpus:g}: lower --workers or the threads setting")


def place_job(cfg) -> Placement:
    """The placement of a teacher job's config (CacheConfig, CurateConfig), checked against its cluster
    before any work: no GPU for --device cuda, or replicas the cluster cannot place, are refused."""
    gpus, cpus, where = cluster_resources(cfg.ray_address, cfg.num_cpus)
    placement = resolve_placement(cfg.device, cfg.compute_dtype, cfg.gpus_per_worker, cfg.workers, gpus, where)
    check_fits(placement, replica_threads(cfg.threads, cfg.num_cpus, placement.workers), cpus, where)
    return placement
