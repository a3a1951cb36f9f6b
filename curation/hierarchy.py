"""Hierarchical k-means (Vo et al. 2024; AMoE §3.3 / supp. §12): a tree of centroids.

Level 1 clusters the embeddings (or a ``fit_sample`` of them, AMoE's step (ii)); level l+1
clusters the centroids of level l. When fitted on a subsample, every remaining row of the pool is
assigned to its nearest level-1 centroid in bounded-memory chunks (AMoE's step (iii)), so the
tree covers the whole pool. Levels are 1-based everywhere, as in the papers (level 1 = finest).

The per-point level-1 labels may live outside memory (a zarr array written unit by unit by a
distributed assignment job, ``stages.assign_job``): everything that reduces over points reads them
in blocks (:func:`iter_label_blocks`), so a pool of billions is never held by one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from curation.keys import row_keys
from curation.kmeans import (DEFAULT_CHUNK_ROWS, DEFAULT_ITERATIONS, Init, KMeansResult, RefineInit, Strategy, _prep,
                             _shape, assign, kmeans_with_resampling, take_rows)

log = logging.getLogger(__name__)

# Fits level 1 somewhere else (a distributed job): ``fit(rows, K, refine_steps=, points_per_cluster=,
# seed=, n_iter=, init=, spherical=, gpu=, chunk_rows=, strategy=, refine_init=)`` -> KMeansResult over
# ``embeddings[rows]`` (rows sorted), the same contract as ``kmeans_with_resampling``. It reads the rows
# itself, so the caller never holds them.
Level1Fit = Callable[..., KMeansResult]

# Assigns the whole pool to the level-1 centroids somewhere else (a distributed job):
# ``assign(centroids, spherical=, gpu=)`` -> (labels [N], sqdist [N]): zarr arrays (label -1 = a row that is not
# a point, e.g. an image that failed to decode), or numpy arrays that label every row (an in-memory tree has no
# unlabelled rows: ``Hierarchy`` refuses -1 there). The fitted labels are then not used: every row, fitted or
# not, is labelled by its nearest final centroid, as ``assign`` does.
PoolAssign = Callable[..., tuple[Any, Any]]


def iter_label_blocks(labels: Any, sqdist: Any, block_rows: int = DEFAULT_CHUNK_ROWS):
    """Yield ``(rows int64, labels int64, sqdist float32)`` of the labelled rows (label >= 0), ``block_rows``
    rows at a time, in row order; ``labels``/``sqdist`` are numpy or zarr [N] arrays (zarr read lazily)."""
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    n = int(labels.shape[0])
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        lab = np.asarray(labels[start:stop]).astype(np.int64, copy=False)
        keep = np.flatnonzero(lab >= 0)
        yield start + keep, lab[keep], np.asarray(sqdist[start:stop], dtype=np.float32)[keep]


@dataclass
class Hierarchy:
    """Fitted tree. ``centroids[l-1]`` is level l ([K_l, d] float32); ``assignments`` [N] is
    the level-1 cluster of every point; ``sqdist`` [N] float32 its squared distance to that
    centroid; ``parents[l-1]`` [K_l] int64 maps a level-l cluster to its level-(l+1) cluster;
    ``inertia[l-1]`` is the k-means objective at level l (over all N points at level 1, over the
    level-(l-1) centroids above).

    ``assignments``/``sqdist`` are numpy int64/float32 arrays, or zarr arrays written by a pool
    assignment job (label -1 = a row that is not a point); reductions over points read them in blocks
    (:meth:`blocks`), and :meth:`point_clusters` is for in-memory trees only."""

    centroids: list[np.ndarray]
    assignments: np.ndarray
    sqdist: np.ndarray
    parents: list[np.ndarray]
    inertia: list[float]
    spherical: bool = False

    def __post_init__(self) -> None:
        if len(self.parents) != len(self.centroids) - 1 or len(self.inertia) != len(self.centroids):
            raise ValueError("need one parent map between consecutive levels and one inertia per level")
        for lvl, p in enumerate(self.parents, start=1):
            if p.shape != (self.centroids[lvl - 1].shape[0],):
                raise ValueError(f"parent map of level {lvl} has shape {p.shape}")
            if p.size and (p.min() < 0 or p.max() >= self.centroids[lvl].shape[0]):
                raise ValueError(f"parent map of level {lvl} points outside level {lvl + 1}")
        if isinstance(self.assignments, np.ndarray) and self.assignments.size and (
                self.assignments.min() < 0 or self.assignments.max() >= self.centroids[0].shape[0]):
            raise ValueError("level-1 assignments out of range")

    @property
    def in_memory(self) -> bool:
        return isinstance(self.assignments, np.ndarray)

    def blocks(self, block_rows: int = DEFAULT_CHUNK_ROWS):
        """``(rows, level-1 labels, sqdist)`` of the points, a block of rows at a time (:func:`iter_label_blocks`)."""
        return iter_label_blocks(self.assignments, self.sqdist, block_rows)

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    @property
    def n_points(self) -> int:
        return int(self.assignments.shape[0])

    @property
    def levels(self) -> list[int]:
        return [int(c.shape[0]) for c in self.centroids]

    def _check_level(self, level: int) -> None:
        if not 1 <= level <= self.n_levels:
            raise ValueError(f"level must be in 1..{self.n_levels}, got {level}")

    def cluster_map(self, level: int) -> np.ndarray:
        """Level-1 cluster -> its ancestor at ``level`` ([K_1] int64), composed from parents."""
        self._check_level(level)
        m = np.arange(self.centroids[0].shape[0], dtype=np.int64)
        for p in self.parents[: level - 1]:
            m = p[m]
        return m

    def point_clusters(self, level: int) -> np.ndarray:
        """Cluster id of every point at ``level`` ([N] int64); in-memory trees only (a pool's labels in
        zarr are read in blocks instead: :meth:`blocks`, :meth:`sizes_per_level`)."""
        if not self.in_memory:
            raise TypeError("point_clusters needs labels in memory; read a zarr-backed tree with blocks()")
        return self.cluster_map(level)[self.assignments]

    def sizes_per_level(self) -> list[np.ndarray]:
        """Points under each cluster, per level (index l-1 = level l): one pass over the labels in blocks,
        then summed up the parent maps. Counted once per tree (the split, the metrics and the plots all ask;
        a pass over a pool's labels in zarr is minutes): copies of the first count after that."""
        cached = self.__dict__.get("_sizes")
        if cached is None:
            cached = self.__dict__["_sizes"] = self._count_sizes()
        return [s.copy() for s in cached]

    def _count_sizes(self) -> list[np.ndarray]:
        sizes = np.zeros(self.levels[0], np.int64)
        for _, lab, _ in self.blocks():
            sizes += np.bincount(lab, minlength=self.levels[0])
        out = [sizes]
        for p, k in zip(self.parents, self.levels[1:]):
            out.append(np.bincount(p, weights=out[-1], minlength=k).astype(np.int64))
        return out

    def cluster_sizes(self, level: int) -> np.ndarray:
        """Number of points under each cluster of ``level`` ([K_level] int64)."""
        self._check_level(level)
        return self.sizes_per_level()[level - 1]

    def save(self, path: str | Path | BinaryIO) -> None:
        """The tree (and, when in memory, the per-point labels) as one ``.npz`` at ``path`` (or into a binary
        file object); a zarr-backed tree's labels stay where they are (the curation run folder's ``clusters/``)
        and are not copied."""
        arrays: dict[str, np.ndarray] = {
            "inertia": np.asarray(self.inertia, dtype=np.float64),
            "spherical": np.asarray(self.spherical), "n_levels": np.asarray(self.n_levels),
        }
        if self.in_memory:
            arrays.update(assignments=self.assignments, sqdist=self.sqdist)
        for lvl, c in enumerate(self.centroids, start=1):
            arrays[f"centroids_{lvl}"] = c
        for lvl, p in enumerate(self.parents, start=1):
            arrays[f"parents_{lvl}"] = p
        if hasattr(path, "write"):
            np.savez(path, **arrays)
            return
        with open(path, "wb") as f:  # file handle: numpy would otherwise append ".npz"
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path, assignments: Any = None, sqdist: Any = None) -> Hierarchy:
        """A saved tree; ``assignments``/``sqdist`` (e.g. a run folder's ``clusters/`` arrays) for a tree
        saved without its labels."""
        with np.load(path) as z:
            n = int(z["n_levels"])
            if assignments is None:
                if "assignments" not in z:
                    raise ValueError(f"{path}: the tree was saved without its per-point labels; pass them "
                                     "(a curation run folder keeps them in clusters/level1 and clusters/sqdist)")
                assignments, sqdist = z["assignments"].astype(np.int64), z["sqdist"]
            return cls(
                centroids=[z[f"centroids_{i}"] for i in range(1, n + 1)],
                assignments=assignments, sqdist=sqdist,
                parents=[z[f"parents_{i}"].astype(np.int64) for i in range(1, n)],
                inertia=[float(v) for v in z["inertia"]], spherical=bool(z["spherical"]))


def _per_level(value: int | Sequence[int], n_levels: int, name: str) -> list[int]:
    vals = [int(value)] * n_levels if np.isscalar(value) else [int(v) for v in value]
    if len(vals) != n_levels:
        raise ValueError(f"{name} needs one value per level ({n_levels}), got {len(vals)}")
    return vals


def validate_levels(levels: Sequence[int], n_points: int) -> list[int]:
    """Levels must be positive, strictly decreasing, and K_1 <= the number of fit points."""
    levels = [int(k) for k in levels]
    if not levels:
        raise ValueError("levels must name at least one level, e.g. [1000, 100]")
    if any(k <= 0 for k in levels):
        raise ValueError(f"every level needs a positive number of clusters, got {levels}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be strictly decreasing (finest first), got {levels}")
    if levels[0] > n_points:
        raise ValueError(f"K_1={levels[0]} is larger than the number of points to fit ({n_points})")
    return levels


PERMUTE_BELOW = 1 << 24  # pools up to this many rows draw the fit sample from one generator (≤ 128 MB)
FIT_STREAM = 1  # row_keys stream of the fit sample of larger pools


def sample_fit_rows(n: int, fit_sample: int | np.ndarray | None, seed: int, *,
                    permute_below: int = PERMUTE_BELOW, block_rows: int = 1 << 20) -> np.ndarray | None:
    """Sorted row indices of the uniform fit subsample (AMoE supp. §12 step (ii)); None = all.

    Up to ``permute_below`` rows: ``Generator.choice`` without replacement, which permutes all n rows when
    the sample is more than 2% of them (8 B per pool row). Above: the rows with the ``m`` smallest
    :func:`curation.keys.row_keys` (also a uniform m-subset), found in two passes of ``block_rows`` rows
    (:func:`smallest_key_rows`), so the driver holds the sample, not the pool: at 2.3B rows the permutation
    alone would be 18 GB.
    """
    if fit_sample is None:
        return None
    if np.isscalar(fit_sample):
        m = int(fit_sample)
        if m <= 0:
            raise ValueError(f"fit_sample must be positive, got {m}")
        if m >= n:
            return None
        if n > permute_below:
            return smallest_key_rows(n, m, seed, FIT_STREAM, block_rows)
        return np.sort(np.random.default_rng([seed, 1]).choice(n, size=m, replace=False))
    idx = np.unique(np.asarray(fit_sample, dtype=np.int64))
    if idx.size == 0 or idx[0] < 0 or idx[-1] >= n:
        raise ValueError("fit_sample indices must be non-empty and inside [0, N)")
    return None if idx.size == n else idx


def smallest_key_rows(n: int, m: int, seed: int, stream: int, block_rows: int = 1 << 20,
                      buckets: int = 1 << 16) -> np.ndarray:
    """Sorted rows of [0, n) whose ``row_keys(row, seed, stream)`` are the ``m`` smallest (ties by row).

    Pass 1 counts the keys per bucket of [0, 1) to find the bucket that holds the m-th smallest; pass 2 keeps
    every row below it and the candidates inside it (about n / buckets), of which the smallest complete m.
    Memory: the m rows, the bucket counts, one block and the candidates.
    """
    counts = np.zeros(buckets, np.int64)
    for start in range(0, n, block_rows):
        keys = row_keys(np.arange(start, min(start + block_rows, n)), seed, stream)
        counts += np.bincount((keys * buckets).astype(np.int64), minlength=buckets)
    below = np.cumsum(counts)
    edge = int(np.searchsorted(below, m))  # the bucket holding the m-th smallest key
    need = m - (int(below[edge - 1]) if edge else 0)
    out, at = np.empty(m, np.int64), 0
    cand_rows, cand_keys = [], []
    for start in range(0, n, block_rows):
        rows = np.arange(start, min(start + block_rows, n))
        keys = row_keys(rows, seed, stream)
        bucket = (keys * buckets).astype(np.int64)
        take = rows[bucket < edge]
        out[at: at + take.size] = take
        at += take.size
        inside = bucket == edge
        cand_rows.append(rows[inside])
        cand_keys.append(keys[inside])
    rows, keys = np.concatenate(cand_rows), np.concatenate(cand_keys)
    out[at:] = rows[np.lexsort((rows, keys))[:need]]
    return np.sort(out)


def fit_hierarchy(embeddings: Any, levels: Sequence[int], *,
                  fit_sample: int | np.ndarray | None = None,
                  refine_steps: int | Sequence[int] | None = None,
                  points_per_cluster: int | Sequence[int] | None = None,
                  refine_strategy: Strategy = "closest", refine_init: RefineInit = "fresh",
                  n_iter: int = DEFAULT_ITERATIONS, init: Init = "kmeans++", spherical: bool = False, seed: int = 0,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, gpu: bool | None = None,
                  timings: dict[str, float] | None = None, level1_fit: Level1Fit | None = None,
                  pool_assign: PoolAssign | None = None) -> Hierarchy:
    """Fit the tree on ``embeddings`` ([N, d] numpy or zarr, float32/float16).

    Level 1 runs :func:`kmeans_with_resampling` on the fit rows (all rows, or ``fit_sample``: a
    count drawn uniformly with ``seed`` or explicit row indices); only those rows are held in
    memory. The other rows are then assigned to the level-1 centroids ``chunk_rows`` at a time.
    Each level l >= 2 runs the same procedure on the level-(l-1) centroids. ``refine_steps`` and
    ``points_per_cluster`` are per level or one value for all. Defaults follow Vo et al.'s
    4-level config: no resampling at level 1 (too costly there), 10 steps above it, r = half the
    mean cluster size of the level, and no resampling where that r is 1 or less (as the reference
    code; see ``kmeans_with_resampling``), and 50 Lloyd iterations per k-means. ``timings``, if given, receives seconds per
    phase. Memory: the fit rows (float32), 12 bytes per pool row (label + distance) and a few
    read buffers of ``chunk_rows x d`` floats; the pool itself is streamed, never held.
    ``init="kmeans++"`` costs K passes over the fit rows: use ``"random"`` for very large K.
    ``level1_fit`` (e.g. ``stages.kmeans_job.DistributedLevel1Fit``) replaces the in-process level-1
    fit; this process then never reads the fit rows. ``pool_assign`` (e.g.
    ``stages.assign_job.PoolAssignment``) assigns every row of the pool to the final level-1 centroids
    somewhere else and returns the labels as (zarr) arrays; this process then never holds [N] labels.
    """
    n, _ = _shape(embeddings)
    fit_rows = sample_fit_rows(n, fit_sample, seed)
    n_fit = n if fit_rows is None else fit_rows.size
    levels = validate_levels(levels, n_fit)
    if refine_steps is None:
        refine_steps = [0] + [10] * (len(levels) - 1)
    if points_per_cluster is None:
        inputs = [n_fit] + levels[:-1]
        points_per_cluster = [max(1, m // k // 2) for m, k in zip(inputs, levels)]
    steps = _per_level(refine_steps, len(levels), "refine_steps")
    ppc = _per_level(points_per_cluster, len(levels), "points_per_cluster")
    t = timings if timings is not None else {}

    common = dict(n_iter=n_iter, init=init, spherical=spherical, gpu=gpu, chunk_rows=chunk_rows,
                  strategy=refine_strategy, refine_init=refine_init)
    if level1_fit is not None:
        t0 = time.perf_counter()
        res = level1_fit(np.arange(n) if fit_rows is None else fit_rows, levels[0], refine_steps=steps[0],
                         points_per_cluster=ppc[0], seed=seed, **common)
        t["level_1_fit"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        if fit_rows is None and isinstance(embeddings, np.ndarray):
            x_fit = _prep(embeddings, spherical)  # no copy when already float32 and not spherical
        else:  # blockwise read: float32, unit-norm rows when spherical
            x_fit = take_rows(embeddings, np.arange(n) if fit_rows is None else fit_rows, chunk_rows,
                              spherical)
        t["read_fit_rows"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = kmeans_with_resampling(x_fit, levels[0], refine_steps=steps[0],
                                     points_per_cluster=ppc[0], seed=seed, prepared=True, **common)
        t["level_1_fit"] = time.perf_counter() - t0
        del x_fit
    log.info("level 1: K=%d on %d points in %.1fs", levels[0], n_fit, t["level_1_fit"])

    t0 = time.perf_counter()
    if pool_assign is not None:  # AMoE supp. §12 step (iii), as a job that writes the labels where they stay
        labels, sqdist = pool_assign(res.centroids, spherical=spherical, gpu=gpu)
        level1_inertia = float(sum(d.astype(np.float64).sum() for _, _, d in iter_label_blocks(labels, sqdist,
                                                                                                 chunk_rows)))
    else:
        if fit_rows is None:
            labels, sqdist = res.labels, res.sqdist
        else:  # AMoE supp. §12 step (iii): assign the rest of the pool to the level-1 centroids
            labels, sqdist = assign(embeddings, res.centroids, spherical=spherical,
                                    chunk_rows=chunk_rows, gpu=gpu, skip_rows=fit_rows)
            labels[fit_rows], sqdist[fit_rows] = res.labels, res.sqdist
        level1_inertia = float(sqdist.astype(np.float64).sum())
    t["assign_pool"] = time.perf_counter() - t0

    centroids, parents = [res.centroids], []
    inertia = [level1_inertia]
    t0 = time.perf_counter()
    for lvl in range(1, len(levels)):
        up = kmeans_with_resampling(centroids[-1], levels[lvl], refine_steps=steps[lvl],
                                    points_per_cluster=ppc[lvl], seed=seed + 1000 * lvl, **common)
        centroids.append(up.centroids)
        parents.append(up.labels)
        inertia.append(up.inertia)
    t["upper_levels_fit"] = time.perf_counter() - t0
    return Hierarchy(centroids, labels, sqdist, parents, inertia, spherical)
