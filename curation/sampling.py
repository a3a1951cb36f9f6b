"""Hierarchical balanced sampling (Vo et al. 2024, Sec. 4.2; AMoE supp. §12 step (iv)).

Top-down: the target is split among the top-level clusters with a common cap x, so that small
clusters are taken whole and large ones are cut to x (``sum_i min(x, n_i) = target``); each
cluster's share is then split the same way among its children, down to level 1, where the points
themselves are picked at random or closest-to-centroid. Every concept node thus gets the same
budget unless it is too small, which is what flattens a long-tailed pool.

Only the allocation needs the whole pool, and only as cluster sizes ([K_1] counts); the points are
then picked in one pass over the labels, a block at a time, keeping per cluster the ``count`` best
candidates seen so far (:func:`select_points`, :mod:`curation.topk`). A point's random key is a hash of its row and the
seed (:func:`row_keys`), not a draw from a stream, so the pick does not depend on how the rows are
split into blocks: memory is O(K_1 + target + one block), never O(pool).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

from curation.hierarchy import Hierarchy, Level1Fit, PoolAssign, fit_hierarchy
from curation.keys import row_keys
from curation.topk import SmallestPerGroup
from curation.kmeans import DEFAULT_CHUNK_ROWS, DEFAULT_ITERATIONS, Init, RefineInit, Strategy, rank_within_clusters
from curation.metrics import curation_metrics

Selection = Literal["random", "closest"]


def allocate_grouped(sizes: np.ndarray, groups: np.ndarray, targets: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Split ``targets[g]`` among the members of every group g with a per-group cap.

    For a group with member sizes n_1 <= ... <= n_m and target a (clipped to sum n), the cap is
    the largest integer x with ``sum_j min(x, n_j) <= a``. With P_k the sum of the k smallest,
    ``g(k) = P_k + (m - k) n_k`` is non-decreasing in k, so k* = #{k : g(k) <= a} clusters are
    taken whole and ``x = floor((a - P_k*) / (m - k*))`` (>= n_k*, < n_{k*+1}). The remainder
    ``a - sum min(x, n_j)`` (< m - k*) gets +1 on that many random members still above x.
    Result: ``alloc_j == n_j`` or ``alloc_j in {x, x + 1}``, and ``sum alloc == a`` exactly.
    Vectorised over all groups at once (one sort), so a level with millions of clusters is cheap.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if sizes.shape != groups.shape:
        raise ValueError("sizes and groups must have the same shape")
    if sizes.size and sizes.min() < 0:
        raise ValueError("cluster sizes must be >= 0")
    if targets.size and targets.min() < 0:
        raise ValueError("targets must be >= 0")
    n_groups = targets.size
    if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"group ids must lie in [0, {n_groups})")
    m = np.bincount(groups, minlength=n_groups)
    totals = np.bincount(groups, weights=sizes, minlength=n_groups).astype(np.int64)
    a = np.minimum(targets, totals)

    order = np.lexsort((sizes, groups))
    s, g = sizes[order], groups[order]
    starts = np.concatenate([[0], np.cumsum(m)[:-1]])
    k = np.arange(s.size) - starts[g] + 1  # 1-based rank inside the group
    csum = np.cumsum(s)
    prefix = csum - (csum[starts[g]] - s[starts[g]])  # P_k
    ok = prefix + (m[g] - k) * s <= a[g]
    k_star = np.bincount(g, weights=ok, minlength=n_groups).astype(np.int64)  # ok is a prefix
    p_star = np.bincount(g, weights=s * ok, minlength=n_groups).astype(np.int64)  # P_k*
    rest = m - k_star
    cap = np.where(rest > 0, (a - p_star) // np.maximum(rest, 1), np.iinfo(np.int64).max)
    remainder = np.where(rest > 0, a - p_star - rest * cap, 0)

    alloc_sorted = np.minimum(s, cap[g])
    above = np.flatnonzero(s > cap[g])  # members that still have room
    if above.size:
        key = rng.random(above.size)
        sub_order, sub_rank = rank_within_clusters(g[above], key, n_groups)
        lucky = above[sub_order[sub_rank < remainder[g[above[sub_order]]]]]
        alloc_sorted[lucky] += 1
    alloc = np.empty_like(alloc_sorted)
    alloc[order] = alloc_sorted
    return alloc


def allocate(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Single-group :func:`allocate_grouped` (the top level of the tree)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return allocate_grouped(sizes, np.zeros(sizes.size, np.int64), np.array([target]), rng)


def hierarchical_allocation(h: Hierarchy, target: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Number of points to draw from every cluster of every level (index l-1 = level l)."""
    sizes = h.sizes_per_level()
    alloc = [allocate(sizes[-1], target, rng)]
    for lvl in range(h.n_levels - 1, 0, -1):  # level lvl+1 -> level lvl (1-based)
        alloc.insert(0, allocate_grouped(sizes[lvl - 1], h.parents[lvl - 1], alloc[0], rng))
    return alloc


def select_points(blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], counts: np.ndarray,
                  selection: Selection, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``counts[c]`` points of every level-1 cluster c, random or closest first, in one pass over ``blocks``
    of ``(rows, labels, sqdist)``: (sorted rows, their level-1 labels).

    ``random`` ranks a cluster's points by :func:`row_keys` (a uniform random subset of the cluster),
    ``closest`` by squared distance to the centroid; ties go to the lower row. Memory and time:
    :class:`curation.topk.SmallestPerGroup`."""
    if selection not in ("random", "closest"):
        raise ValueError(f"selection must be 'random' or 'closest', got {selection!r}")
    best = SmallestPerGroup(counts)
    for rows, labels, sqdist in blocks:
        keys = row_keys(rows, seed, stream=2) if selection == "random" else np.asarray(sqdist, np.float64)
        best.offer(rows, labels, keys, labels)
    return best.result()


def hierarchical_sample(h: Hierarchy, target: int, *, selection: Selection = "random",
                        seed: int = 0) -> np.ndarray:
    """Balanced subset of ``target`` point indices (sorted, unique); all points if target >= N."""
    return hierarchical_sample_with_labels(h, target, selection=selection, seed=seed)[0]


def hierarchical_sample_with_labels(h: Hierarchy, target: int, *, selection: Selection = "random",
                                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hierarchical_sample` and the level-1 labels of the selected points (read in the same pass)."""
    if int(target) <= 0:
        raise ValueError(f"target must be a positive number of points, got {target}")
    if selection not in ("random", "closest"):
        raise ValueError(f"selection must be 'random' or 'closest', got {selection!r}")
    rng = np.random.default_rng([seed, 2])
    counts = hierarchical_allocation(h, int(target), rng)[0]  # every point when target >= N
    return select_points(h.blocks(), counts, selection, seed)


@dataclass
class CurationResult:
    hierarchy: Hierarchy
    selected_indices: np.ndarray
    selected_labels: np.ndarray  # level-1 cluster of every selected point
    metrics: dict[str, Any] = field(default_factory=dict)


def curate_embeddings(embeddings: Any, levels: list[int], target: int, *,
                      fit_sample: int | np.ndarray | None = None,
                      refine_steps: int | list[int] | None = None,
                      points_per_cluster: int | list[int] | None = None,
                      refine_strategy: Strategy = "closest", refine_init: RefineInit = "fresh",
                      selection: Selection = "random", n_iter: int = DEFAULT_ITERATIONS, init: Init = "kmeans++",
                      spherical: bool = False, seed: int = 0,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS, gpu: bool | None = None,
                      level1_fit: Level1Fit | None = None, pool_assign: PoolAssign | None = None
                      ) -> CurationResult:
    """Embeddings [N, d] (numpy or zarr) -> hierarchy, balanced selection of ``target`` rows, metrics.

    The one call the embedding job / CLI needs: :func:`fit_hierarchy` (see it for the defaults
    of ``refine_steps`` / ``points_per_cluster``) then :func:`hierarchical_sample`; ``metrics``
    holds per-level cluster sizes, inertia and the normalized entropy of the pool vs the
    selection over each level's clusters, plus timings in seconds.
    ``level1_fit``, ``pool_assign``: see :func:`fit_hierarchy` (a distributed level-1 fit, a distributed
    pool assignment whose labels stay in zarr).
    """
    if int(target) <= 0:
        raise ValueError(f"target must be a positive number of points, got {target}")
    timings: dict[str, float] = {}
    h = fit_hierarchy(embeddings, levels, fit_sample=fit_sample, refine_steps=refine_steps,
                      points_per_cluster=points_per_cluster, refine_strategy=refine_strategy,
                      refine_init=refine_init, n_iter=n_iter, init=init, spherical=spherical,
                      seed=seed, chunk_rows=chunk_rows, gpu=gpu, timings=timings, level1_fit=level1_fit,
                      pool_assign=pool_assign)
    t0 = time.perf_counter()
    selected, labels = hierarchical_sample_with_labels(h, target, selection=selection, seed=seed)
    timings["sampling"] = time.perf_counter() - t0
    metrics = curation_metrics(h, selected, seed=seed)
    metrics["timings_s"] = timings
    return CurationResult(h, selected, labels, metrics)
