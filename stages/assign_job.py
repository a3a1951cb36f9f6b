"""Assignment of a curation pool to its level-1 centroids as units on the Ray pool (AMoE supp. §12 step iii).

The embedding job's units are reused: unit u is rows ``u*unit_images .. (u+1)*unit_images`` of
``DIR/embeddings``, and every array here is chunked the same way, so a unit writes only its own chunk
objects and then its commit marker (``stages.runner``, ``storage.commits``: a killed job reruns only the
units without a marker). After the job the run folder holds

```
DIR/clusters/level1 [N] int32       nearest level-1 centroid of row i; -1 where the image failed to decode
DIR/clusters/sqdist [N] float32     squared L2 distance to it (0 where -1)
DIR/clusters/centroids [K, D] float32  the centroids the labels index (spherical: as given, unnormalised)
DIR/_commits/assign/unit-*.json  one marker per unit (with the Ray node that wrote it)
```

and ``DIR``'s attrs ``clusters`` name the centroids (sha256 of their bytes, K, geometry): a rerun with
other centroids (another seed, other levels) starts over instead of mixing two assignments. The
actors each read the centroids from the run folder, check them against that name, build one faiss index
and stream their units through it: memory per actor is the index plus one unit of embeddings. (From the
folder, not Ray's object store: an actor Ray restarts on another node after a node failure needs nothing
the driver holds, and the labels keep their centroids next to them.) On a cluster with GPUs
(and ``gpu`` not False) each actor asks Ray for one GPU and faiss searches there.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import numpy as np

from curation.kmeans import assign
from storage.arrays import create_array
from storage.commits import CommitLog
from storage.fsutil import zarr_options

from .embed import EMBEDDINGS, POOL
from .runner import UnitJob, ray_node_id

__all__ = ["ASSIGN_COMMITS", "CLUSTERS", "AssignWorker", "PoolAssignment", "centroids_digest"]

CLUSTERS = "clusters"
CENTROIDS = "centroids"
ASSIGN_COMMITS = "_commits/assign"


def centroids_digest(centroids: np.ndarray, spherical: bool) -> dict[str, Any]:
    """What identifies an assignment: the exact centroids (float32 bytes) and the geometry."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    return {"centroids_sha256": hashlib.sha256(c.tobytes()).hexdigest(), "k": int(c.shape[0]),
            "dim": int(c.shape[1]), "spherical": bool(spherical)}


class AssignWorker:
    """One assignment replica: a faiss index of the centroids; ``run_unit`` labels one unit's rows."""

    def __init__(self, url: str, spherical: bool, gpu: bool | None, threads: int, unit_images: int):
        import faiss
        import zarr

        from curation.kmeans import NearestCentroid

        faiss.omp_set_num_threads(int(threads))
        self.group = zarr.open_group(url, mode="r+", **zarr_options(url))
        centroids = np.asarray(self.group[f"{CLUSTERS}/{CENTROIDS}"][:], np.float32)
        if centroids_digest(centroids, spherical) != self.group.attrs.get(CLUSTERS):  # another run replaced them
            raise RuntimeError(f"{url}: {CLUSTERS}/{CENTROIDS} are not the centroids this assignment was started "
                               "with (another curate ran on the folder); rerun the command")
        self.nearest = NearestCentroid(centroids, spherical=spherical, gpu=gpu)  # one index for every unit
        self.unit_images = unit_images
        self.commits = CommitLog(url, ASSIGN_COMMITS)

    def run_unit(self, unit: int) -> dict:
        t0 = time.perf_counter()
        g = self.group
        i0 = unit * self.unit_images
        i1 = min(i0 + self.unit_images, g[EMBEDDINGS].shape[0])
        ok = np.asarray(g[f"{POOL}/ok"][i0:i1])
        labels = np.full(i1 - i0, -1, np.int32)
        sqdist = np.zeros(i1 - i0, np.float32)
        if ok.any():
            x = np.asarray(g[EMBEDDINGS][i0:i1])[ok]
            lab, dist = assign(x, self.nearest)
            labels[ok], sqdist[ok] = lab.astype(np.int32), dist
        g[f"{CLUSTERS}/level1"][i0:i1] = labels
        g[f"{CLUSTERS}/sqdist"][i0:i1] = sqdist
        self.commits.commit(unit, {"rows": [i0, i1], "points": int(ok.sum()), "node": ray_node_id()})
        return {"unit": unit, "points": int(ok.sum()), "seconds": time.perf_counter() - t0}


def _write_centroids(clusters: Any, centroids: np.ndarray) -> None:
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    arr = create_array(clusters, CENTROIDS, shape=c.shape, dtype="float32", chunks=(min(len(c), 65536), c.shape[1]))
    arr[:] = c


class PoolAssignment:
    """The ``pool_assign`` of :func:`curation.hierarchy.fit_hierarchy` for a curation run folder.

    Called with the final level-1 centroids, it labels every row of ``DIR/embeddings`` (the decodable
    ones; -1 for the others) on ``workers`` Ray actors and returns the zarr arrays ``DIR/clusters/level1``
    and ``DIR/clusters/sqdist``. Joins the Ray cluster the caller runs in (``stages.ray_cluster``).
    ``report`` holds units done/skipped, the actors and the seconds afterwards.
    """

    def __init__(self, out: str, unit_images: int, *, workers: int | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None):
        self.out, self.unit_images = str(out), int(unit_images)
        self.workers, self.on_progress = workers, on_progress
        self.report: dict[str, Any] = {}

    def __call__(self, centroids: np.ndarray, *, spherical: bool = False, gpu: bool | None = None) -> tuple[Any, Any]:
        import ray
        import zarr

        t0 = time.perf_counter()
        group = zarr.open_group(self.out, mode="r+", **zarr_options(self.out))
        if EMBEDDINGS not in group or f"{POOL}/ok" not in group:
            raise ValueError(f"{self.out}: no embeddings to assign (run the embedding job first)")
        n = int(group[EMBEDDINGS].shape[0])
        expected = centroids_digest(centroids, spherical)
        commits = CommitLog(self.out, ASSIGN_COMMITS)
        if group.attrs.get(CLUSTERS) != expected:  # other centroids (or none yet): start over, markers first
            if CLUSTERS in group.attrs:  # no name until the new centroids are written: a crash in between
                group.attrs[CLUSTERS] = None  # leaves a folder that any rerun starts over
            commits.clear()
            clusters = group.require_group(CLUSTERS)
            create_array(clusters, "level1", shape=(n,), dtype="int32", chunks=(self.unit_images,), fill_value=-1)
            create_array(clusters, "sqdist", shape=(n,), dtype="float32", chunks=(self.unit_images,), fill_value=0)
            _write_centroids(clusters, centroids)
            group.attrs[CLUSTERS] = expected  # last: a crash before it starts over on the rerun
        elif CENTROIDS not in group[CLUSTERS]:  # a folder assigned before the centroids were kept: the same ones
            _write_centroids(group[CLUSTERS], centroids)
        num_units = -(-n // self.unit_images)
        job = UnitJob("assign", num_units, commits.committed(), self.on_progress)
        todo = job.todo
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        on_gpu = gpu is not False and gpus > 0  # one actor per GPU (Ray hides the GPUs an actor did not ask for)
        workers = max(1, min(self.workers or (gpus if on_gpu else cpus), len(todo) or 1))
        threads = max(1, cpus // workers)
        points = 0
        if todo:
            init = (self.out, spherical, on_gpu, threads, self.unit_images)
            for result in job.run_actors(AssignWorker, init, workers=workers, num_cpus=min(1.0, cpus / workers),
                                         num_gpus=1 if on_gpu else 0):
                points += result["points"]
        missing = set(range(num_units)) - commits.committed()
        if missing:  # an actor answered but its node died before the marker (runner.run_actors): say so
            raise RuntimeError(f"{self.out}: pool assignment units {sorted(missing)[:5]} have no commit marker "
                               "after the job; rerun the command to finish them")
        self.report = {"units": num_units, "units_skipped": num_units - len(todo), "workers": workers if todo else 0,
                       "threads_per_worker": threads, "gpus_per_worker": 1 if on_gpu and todo else 0, "points_assigned": points,
                       "seconds": time.perf_counter() - t0}
        return group[f"{CLUSTERS}/level1"], group[f"{CLUSTERS}/sqdist"]
