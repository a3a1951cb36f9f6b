"""Curation metrics: how balanced and how complete a selection is.

Normalized entropy ``H(p) / log K`` of a label distribution over K possible labels is 1 for a
uniform distribution and falls as the head dominates (or labels go missing); coverage is the
fraction of the K labels that occur at all. Both are what Vo et al. and AMoE mean by "flatter,
broader concept coverage".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

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
    return [h.cluster_sizes(lvl) for lvl in range(1, h.n_levels + 1)]


def inertia_per_level(h: Hierarchy) -> list[float]:
    return [float(v) for v in h.inertia]


def compare_to_random(labels: np.ndarray, selected: np.ndarray, seed: int = 0,
                      num_labels: int | None = None) -> dict[str, float]:
    """Normalized entropy and coverage of the curated subset vs a uniform random subset of the
    same size (and of the whole pool), over the same K labels."""
    labels = np.asarray(labels, dtype=np.int64)
    selected = np.asarray(selected, dtype=np.int64)
    k = int(num_labels) if num_labels is not None else int(labels.max()) + 1
    rand = np.random.default_rng([seed, 3]).choice(labels.size, size=selected.size, replace=False)
    return {
        "n_selected": int(selected.size), "num_labels": k,
        "entropy_pool": normalized_entropy(labels, k),
        "entropy_curated": normalized_entropy(labels[selected], k),
        "entropy_random": normalized_entropy(labels[rand], k),
        "coverage_curated": coverage(labels[selected], k),
        "coverage_random": coverage(labels[rand], k),
    }


def curation_metrics(h: Hierarchy, selected: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Per level: K, size summary, inertia, and entropy/coverage of the pool, the selection and a
    random subset of equal size over that level's clusters (the only "concepts" we know here)."""
    per_level = []
    for lvl, sizes in enumerate(cluster_sizes_per_level(h), start=1):
        labels = h.point_clusters(lvl)
        cmp = compare_to_random(labels, selected, seed=seed, num_labels=h.levels[lvl - 1])
        per_level.append({"level": lvl, "sizes": size_summary(sizes),
                          "inertia": float(h.inertia[lvl - 1]), **cmp})
    return {"n_points": h.n_points, "n_selected": int(np.asarray(selected).size),
            "levels": h.levels, "per_level": per_level}
