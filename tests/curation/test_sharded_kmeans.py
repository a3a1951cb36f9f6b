"""Lloyd as map (per-shard sums) + reduce: vs a naive float64 loop, vs faiss' fit, over any shard split.

Tolerances (float32 centroids): the sharded fit equals a textbook float64 Lloyd loop to 2e-6 of the data's
scale with identical labels; it equals faiss' single-process fit from the same init to 1e-5 on unit-scale
data (faiss sums in float32) with identical labels; other splits into shards change the float64 sums only by
rounding, so centroids agree to 1e-6 and labels are equal (bit-identical here).
"""

from __future__ import annotations

import numpy as np
import pytest

from curation.kmeans import kmeans_with_resampling, rank_within_clusters, resample_per_cluster
from curation.lloyd import PartialStats, partial_stats, reduce_stats, update_centroids
from curation.sharded_kmeans import (LocalShards, lloyd, merge_top_per_cluster, shard_bounds,
                                     sharded_kmeans_with_resampling)


def blobs(sizes, dim=8, sep=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim)) * sep
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return (centers[labels] + rng.normal(size=(labels.size, dim))).astype(np.float32), labels


def naive_lloyd_float64(x: np.ndarray, init: np.ndarray, n_iter: int):
    """Textbook Lloyd (Lloyd 1982) in float64: argmin of squared distances, then cluster means."""
    x, c = x.astype(np.float64), init.astype(np.float64).copy()
    for _ in range(n_iter):
        lab = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[lab == j].mean(0) for j in range(len(c))])  # the data leaves no cluster empty
    return c, ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


def sizes_of(n, shards):
    return np.diff(shard_bounds(n, shards))


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_lloyd_equals_a_naive_float64_loop(shards):
    x, _ = blobs([90, 70, 50, 40, 30, 20])
    rng = np.random.default_rng(1)
    init = x[rng.choice(x.shape[0], 6, replace=False)]  # random points: several start in one blob
    ref_c, ref_lab = naive_lloyd_float64(x, init, 15)
    points = LocalShards(x, shards)
    c = lloyd(points, init, 15, spherical=False, seed=0)
    np.testing.assert_allclose(c, ref_c, atol=2e-6 * np.abs(x).max())
    points.call("assign_all", (c,))
    labels = np.concatenate([lab for lab, _ in points.call("result")])
    np.testing.assert_array_equal(labels, ref_lab)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_sharded_fit_with_resampling_equals_faiss_single_process(spherical, strategy):
    """The same Alg. 1 (Vo et al. 2024) as curation.kmeans' faiss path: k-means++ init (same seeds),
    Lloyd, 3 resampling steps with fresh k-means; centroids to 1e-5, labels equal, inertia to 1e-6."""
    x = np.random.default_rng(0).normal(size=(1500, 16)).astype(np.float32)
    kw = dict(refine_steps=3, points_per_cluster=15, strategy=strategy, n_iter=10, spherical=spherical, seed=2)
    ref = kmeans_with_resampling(x, 30, **kw)
    for shards in (1, 4):
        got = sharded_kmeans_with_resampling(LocalShards(x, shards, spherical=spherical), sizes_of(1500, shards),
                                             30, **kw)
        np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-5)
        np.testing.assert_array_equal(got.labels, ref.labels)
        np.testing.assert_allclose(got.inertia, ref.inertia, rtol=1e-6)


def test_the_split_into_shards_changes_only_rounding():
    x = np.random.default_rng(3).normal(size=(1000, 12)).astype(np.float32)
    kw = dict(refine_steps=2, points_per_cluster=12, n_iter=8, init="random", seed=5, refine_init="previous")
    one = sharded_kmeans_with_resampling(LocalShards(x, 1), [1000], 25, **kw)
    for shards in (2, 7):
        many = sharded_kmeans_with_resampling(LocalShards(x, shards), sizes_of(1000, shards), 25, **kw)
        np.testing.assert_allclose(many.centroids, one.centroids, atol=1e-6)
        np.testing.assert_array_equal(many.labels, one.labels)


def test_per_shard_top_r_merges_into_the_global_resample():
    """Each shard's top r per cluster, merged, is exactly resample_per_cluster over all points, ties
    (equal keys, here many) broken by row as there."""
    rng = np.random.default_rng(0)
    n, k, r = 500, 9, 6
    labels = rng.integers(0, k, n)
    key = rng.integers(0, 20, n).astype(np.float32)  # many ties
    offsets = shard_bounds(n, 4)
    cands = []
    for i in range(4):
        lab, kk = labels[offsets[i]:offsets[i + 1]], key[offsets[i]:offsets[i + 1]].astype(np.float64)
        order, rank = rank_within_clusters(lab, kk, k)
        keep = np.sort(order[rank < r])
        cands.append((keep, lab[keep], kk[keep]))
    got = merge_top_per_cluster(cands, offsets, k, r)
    want = resample_per_cluster(labels, key, k, r, "closest", rng)
    np.testing.assert_array_equal(got, want)


def test_an_empty_cluster_is_split_from_a_big_one():
    sums = np.array([[10.0, 20.0], [0.0, 0.0], [3.0, 3.0]])
    stats = PartialStats(sums, np.array([10, 0, 1]), 0.0)
    c, n_split = update_centroids(stats, spherical=False, rng=np.random.default_rng(0))
    assert n_split == 1
    # only cluster 0 has more than one point: the empty one becomes its copy, the two pushed apart by 1/1024
    np.testing.assert_allclose(c[1], [1.0 * (1 + 1 / 1024), 2.0 * (1 - 1 / 1024)], rtol=1e-6)
    np.testing.assert_allclose(c[0], [1.0 * (1 - 1 / 1024), 2.0 * (1 + 1 / 1024)], rtol=1e-6)
    np.testing.assert_allclose(c[2], [3.0, 3.0])
    # end to end: two identical initial centroids (one gets every tie, the other none) end up apart
    x, _ = blobs([60, 60], dim=4)
    init = np.stack([x[0], x[0], x[100]])
    c = lloyd(LocalShards(x, 2), init, 10, spherical=False, seed=0)
    stats = reduce_stats(LocalShards(x, 2).call("step", (c, False)))
    assert (stats.counts > 0).all() and np.unique(c, axis=0).shape[0] == 3


def test_partial_stats_are_sums_and_counts():
    x, _ = blobs([20, 30], dim=3)
    c = np.stack([x[0], x[40]])
    stats, labels, sqdist = partial_stats(x, c)
    for j in range(2):
        np.testing.assert_allclose(stats.sums[j], x[labels == j].astype(np.float64).sum(0), rtol=1e-12)
    np.testing.assert_array_equal(stats.counts, np.bincount(labels, minlength=2))
    np.testing.assert_allclose(stats.inertia, sqdist.astype(np.float64).sum())


def test_bad_input_is_refused():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="K > number of points"):
        sharded_kmeans_with_resampling(LocalShards(x, 1), [5], 6, init="random")
    with pytest.raises(ValueError, match="at least one shard"):
        shard_bounds(5, 0)
    with pytest.raises(ValueError, match="more workers than fit rows"):
        shard_bounds(5, 6)
    with pytest.raises(ValueError, match="init must be"):
        sharded_kmeans_with_resampling(LocalShards(x, 1), [5], 2, init="farthest")
