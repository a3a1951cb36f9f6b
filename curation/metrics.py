"""Curation metrics: how balanced and how complete a selection is.

Normalized entropy ``H(p) / log K`` of a label distribution over K possible labels is 1 for a
uniform distribution and falls as the head dominates (or labels go missing); coverage is the
fraction of the K labels that occur at all. Both are what Vo et al. and AMoE mean by "flatter,
broader concept coverage".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from curation.keys import row_keys
from curation.topk import SmallestPerGroup

if TYPE_CHECKING:
    from curation.hierarchy import Hierarchy


def _counts(labels: np.ndarray, num_labels: int | None) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    k = int(num_labels) if num_labels is not None else (int(labels.max()) + 1 if labels.size else 0)
    if labels.size and labels.max() >= k:
        raise ValueError(f"label {labels.max()} is outside num_labels={k}")
    return np.bincount(labels, minlength=k)


def normalized_entropy(labels: np.ndarray, num_labels: int | None = None) -> float:
    """``H(p) / log K`` with p the empirical label distribution and K = ``num_labels``
    (default max label + 1). Missing labels count against it. K <= 1 gives 1.0 (trivially flat)."""
    c = _counts(labels, num_labels).astype(np.float64)
    if c.size <= 1:
        return 1.0
    if c.sum() == 0:
        return 0.0
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum() / np.log(c.size))


def coverage(labels: np.ndarray, num_labels: int | None = None, min_count: int = 1) -> float:
    """Fraction of the K labels that occur at least ``min_count`` times."""
    c = _counts(labels, num_labels)
    return float((c >= min_count).mean()) if c.size else 0.0


def size_summary(sizes: np.ndarray) -> dict[str, float]:
    """Cluster-size distribution in a few numbers (head/tail ratio = max / median non-empty)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    nz = sizes[sizes > 0]
    med = float(np.median(nz)) if nz.size else 0.0
    return {"k": int(sizes.size), "empty": int((sizes == 0).sum()), "min": int(sizes.min()),
            "median": med, "mean": float(sizes.mean()), "max": int(sizes.max()),
            "max_over_median": float(sizes.max() / med) if med else float("inf")}


def cluster_sizes_per_level(h: Hierarchy) -> list[np.ndarray]:
    """Points under each cluster, per level (index l-1 = level l)."""
    return h.sizes_per_level()


def inertia_per_level(h: Hierarchy) -> list[float]:
    return [float(v) for v in h.inertia]


def random_subset(n: int, size: int, seed: int = 0) -> np.ndarray:
    """The baseline "random subset of equal size": the ``size`` rows of ``range(n)`` with the smallest
    :func:`curation.keys.row_keys` (stream 3), sorted. A uniform subset without replacement that the
    block-by-block version (:func:`_random_labels`) reproduces exactly."""
    keys = row_keys(np.arange(int(n)), seed, stream=3)
    return np.sort(np.argsort(keys, kind="stable")[: int(size)])


def _compare(pool_counts: np.ndarray, curated: np.ndarray, random: np.ndarray, k: int) -> dict[str, float]:
    """Entropy/coverage of the pool (as label counts), the curated labels and the random subset's labels."""
    pool = pool_counts.astype(np.float64)
    p = pool[pool > 0] / pool.sum() if pool.sum() else np.zeros(0)
    entropy_pool = 1.0 if k <= 1 else (float(-(p * np.log(p)).sum() / np.log(k)) if p.size else 0.0)
    return {
        "n_selected": int(curated.size), "num_labels": int(k),
        "entropy_pool": entropy_pool,
        "entropy_curated": normalized_entropy(curated, k),
        "entropy_random": normalized_entropy(random, k),
        "coverage_curated": coverage(curated, k),
        "coverage_random": coverage(random, k),
    }


def compare_to_random(labels: np.ndarray, selected: np.ndarray, seed: int = 0,
                      num_labels: int | None = None) -> dict[str, float]:
    """Normalized entropy and coverage of the curated subset vs a uniform random subset of the
    same size (:func:`random_subset`) and of the whole pool, over the same K labels."""
    labels = np.asarray(labels, dtype=np.int64)
    selected = np.asarray(selected, dtype=np.int64)
    k = int(num_labels) if num_labels is not None else int(labels.max()) + 1
    rand = random_subset(labels.size, selected.size, seed)
    return _compare(_counts(labels, k), labels[selected], labels[rand], k)


def _labels_of(h: Hierarchy, selected: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the tree's labels in blocks: the level-1 labels of ``selected`` (sorted rows) and of a
    random subset of as many points (the points with the smallest row keys, stream 3)."""
    selected = np.asarray(selected, np.int64)
    sel_labels = np.full(selected.size, -1, np.int64)
    rand = SmallestPerGroup(np.array([selected.size]))
    for rows, labels, _ in h.blocks():
        if rows.size == 0:
            continue
        lo, hi = np.searchsorted(selected, [rows[0], rows[-1] + 1])
        pos = np.searchsorted(rows, selected[lo:hi])
        if not np.array_equal(rows[np.minimum(pos, rows.size - 1)], selected[lo:hi]):
            raise ValueError("a selected row is not a point of the tree (unlabelled or out of range)")
        sel_labels[lo:hi] = labels[pos]
        rand.offer(rows, np.zeros(rows.size, np.int64), row_keys(rows, seed, stream=3), labels)
    if (sel_labels < 0).any():
        raise ValueError("a selected row is not a point of the tree (unlabelled or out of range)")
    return sel_labels, rand.result()[1]


def curation_metrics(h: Hierarchy, selected: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Per level: K, size summary, inertia, and entropy/coverage of the pool, the selection and a
    random subset of equal size over that level's clusters (the only "concepts" we know here).

    Reads the tree's labels in one pass of blocks: a zarr-backed pool is never loaded."""
    sel_l1, rand_l1 = _labels_of(h, selected, seed)
    sizes = h.sizes_per_level()
    per_level = []
    for lvl, level_sizes in enumerate(sizes, start=1):
        up = h.cluster_map(lvl)
        cmp = _compare(level_sizes, up[sel_l1], up[rand_l1], h.levels[lvl - 1])
        per_level.append({"level": lvl, "sizes": size_summary(level_sizes),
                          "inertia": float(h.inertia[lvl - 1]), **cmp})
    return {"n_points": int(sizes[0].sum()), "n_selected": int(np.asarray(selected).size),
            "levels": h.levels, "per_level": per_level}
