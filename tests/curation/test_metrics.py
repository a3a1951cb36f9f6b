"""Curation metrics vs independent float64 / scipy computations; PNG plots are written."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from curation.hierarchy import Hierarchy
from curation.metrics import (cluster_sizes_per_level, compare_to_random, coverage,
                              curation_metrics, inertia_per_level, normalized_entropy, size_summary)
from curation.plots import plot_cluster_sizes, plot_curation, plot_entropy, plot_inertia
from curation.sampling import CurationResult, hierarchical_sample


def toy_hierarchy(seed=0) -> Hierarchy:
    """Hand-built 3-level tree over 1000 points with long-tailed level-1 sizes."""
    rng = np.random.default_rng(seed)
    k1, k2, k3, d = 40, 8, 2, 4
    p = 1.0 / np.arange(1, k1 + 1) ** 1.5
    assignments = rng.choice(k1, size=1000, p=p / p.sum()).astype(np.int64)
    return Hierarchy(
        centroids=[rng.normal(size=(k, d)).astype(np.float32) for k in (k1, k2, k3)],
        assignments=assignments, sqdist=rng.random(1000).astype(np.float32),
        parents=[np.arange(k1) % k2, np.arange(k2) % k3], inertia=[10.0, 2.0, 0.5])


def test_normalized_entropy_against_scipy():
    rng = np.random.default_rng(0)
    for k in (2, 5, 30):
        # min of two uniforms: skewed toward small labels, not uniform
        labels = np.minimum(rng.integers(0, k, size=500), rng.integers(0, k, size=500))
        counts = np.bincount(labels, minlength=k)
        ref = scipy_entropy(counts / counts.sum()) / np.log(k)
        assert normalized_entropy(labels, k) == pytest.approx(ref, rel=1e-12)
    assert normalized_entropy(np.arange(10)) == pytest.approx(1.0)
    assert normalized_entropy(np.zeros(50, int), num_labels=7) == 0.0
    # missing labels count against it: the same counts over a larger K score lower
    assert normalized_entropy(np.arange(10), num_labels=20) == pytest.approx(np.log(10) / np.log(20))
    with pytest.raises(ValueError, match="outside"):
        normalized_entropy(np.array([0, 5]), num_labels=3)
    with pytest.raises(ValueError, match=">= 0"):
        normalized_entropy(np.array([-1, 2]))


def test_coverage_and_size_summary():
    labels = np.array([0, 0, 1, 3, 3, 3])
    assert coverage(labels, num_labels=5) == pytest.approx(3 / 5)
    assert coverage(labels, num_labels=5, min_count=2) == pytest.approx(2 / 5)
    s = size_summary(np.array([0, 1, 3, 8]))
    assert s == {"k": 4, "empty": 1, "min": 0, "median": 3.0, "mean": 3.0, "max": 8,
                 "max_over_median": pytest.approx(8 / 3)}


def test_compare_to_random_is_seeded_and_consistent():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), [500, 200, 100, 50, 20, 10, 10, 5, 3, 2])
    balanced = np.concatenate([rng.choice(np.flatnonzero(labels == c), min(2, (labels == c).sum()),
                                          replace=False) for c in range(10)])
    a = compare_to_random(labels, balanced, seed=3)
    assert a == compare_to_random(labels, balanced, seed=3)
    assert a["entropy_curated"] == pytest.approx(1.0) and a["coverage_curated"] == 1.0
    assert a["entropy_random"] < 0.8 and a["n_selected"] == 20 and a["num_labels"] == 10
    assert a["entropy_pool"] == pytest.approx(normalized_entropy(labels, 10))


def test_curation_metrics_per_level():
    h = toy_hierarchy()
    sel = hierarchical_sample(h, 200, seed=0)
    m = curation_metrics(h, sel, seed=0)
    assert m["levels"] == [40, 8, 2] and m["n_selected"] == 200 and m["n_points"] == 1000
    sizes = cluster_sizes_per_level(h)
    assert inertia_per_level(h) == [10.0, 2.0, 0.5]
    for row, s, lvl in zip(m["per_level"], sizes, (1, 2, 3)):
        assert row["level"] == lvl and row["sizes"]["k"] == len(s) and s.sum() == 1000
        # level-l sizes are the level-1 sizes summed through the parent maps (independent path)
        ref = np.bincount(h.cluster_map(lvl)[np.arange(40)],
                          weights=np.bincount(h.assignments, minlength=40), minlength=len(s))
        np.testing.assert_array_equal(s, ref)
        assert row["entropy_curated"] == pytest.approx(
            normalized_entropy(h.point_clusters(lvl)[sel], len(s)))
    assert m["per_level"][0]["entropy_curated"] > m["per_level"][0]["entropy_random"]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plots_write_png(tmp_path):
    h = toy_hierarchy()
    sel = hierarchical_sample(h, 200, seed=0)
    result = CurationResult(h, sel, h.assignments[sel], curation_metrics(h, sel))
    paths = plot_curation(result, tmp_path / "figs")
    assert [p.name for p in paths] == ["cluster_sizes.png", "inertia.png", "entropy.png"]
    assert all(_is_png(p) for p in paths)
    assert _is_png(plot_cluster_sizes(cluster_sizes_per_level(h), tmp_path / "a.png"))
    assert _is_png(plot_inertia([3.0, 1.0], tmp_path / "b.png"))
    labels = h.point_clusters(2)
    assert _is_png(plot_entropy([compare_to_random(labels, sel)], tmp_path / "c.png"))
