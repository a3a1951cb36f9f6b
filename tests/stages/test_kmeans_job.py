"""The level-1 fit as a Ray job (real actors on the tests' Ray cluster) vs the same fit in one process.

Tolerance: with the same split into shards the actors run the very arithmetic of ``LocalShards``, so
centroids and labels are bit-identical; against one shard in one process (another summation order of the
float64 sums) centroids agree to 1e-6 on unit-scale data and labels are equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from curation.hierarchy import fit_hierarchy
from curation.sharded_kmeans import LocalShards, shard_bounds, sharded_kmeans_with_resampling
from stages.kmeans_job import DistributedLevel1Fit

FIT = dict(refine_steps=2, points_per_cluster=8, n_iter=8, seed=3, refine_init="fresh")


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """1,200 x 16 float16 rows in zarr (curate's embedding dtype), chunked by 128 rows."""
    x = np.random.default_rng(0).normal(size=(1200, 16)).astype(np.float16)
    path = tmp_path_factory.mktemp("kmeans_job") / "emb.zarr"
    z = zarr.create_array(store=str(path), shape=x.shape, dtype=x.dtype, chunks=(128, 16))
    z[:] = x
    return str(path), x


@pytest.mark.parametrize("workers, strategy, init, spherical", [
    (2, "closest", "random", True),
    (3, "random", "kmeans++", False),
])
def test_distributed_fit_equals_the_single_process_fit(embeddings, ray_local, workers, strategy, init, spherical):
    path, x = embeddings
    rows = np.sort(np.random.default_rng(1).choice(x.shape[0], 900, replace=False))
    kw = dict(FIT, strategy=strategy, init=init, spherical=spherical)
    job = DistributedLevel1Fit(path, workers)
    got = job(rows, 24, chunk_rows=100, gpu=None, **kw)
    same_split = sharded_kmeans_with_resampling(LocalShards(x[rows], workers, spherical=spherical, chunk_rows=100),
                                                np.diff(shard_bounds(900, workers)), 24, **kw)
    np.testing.assert_array_equal(got.centroids, same_split.centroids)
    np.testing.assert_array_equal(got.labels, same_split.labels)
    assert got.inertia == same_split.inertia
    one = sharded_kmeans_with_resampling(LocalShards(x[rows], 1, spherical=spherical), [900], 24, **kw)
    np.testing.assert_allclose(got.centroids, one.centroids, atol=1e-6)
    np.testing.assert_array_equal(got.labels, one.labels)
    assert job.report["shard_rows"] == np.diff(shard_bounds(900, workers)).tolist()
    assert len(job.report["worker_peak_rss_mb"]) == workers and min(job.report["worker_peak_rss_mb"]) > 0


def test_fit_hierarchy_with_the_job_maps_rows_and_matches_in_process(embeddings, ray_local):
    """Through the hook: the hierarchy sees rows 0..n-1 of a subset (as curate's decodable rows), the
    actors read the mapped rows of the array; level 1 equals the in-process faiss fit (same k-means++ init)."""
    path, x = embeddings
    ok_rows = np.flatnonzero(np.arange(x.shape[0]) % 5 != 0)  # every fifth image "failed to decode"
    data = x[ok_rows]
    kw = dict(fit_sample=600, refine_steps=[1, 2], points_per_cluster=[4, 3], n_iter=6, seed=4, spherical=True)
    job = DistributedLevel1Fit(path, 2, row_map=ok_rows)
    got = fit_hierarchy(data, [20, 5], level1_fit=job, **kw)
    ref = fit_hierarchy(data, [20, 5], **kw)
    np.testing.assert_allclose(got.centroids[0], ref.centroids[0], atol=1e-5)
    np.testing.assert_array_equal(got.assignments, ref.assignments)
    np.testing.assert_array_equal(got.parents[0], ref.parents[0])


def test_bad_input_gives_a_clear_error(embeddings, ray_local):
    path, _ = embeddings
    with pytest.raises(ValueError, match="at least one worker"):
        DistributedLevel1Fit(path, 0)
    with pytest.raises(ValueError, match="K > number of points"):
        DistributedLevel1Fit(path, 2)(np.arange(10), 11, **FIT)
    with pytest.raises(ValueError, match="more workers than fit rows"):
        DistributedLevel1Fit(path, 4)(np.arange(3), 2, **FIT)
