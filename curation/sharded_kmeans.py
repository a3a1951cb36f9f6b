"""k-means with resampling (Vo et al. 2024, Alg. 1) over points split into shards held apart.

The driver never holds the points: it asks every shard for the statistics of one Lloyd step
(:mod:`curation.lloyd`), reduces them and sends back the centroids. The resampling steps run the same
way: each shard ranks its own points inside every cluster and returns its top r per cluster; the
driver merges those candidates into exactly the set :func:`curation.kmeans.resample_per_cluster`
would pick from all points (the global top r of a cluster is among the union of the shards' top r;
ties are broken by global row index in both), and the shards keep the picked points as the set the
next k-means runs on.

Where the shards live is the caller's business (:class:`ShardSet`): :class:`LocalShards` keeps them
in this process (the single-process reference), ``stages.kmeans_job`` in Ray actors. Both run the
same :class:`Shard` methods in the same shard order, so the two give bit-identical centroids when the
split into shards is the same, and agree to float rounding (~1e-6 relative in float32 centroids) for
another split.

Compared with :func:`curation.kmeans.kmeans_with_resampling` (faiss' ``Kmeans``): the same Lloyd
iteration and empty-cluster rule, but the initial centroids are drawn here (``init``), faiss'
random subsampling is never used, and the split draws differ (see :mod:`curation.lloyd`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from curation.kmeans import (DEFAULT_CHUNK_ROWS, DEFAULT_ITERATIONS, Init, KMeansResult, RefineInit, Strategy,
                             _check_k, _prep, assign, kmeans_plusplus, rank_within_clusters)
from curation.lloyd import partial_stats, reduce_stats, update_centroids

SHARD_CHUNK_ROWS = 8192  # rows a shard assigns at once


class Shard:
    """One shard of the fit set: its rows (prepared float32), the subset the current k-means runs on
    (all rows, or the points a resampling step picked), and its labels under the last full assignment."""

    def __init__(self, x: np.ndarray, *, spherical: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 gpu: bool | None = None, prepared: bool = False):
        self.x = x if prepared else _prep(np.asarray(x), spherical)
        # faiss searches 4,096 queries at a time anyway; small chunks bound assign's float32 and float64 copies
        self.spherical, self.chunk_rows, self.gpu = spherical, min(int(chunk_rows), SHARD_CHUNK_ROWS), gpu
        self.subset: np.ndarray | None = None  # local indices, sorted; None = all rows
        self.labels = np.zeros(0, np.int64)
        self.sqdist = np.zeros(0, np.float32)

    def size(self, subset: bool = False) -> int:
        return int(self.x.shape[0] if not subset or self.subset is None else self.subset.size)

    def rows(self, local: np.ndarray, subset: bool = False) -> np.ndarray:
        """Rows at these local positions (of the subset when ``subset``)."""
        local = np.asarray(local, np.int64)
        return self.x[local if not subset or self.subset is None else self.subset[local]]

    def set_subset(self, local: np.ndarray | None) -> None:
        self.subset = None if local is None else np.asarray(local, np.int64)

    def step(self, centroids: np.ndarray, subset: bool):
        """Partial sums, counts and inertia of the rows (or the subset) under ``centroids``."""
        x = self.x if not subset or self.subset is None else self.x[self.subset]
        return partial_stats(x, centroids, spherical=self.spherical, chunk_rows=self.chunk_rows,
                             gpu=self.gpu)[0]

    def assign_all(self, centroids: np.ndarray) -> tuple[int, float]:
        """Assign every row and keep the labels here (for ranking); returns (rows, inertia)."""
        self.labels, self.sqdist = assign(self.x, centroids, spherical=self.spherical,
                                          chunk_rows=self.chunk_rows, gpu=self.gpu)
        return int(self.labels.size), float(self.sqdist.astype(np.float64).sum())

    def top_per_cluster(self, k: int, r: int, key: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's first ``r`` rows of every cluster by (key, row): ``(local rows ascending, their
        labels, their keys)``. ``key=None`` ranks by the squared distance (the "closest" strategy)."""
        key = self.sqdist.astype(np.float64) if key is None else np.asarray(key, np.float64)
        order, rank = rank_within_clusters(self.labels, key, k)
        keep = np.sort(order[rank < r])
        return keep, self.labels[keep], key[keep]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.labels, self.sqdist


class ShardSet(Protocol):
    """Shards in a fixed order. ``call(method, args, per_shard)`` runs ``Shard.method`` on every shard
    with ``args`` (the same for all; a centroid matrix is sent once) followed by ``per_shard[i]`` for
    shard i, and returns the results in shard order."""

    def call(self, method: str, args: tuple = (), per_shard: Sequence[tuple] | None = None) -> list[Any]: ...


class LocalShards:
    """Shards held in this process: ``x`` cut into ``n_shards`` contiguous row ranges."""

    def __init__(self, x: np.ndarray, n_shards: int = 1, *, spherical: bool = False,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, gpu: bool | None = None):
        x = _prep(np.asarray(x), spherical)
        self.shards = [Shard(part, spherical=spherical, chunk_rows=chunk_rows, gpu=gpu, prepared=True)
                       for part in np.array_split(x, shard_bounds(x.shape[0], n_shards)[1:-1])]

    def call(self, method: str, args: tuple = (), per_shard: Sequence[tuple] | None = None) -> list[Any]:
        per_shard = per_shard or [()] * len(self.shards)
        return [getattr(s, method)(*args, *extra) for s, extra in zip(self.shards, per_shard)]


def shard_bounds(n: int, n_shards: int) -> np.ndarray:
    """Row boundaries [n_shards + 1] of ``n`` rows cut into contiguous, near-equal shards."""
    if n_shards < 1:
        raise ValueError(f"need at least one shard (worker), got {n_shards}")
    if n_shards > n:
        raise ValueError(f"cannot cut {n} rows into {n_shards} shards (more workers than fit rows)")
    return (np.arange(n_shards + 1, dtype=np.int64) * n) // n_shards


def _split(global_idx: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Sorted global indices -> local indices per shard (``offsets`` = cumulative shard sizes)."""
    cut = np.searchsorted(global_idx, offsets)
    return [global_idx[cut[i]:cut[i + 1]] - offsets[i] for i in range(offsets.size - 1)]


def _gather(shards: ShardSet, positions: np.ndarray, offsets: np.ndarray, subset: bool) -> np.ndarray:
    """Rows at ``positions`` (of the concatenated shards or subsets), in the order given."""
    order = np.argsort(positions, kind="stable")
    parts = shards.call("rows", (), [(loc, subset) for loc in _split(positions[order], offsets)])
    out = np.empty((positions.size, parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out


def initial_centroids(shards: ShardSet, offsets: np.ndarray, k: int, init: Init, seed: int,
                      subset: bool) -> np.ndarray:
    """``"random"``: k distinct points drawn with ``seed``; ``"kmeans++"``: :func:`kmeans_plusplus` on
    all points, which the driver then gathers (k passes: at large K and N use ``"random"``)."""
    n = int(offsets[-1])
    _check_k(n, k)
    if init == "random":
        return _gather(shards, np.random.default_rng([seed, 5]).choice(n, size=k, replace=False), offsets, subset)
    if init == "kmeans++":
        return kmeans_plusplus(_gather(shards, np.arange(n), offsets, subset), k, seed)
    raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")


def lloyd(shards: ShardSet, centroids: np.ndarray, n_iter: int, *, spherical: bool, seed: int,
          subset: bool = False) -> np.ndarray:
    """``n_iter`` Lloyd iterations from ``centroids``: map on the shards, reduce and update here."""
    rng = np.random.default_rng([seed, 6])  # empty-cluster splits
    for _ in range(int(n_iter)):
        stats = reduce_stats(shards.call("step", (centroids, subset)))
        centroids, _ = update_centroids(stats, spherical=spherical, rng=rng)
    return centroids


def merge_top_per_cluster(candidates: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], offsets: np.ndarray,
                          k: int, r: int) -> np.ndarray:
    """The shards' per-cluster top-r candidates -> the global top r of each cluster (sorted global rows).
    Candidates are concatenated in global row order, so the stable sort breaks key ties by row, as
    :func:`curation.kmeans.resample_per_cluster` does over all rows."""
    rows = np.concatenate([loc + offsets[i] for i, (loc, _, _) in enumerate(candidates)])
    labels = np.concatenate([lab for _, lab, _ in candidates])
    keys = np.concatenate([key for _, _, key in candidates])
    order, rank = rank_within_clusters(labels, keys, k)
    return np.sort(rows[order[rank < r]])


def sharded_kmeans_with_resampling(shards: ShardSet, sizes: Sequence[int], k: int, *, refine_steps: int = 10,
                                   points_per_cluster: int = 10, strategy: Strategy = "closest",
                                   refine_init: RefineInit = "fresh", n_iter: int = DEFAULT_ITERATIONS,
                                   spherical: bool = False, seed: int = 0, init: Init = "kmeans++",
                                   ) -> KMeansResult:
    """:func:`curation.kmeans.kmeans_with_resampling` (Vo et al. 2024, Alg. 1; see it for the steps)
    with every pass over the points run on the shards (``sizes``: rows per shard, in order). The
    random choices are the single-process ones: resampling keys and top-ups drawn with
    ``default_rng(seed)`` in the same order, step s re-initialised with seed ``seed + s + 1``."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    n = int(offsets[-1])
    _check_k(n, k)
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    if refine_init not in ("fresh", "previous"):
        raise ValueError(f"refine_init must be 'fresh' or 'previous', got {refine_init!r}")
    if strategy not in ("closest", "random"):
        raise ValueError(f"strategy must be 'closest' or 'random', got {strategy!r}")
    shards.call("set_subset", (None,))
    centroids = lloyd(shards, initial_centroids(shards, offsets, k, init, seed, False), n_iter,
                      spherical=spherical, seed=seed)
    inertia = sum(i for _, i in shards.call("assign_all", (centroids,)))
    rng = np.random.default_rng(seed)
    for step in range(refine_steps if points_per_cluster > 1 else 0):
        keys = None if strategy == "closest" else rng.random(n)  # the draw resample_per_cluster makes
        per_shard = [(None if keys is None else keys[offsets[i]:offsets[i + 1]],) for i in range(len(sizes))]
        picked = merge_top_per_cluster(shards.call("top_per_cluster", (k, points_per_cluster), per_shard),
                                       offsets, k, points_per_cluster)
        if picked.size < k:  # empty clusters left fewer than k points: top up at random
            rest = np.setdiff1d(np.arange(n), picked)
            picked = np.sort(np.concatenate([picked, rng.choice(rest, k - picked.size, replace=False)]))
        local = _split(picked, offsets)
        shards.call("set_subset", (), [(loc,) for loc in local])
        sub_offsets = np.concatenate([[0], np.cumsum([loc.size for loc in local])])
        start = centroids if refine_init == "previous" else initial_centroids(
            shards, sub_offsets, k, init, seed + step + 1, True)
        centroids = lloyd(shards, start, n_iter, spherical=spherical, seed=seed + step + 1, subset=True)
        inertia = sum(i for _, i in shards.call("assign_all", (centroids,)))
    shards.call("set_subset", (None,))
    parts = shards.call("result")
    labels = np.concatenate([lab for lab, _ in parts])
    sqdist = np.concatenate([d for _, d in parts])
    return KMeansResult(centroids, labels, sqdist, float(inertia))
