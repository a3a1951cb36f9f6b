"""The level-1 k-means fit as a Ray job: one actor per shard of the fit sample, the driver reduces.

Each actor reads its shard (a contiguous range of the sorted fit rows) straight from the zarr
embeddings and keeps it; per Lloyd iteration the driver puts the centroids in the object store once,
every actor returns per-centroid float64 sums and counts of its shard (faiss assignment, in the actor),
and the driver reduces them and updates the centroids. The resampling steps run the same way
(:mod:`curation.sharded_kmeans`). The algorithm is the single-process one, shard for shard: with the
same split into shards the centroids are bit-identical to :class:`curation.sharded_kmeans.LocalShards`
in one process (tested), and agree to float rounding for another split.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from typing import Any

import numpy as np

from curation.kmeans import DEFAULT_CHUNK_ROWS, KMeansResult, _check_k, take_rows
from curation.sharded_kmeans import Shard, shard_bounds, sharded_kmeans_with_resampling

from storage.fsutil import zarr_options

from .ok_rows import OkRowMap
from .ray_cluster import ray_cluster
from .runner import ray_node_id

__all__ = ["DistributedLevel1Fit", "RayShards", "ShardWorker"]


class ShardWorker:
    """A Ray actor holding one :class:`Shard`: rows ``rows`` (sorted) of the zarr array at ``source``."""

    def __init__(self, source: str, rows: np.ndarray, spherical: bool, chunk_rows: int, gpu: bool | None,
                 threads: int):
        import faiss
        import zarr

        faiss.omp_set_num_threads(int(threads))
        x = take_rows(zarr.open_array(source, mode="r", **zarr_options(source)), rows, chunk_rows, spherical)
        self.shard = Shard(x, spherical=spherical, chunk_rows=chunk_rows, gpu=gpu, prepared=True)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.shard, method)(*args)

    def usage(self) -> tuple[float, float, str | None]:
        """This worker process's peak resident memory in MB (ru_maxrss; faiss allocates outside Python),
        CPU seconds (user + system) and its Ray node."""
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_maxrss / 1024.0, r.ru_utime + r.ru_stime, ray_node_id()


class RayShards:
    """:class:`curation.sharded_kmeans.ShardSet` over actors; the common arguments (centroids) go to the
    object store once per call and every actor reads that one copy."""

    def __init__(self, actors: Sequence[Any]):
        self.actors = list(actors)

    def call(self, method: str, args: tuple = (), per_shard: Sequence[tuple] | None = None) -> list[Any]:
        import ray

        per_shard = per_shard or [()] * len(self.actors)
        common = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        return ray.get([a.call.remote(method, *common, *extra) for a, extra in zip(self.actors, per_shard)])


class DistributedLevel1Fit:
    """The ``level1_fit`` of :func:`curation.hierarchy.fit_hierarchy` as a Ray job over ``workers`` actors.

    ``source`` is the zarr array of embeddings; ``row_map`` maps the row indices the hierarchy sees to
    rows of that array (the decodable rows of a curation pool: an array or an ``OkRowMap``), None when they
    are the same. Joins the running Ray cluster, or starts one (``ray_address``, ``num_cpus``) for the fit.
    After a call, ``report`` holds the workers' shard sizes, threads, peak RSS and CPU seconds.
    """

    def __init__(self, source: str, workers: int, *, row_map: np.ndarray | OkRowMap | None = None,
                 ray_address: str | None = None, num_cpus: int | None = None):
        if int(workers) < 1:
            raise ValueError(f"the distributed fit needs at least one worker, got {workers}")
        self.source, self.workers = str(source), int(workers)
        self.row_map = row_map if row_map is None or isinstance(row_map, OkRowMap) else np.asarray(row_map, np.int64)
        self.ray_address, self.num_cpus = ray_address, num_cpus
        self.report: dict[str, Any] = {}

    def __call__(self, rows: np.ndarray, k: int, *, spherical: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 gpu: bool | None = None, **kmeans: Any) -> KMeansResult:
        import ray

        rows = np.asarray(rows, np.int64)
        _check_k(rows.size, k)  # the clear errors before any actor starts
        bounds = shard_bounds(rows.size, self.workers)
        def pool_rows(i: int) -> np.ndarray:  # shard by shard: the driver maps one shard's rows at a time
            shard = rows[bounds[i]:bounds[i + 1]]
            return shard if self.row_map is None else self.row_map[shard]

        with ray_cluster(self.ray_address, self.num_cpus):
            cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            threads = max(1, int(cpus // self.workers))
            # a worker asks for one CPU, or its share when there are more workers than CPUs (tests: 3 on 2)
            remote = ray.remote(num_cpus=min(1.0, cpus / self.workers), scheduling_strategy="SPREAD")(ShardWorker)
            actors = [remote.remote(self.source, pool_rows(i), spherical, chunk_rows, gpu, threads)
                      for i in range(self.workers)]
            try:
                result = sharded_kmeans_with_resampling(RayShards(actors), np.diff(bounds), k,
                                                        spherical=spherical, **kmeans)
                usage = ray.get([a.usage.remote() for a in actors])
                self.report = {"workers": self.workers, "threads_per_worker": threads,
                               "shard_rows": np.diff(bounds).tolist(),
                               "worker_peak_rss_mb": [u[0] for u in usage], "worker_cpu_s": [u[1] for u in usage],
                               "worker_nodes": [u[2] for u in usage]}
            finally:
                for a in actors:
                    ray.kill(a)
        return result
