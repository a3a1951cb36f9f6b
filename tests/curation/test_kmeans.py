"""k-means (faiss) vs a naive Lloyd reference; resampling; hierarchy invariants; chunked/zarr input."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from curation.hierarchy import Hierarchy, fit_hierarchy
from curation.kmeans import (assign, inertia_float64, kmeans, kmeans_with_resampling,
                             resample_per_cluster, take_rows)


def blobs(sizes, dim=8, sep=20.0, seed=0):
    """Well-separated isotropic Gaussian blobs: returns (x float32 [N, d], true labels)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim)) * sep
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[labels] + rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels


def naive_lloyd(x: np.ndarray, init: np.ndarray, n_iter: int = 50):
    """Textbook Lloyd's algorithm in float64 (the reference)."""
    x = x.astype(np.float64)
    c = init.astype(np.float64).copy()
    for _ in range(n_iter):
        d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        lab = d.argmin(1)
        c = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(len(c))])
    d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return c, d.argmin(1), d.min(1).sum()


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to relabelling: the contingency table is a permutation matrix."""
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


class CountingArray:
    """Array-like that records the largest row block requested (proves bounded reads)."""

    def __init__(self, arr):
        self.arr, self.shape, self.max_rows, self.reads = arr, arr.shape, 0, 0

    def __getitem__(self, key):
        rows = key.stop - key.start if isinstance(key, slice) else len(np.atleast_1d(key))
        self.max_rows, self.reads = max(self.max_rows, rows), self.reads + 1
        return self.arr[key]


@pytest.fixture
def zarr_of(tmp_path):
    def make(x, chunk=64):
        z = zarr.create_array(store=str(tmp_path / "emb.zarr"), shape=x.shape, dtype=x.dtype,
                              chunks=(chunk, x.shape[1]), overwrite=True)
        z[:] = x
        return z
    return make


# ------------------------------------------------------------------------ plain k-means


def test_kmeans_recovers_blobs_and_matches_naive_lloyd():
    x, truth = blobs([120, 80, 60, 40, 30])
    res = kmeans(x, 5, n_iter=30, seed=0)
    assert same_partition(res.labels, truth)
    ref_c, ref_lab, ref_inertia = naive_lloyd(x, init=x[np.searchsorted(truth, np.arange(5))])
    assert same_partition(res.labels, ref_lab)
    # match centroids by the partition, then compare
    perm = [int(np.bincount(ref_lab[res.labels == j]).argmax()) for j in range(5)]
    np.testing.assert_allclose(res.centroids, ref_c[perm], atol=1e-4)
    np.testing.assert_allclose(res.inertia, ref_inertia, rtol=1e-5)
    np.testing.assert_allclose(res.inertia, inertia_float64(x, res.centroids, res.labels), rtol=1e-5)
    d64 = ((x.astype(np.float64) - res.centroids[res.labels].astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(res.sqdist, d64, rtol=1e-4, atol=1e-3)


def test_kmeans_seeded_and_spherical():
    x, truth = blobs([50, 50, 50], dim=6, seed=1)
    a, b = kmeans(x, 3, seed=7), kmeans(x, 3, seed=7)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    s = kmeans(x, 3, spherical=True, seed=0)
    np.testing.assert_allclose(np.linalg.norm(s.centroids, axis=1), 1.0, atol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(s.labels, (xn @ s.centroids.T).argmax(1))  # max cosine
    np.testing.assert_allclose(s.inertia, inertia_float64(x, s.centroids, s.labels, spherical=True),
                               rtol=1e-5)


def test_assign_chunked_zarr_float16_and_skip(zarr_of):
    x, _ = blobs([70, 50, 40], seed=2)
    c = kmeans(x, 3).centroids
    lab, d = assign(x, c, chunk_rows=10_000)
    ref = ((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(lab, ref.argmin(1))
    for chunk in (1, 7, 64):
        lab2, d2 = assign(x, c, chunk_rows=chunk)
        np.testing.assert_array_equal(lab2, lab)
        np.testing.assert_array_equal(d2, d)
    counted = CountingArray(zarr_of(x, chunk=16))
    lab3, _ = assign(counted, c, chunk_rows=13)
    np.testing.assert_array_equal(lab3, lab)
    assert counted.max_rows <= 13
    lab16, _ = assign(x.astype(np.float16), c, chunk_rows=50)
    np.testing.assert_array_equal(lab16, lab)
    skip = np.array([0, 5, 100, 159])
    lab4, d4 = assign(x, c, chunk_rows=7, skip_rows=skip)
    assert (lab4[skip] == -1).all() and (d4[skip] == 0).all()
    keep = np.setdiff1d(np.arange(len(x)), skip)
    np.testing.assert_array_equal(lab4[keep], lab[keep])


def test_take_rows_blockwise_matches_fancy_indexing(zarr_of):
    x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    idx = np.array([199, 3, 3, 64, 0, 127, 128])
    counted = CountingArray(zarr_of(x))
    np.testing.assert_array_equal(take_rows(counted, idx, chunk_rows=32), x[idx])
    assert counted.max_rows <= 32


def test_kmeans_bad_input():
    x, _ = blobs([5, 5])
    with pytest.raises(ValueError, match="K > number of points"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="positive"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="2-D"):
        assign(x[0], x[:2])
    with pytest.raises(ValueError, match="strategy"):
        kmeans_with_resampling(x, 2, refine_steps=1, strategy="nearest")


# ------------------------------------------------------------------------ resampling


def test_resample_per_cluster_against_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=300)
    sqdist = rng.random(300).astype(np.float32)
    got = resample_per_cluster(labels, sqdist, 6, 7, "closest", rng)
    ref = np.sort(np.concatenate([np.flatnonzero(labels == j)[np.argsort(sqdist[labels == j])][:7]
                                  for j in range(6)]))
    np.testing.assert_array_equal(got, ref)
    rnd = resample_per_cluster(labels, sqdist, 6, 7, "random", rng)
    assert len(np.unique(rnd)) == len(rnd)
    np.testing.assert_array_equal(np.bincount(labels[rnd], minlength=6),
                                  np.minimum(np.bincount(labels, minlength=6), 7))


@pytest.mark.parametrize("refine_init", ["fresh", "previous"])
@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_resampling_refinement_keeps_blobs_and_is_seeded(strategy, refine_init):
    x, truth = blobs([400, 60, 30, 20, 10], seed=3)  # long-tailed blob sizes
    kw = dict(refine_steps=3, points_per_cluster=8, strategy=strategy, refine_init=refine_init,
              seed=5)
    a = kmeans_with_resampling(x, 5, **kw)
    b = kmeans_with_resampling(x, 5, **kw)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert same_partition(a.labels, truth)
    lab, d = assign(x, a.centroids)
    np.testing.assert_array_equal(a.labels, lab)
    np.testing.assert_allclose(a.inertia, inertia_float64(x, a.centroids, a.labels), rtol=1e-5)


def test_resampling_moves_centroids_toward_uniform_support():
    """Vo et al.'s toy example: 90% of the mass on [0, 1], 10% on [1, 10]. A uniform cover of the
    support puts 18 of 20 centroids on [1, 10]; plain k-means follows density (about 14);
    resampling steps push it toward the uniform cover."""
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.uniform(0, 1, 9000), rng.uniform(1, 10, 1000)])
    x = np.stack([t, np.zeros_like(t)], 1).astype(np.float32)
    plain = (kmeans(x, 20, seed=0).centroids[:, 0] > 1).sum()
    refined = kmeans_with_resampling(x, 20, refine_steps=10, points_per_cluster=20, seed=0)
    assert (refined.centroids[:, 0] > 1).sum() >= max(plain + 2, 16)


# ------------------------------------------------------------------------ hierarchy


def check_invariants(h: Hierarchy, n: int):
    for lvl in range(1, h.n_levels + 1):
        pc = h.point_clusters(lvl)
        assert pc.shape == (n,) and pc.dtype == np.int64
        assert pc.min() >= 0 and pc.max() < h.levels[lvl - 1]
        assert h.cluster_sizes(lvl).sum() == n
        if lvl < h.n_levels:
            np.testing.assert_array_equal(h.point_clusters(lvl + 1), h.parents[lvl - 1][pc])
    for lvl, p in enumerate(h.parents, start=1):  # parent = nearest upper centroid
        lower, upper = h.centroids[lvl - 1], h.centroids[lvl]
        d = ((lower[:, None].astype(np.float64) - upper[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(p, d.argmin(1))
        np.testing.assert_allclose(h.inertia[lvl], d.min(1).sum(), rtol=1e-4)


def test_hierarchy_invariants_chunked_subsample_and_zarr(zarr_of, tmp_path):
    x, _ = blobs([300, 200, 150, 100, 80, 60, 40, 30, 20, 20], dim=6, seed=4)
    n = len(x)
    kw = dict(levels=[40, 10, 3], fit_sample=400, refine_steps=[1, 2, 2],
              points_per_cluster=[5, 3, 2], seed=11)
    h_big = fit_hierarchy(x, chunk_rows=100_000, **kw)
    check_invariants(h_big, n)
    h_tiny = fit_hierarchy(x, chunk_rows=7, **kw)
    counted = CountingArray(zarr_of(x, chunk=32))
    h_zarr = fit_hierarchy(counted, chunk_rows=50, **kw)
    assert counted.max_rows <= 50
    for h in (h_tiny, h_zarr):
        np.testing.assert_array_equal(h.assignments, h_big.assignments)
        np.testing.assert_array_equal(h.sqdist, h_big.sqdist)
        for a, b in zip(h.centroids, h_big.centroids):
            np.testing.assert_array_equal(a, b)
    # every point is at its nearest level-1 centroid (fit rows and assigned rows alike)
    d = ((x[:, None].astype(np.float64) - h_big.centroids[0][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(h_big.assignments, d.argmin(1))
    np.testing.assert_allclose(h_big.inertia[0], d.min(1).sum(), rtol=1e-4)

    h_big.save(tmp_path / "tree.npz")
    back = Hierarchy.load(tmp_path / "tree.npz")
    assert back.levels == [40, 10, 3] and back.inertia == h_big.inertia
    np.testing.assert_array_equal(back.point_clusters(3), h_big.point_clusters(3))


def test_hierarchy_spherical_and_float16(zarr_of):
    x, _ = blobs([100, 60, 40], dim=5, seed=6)
    h = fit_hierarchy(zarr_of(x.astype(np.float16)), [12, 3], fit_sample=150, spherical=True,
                      chunk_rows=16)
    check_invariants(h, len(x))
    np.testing.assert_allclose(np.linalg.norm(h.centroids[0], axis=1), 1.0, atol=1e-5)


def test_hierarchy_bad_input():
    x, _ = blobs([20, 20])
    with pytest.raises(ValueError, match="strictly decreasing"):
        fit_hierarchy(x, [5, 5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        fit_hierarchy(x, [5, 10])
    with pytest.raises(ValueError, match="larger than the number of points"):
        fit_hierarchy(x, [41, 2])
    with pytest.raises(ValueError, match="larger than the number of points"):
        fit_hierarchy(x, [20, 2], fit_sample=10)
    with pytest.raises(ValueError, match="at least one level"):
        fit_hierarchy(x, [])
    with pytest.raises(ValueError, match="one value per level"):
        fit_hierarchy(x, [4, 2], refine_steps=[1, 1, 1])
