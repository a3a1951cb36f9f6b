"""One Lloyd iteration split into a per-shard map and a reduce, so that it can run on many workers.

Lloyd's algorithm (Lloyd 1982): assign every point to its nearest centroid, then move each centroid to
the mean of its points. The mean is a ratio of sums, so a shard of the points contributes only its
per-centroid sums and counts (:func:`partial_stats`); adding those over shards (:func:`reduce_stats`)
and dividing (:func:`update_centroids`) gives the same step as one process holding every point. Sums
are float64 so that the split into shards changes them only by rounding (~1e-16 relative).

Empty clusters follow faiss' ``Clustering`` rule (``split_clusters``): the empty centroid becomes a copy
of a cluster chosen with probability proportional to (size - 1), and the two are pushed apart by a
symmetric relative perturbation of 1/1024 per coordinate. faiss draws the cluster with its own
generator; here a numpy generator draws it (same distribution, not the same draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curation.kmeans import DEFAULT_CHUNK_ROWS, assign

SPLIT_EPS = 1.0 / 1024.0  # faiss Clustering.cpp EPS
_SUM_ROWS = 8192  # rows cast to float64 at once when summing (bounds the temporary)


@dataclass
class PartialStats:
    """Per-centroid float64 sums [K, d], point counts [K] and the shard's inertia (sum of sqdist)."""

    sums: np.ndarray
    counts: np.ndarray
    inertia: float


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums and counts of the rows of ``x`` (sorted segments + ``reduceat``,
    ``_SUM_ROWS`` rows at a time: no [N, K] one-hot, no full float64 copy)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for s in range(0, x.shape[0], _SUM_ROWS):
        lab = labels[s:s + _SUM_ROWS]
        order = np.argsort(lab, kind="stable")
        ids, starts = np.unique(lab[order], return_index=True)
        sums[ids] += np.add.reduceat(x[s:s + _SUM_ROWS][order].astype(np.float64), starts, axis=0)
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


def partial_stats(x: np.ndarray, centroids: np.ndarray, *, spherical: bool = False,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, gpu: bool | None = None
                  ) -> tuple[PartialStats, np.ndarray, np.ndarray]:
    """The map step on one shard: faiss assignment (:func:`curation.kmeans.assign`, float32 search),
    then float64 per-centroid sums. ``x`` must be prepared (float32; unit rows when spherical).
    Returns the stats plus the shard's labels and squared distances."""
    k = int(centroids.shape[0])
    if x.shape[0] == 0:
        return PartialStats(np.zeros((k, centroids.shape[1])), np.zeros(k, np.int64), 0.0), \
            np.zeros(0, np.int64), np.zeros(0, np.float32)
    labels, sqdist = assign(x, centroids, spherical=spherical, chunk_rows=chunk_rows, gpu=gpu)
    sums, counts = cluster_sums(x, labels, k)
    return PartialStats(sums, counts, float(sqdist.astype(np.float64).sum())), labels, sqdist


def reduce_stats(parts: Sequence[PartialStats]) -> PartialStats:
    """Sum of the shards' stats, added in the order given (fixed order = reproducible rounding)."""
    if not parts:
        raise ValueError("no partial statistics to reduce")
    sums = parts[0].sums.copy()
    counts = parts[0].counts.copy()
    inertia = parts[0].inertia
    for p in parts[1:]:
        sums += p.sums
        counts += p.counts
        inertia += p.inertia
    return PartialStats(sums, counts, inertia)


def update_centroids(stats: PartialStats, *, spherical: bool, rng: np.random.Generator
                     ) -> tuple[np.ndarray, int]:
    """The reduce step: new centroids = sums / counts (float32 [K, d]) and the number of empty clusters
    that were split (faiss' rule, module docstring); spherical centroids are renormalised after the
    split, as faiss does."""
    counts = stats.counts.astype(np.float64)
    k = counts.size
    if counts.sum() < k:
        raise ValueError(f"cannot update {k} centroids from {int(counts.sum())} points (K > number of points)")
    c = stats.sums / np.maximum(counts, 1.0)[:, None]
    empty = np.flatnonzero(counts == 0)
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0) * SPLIT_EPS
    for ci in empty:  # sequential: a split cluster's halved count weighs the next draw, as in faiss
        weight = np.maximum(counts - 1.0, 0.0)
        if weight.sum() <= 0:  # every cluster has <= 1 point: nothing left to split
            break
        cj = int(rng.choice(k, p=weight / weight.sum()))
        c[ci] = c[cj] * (1.0 + sign)
        c[cj] = c[cj] * (1.0 - sign)
        counts[ci] = counts[cj] / 2.0  # faiss assumes an even split
        counts[cj] -= counts[ci]
    if spherical:
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(c, dtype=np.float32), int(empty.size)
