"""k-means with faiss, chunked assignment, and the resampling refinement of Vo et al. (2024).

Everything here works on embedding matrices only: a numpy array or a zarr.Array of shape [N, d]
(float32 or float16). A zarr input is read ``chunk_rows`` rows at a time and is never materialized.

Inertia convention used throughout: the k-means objective ``sum_i ||x_i - c_{a(i)}||^2`` in float64,
also for spherical k-means (where the assignment maximises the inner product with unit centroids,
which is the same as minimising the L2 distance when the points are unit-norm too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

Strategy = Literal["closest", "random"]
Init = Literal["kmeans++", "random"]
RefineInit = Literal["fresh", "previous"]

DEFAULT_CHUNK_ROWS = 65536
DEFAULT_ITERATIONS = 50  # Lloyd iterations per k-means, as Vo et al.'s reference code (n_iters=50)


# ---------------------------------------------------------------------------------------------
# array access (numpy or zarr), bounded memory
# ---------------------------------------------------------------------------------------------


def _use_gpu(gpu: bool | None) -> bool:
    """GPU when asked, or when faiss sees one and the caller did not say."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return (n > 0) if gpu is None else (bool(gpu) and n > 0)


def _shape(x: Any) -> tuple[int, int]:
    if len(x.shape) != 2:
        raise ValueError(f"embeddings must be 2-D [N, d], got shape {tuple(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


def _prep(block: np.ndarray, spherical: bool) -> np.ndarray:
    """float32, C-contiguous, and unit-norm rows for spherical k-means (cosine geometry)."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    if spherical:
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        block = block / np.maximum(norms, 1e-12)
    return block


def iter_chunks(x: Any, chunk_rows: int, spherical: bool = False):
    """Yield ``(start, block)`` with ``block`` float32 [<=chunk_rows, d]; reads zarr lazily."""
    n, _ = _shape(x)
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    for start in range(0, n, chunk_rows):
        yield start, _prep(np.asarray(x[start : min(start + chunk_rows, n)]), spherical)


def take_rows(x: Any, indices: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS,
              spherical: bool = False) -> np.ndarray:
    """Rows ``x[indices]`` as float32 (order of ``indices`` kept), reading one block at a time.

    Why blockwise: fancy indexing a zarr array with scattered rows issues one request per chunk
    anyway; scanning blocks keeps memory at ``chunk_rows x d`` plus the output.
    """
    n, d = _shape(x)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError("row indices out of range")
    if isinstance(x, np.ndarray):
        return _prep(x[indices], spherical)
    out = np.empty((indices.size, d), dtype=np.float32)
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        lo, hi = np.searchsorted(sorted_idx, [start, stop])
        if lo == hi:
            continue
        block = np.asarray(x[start:stop])
        out[order[lo:hi]] = _prep(block[sorted_idx[lo:hi] - start], spherical)
    return out


# ---------------------------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------------------------


def _index(centroids: np.ndarray, spherical: bool, gpu: bool | None) -> faiss.Index:
    """The assignment index: exact flat search on CPU; on GPUs (faiss-gpu, the ``gpu`` extra) the
    centroids are sharded over every visible GPU (a level-1 set too large for one) and stored in
    float16, faiss's half-precision flat search (distances accumulate in float32)."""
    d = centroids.shape[1]
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if _use_gpu(gpu):
        options = faiss.GpuMultipleClonerOptions()
        options.shard, options.useFloat16 = True, True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


class NearestCentroid:
    """The assignment index of one set of centroids, built once: ``search(block)`` labels rows of a prepared
    block (``_prep``: float32, unit-norm when spherical). Spherical: IndexFlatIP (max cosine with unit
    centroids); else IndexFlatL2. ``sqdist`` is the squared L2 distance to the chosen centroid either way
    (``|x|^2 + |c|^2 - 2 x.c`` for IP, computed in float64, clipped at 0)."""

    def __init__(self, centroids: np.ndarray, *, spherical: bool = False, gpu: bool | None = None):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if self.centroids.ndim != 2:
            raise ValueError(f"centroids must be [K, d], got {self.centroids.shape}")
        self.spherical = spherical
        self.index = _index(self.centroids, spherical, gpu)
        c64 = self.centroids.astype(np.float64)
        self.c_sq = np.einsum("kd,kd->k", c64, c64) if spherical else None

    def search(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, lab = self.index.search(block, 1)
        lab = lab[:, 0].astype(np.int64)
        if self.spherical:
            b64 = block.astype(np.float64)  # one float64 copy of the chunk, not two
            x_sq = np.einsum("nd,nd->n", b64, b64)
            del b64
            dist = x_sq + self.c_sq[lab] - 2.0 * score[:, 0].astype(np.float64)
        else:
            dist = score[:, 0].astype(np.float64)
        return lab, np.maximum(dist, 0.0).astype(np.float32)


def assign(x: Any, centroids: np.ndarray | NearestCentroid, *, spherical: bool = False,
           chunk_rows: int = DEFAULT_CHUNK_ROWS, gpu: bool | None = None,
           skip_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: ``(labels int64 [N], sqdist float32 [N])`` (:class:`NearestCentroid`;
    pass one to reuse its index over many calls). Memory: one chunk plus the [N] outputs. Rows listed in
    ``skip_rows`` (e.g. the fit sample, already assigned) are not searched: label -1, sqdist 0.
    """
    n, d = _shape(x)
    nearest = centroids if isinstance(centroids, NearestCentroid) else NearestCentroid(
        centroids, spherical=spherical, gpu=gpu)
    if nearest.centroids.shape[1] != d:
        raise ValueError(f"centroids must be [K, {d}], got {nearest.centroids.shape}")
    labels = np.full(n, -1, dtype=np.int64)
    sqdist = np.zeros(n, dtype=np.float32)
    skip = None if skip_rows is None else np.unique(np.asarray(skip_rows, dtype=np.int64))
    for start, block in iter_chunks(x, chunk_rows, nearest.spherical):
        rows = np.arange(start, start + block.shape[0])
        if skip is not None:
            keep = ~np.isin(rows, skip[np.searchsorted(skip, start):np.searchsorted(skip, rows[-1] + 1)])
            rows, block = rows[keep], block[keep]
            if rows.size == 0:
                continue
        labels[rows], sqdist[rows] = nearest.search(block)
    return labels, sqdist


def inertia_float64(x: Any, centroids: np.ndarray, labels: np.ndarray, *,
                    spherical: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Exact k-means objective in float64 (slow path, for checks and small inputs)."""
    total = 0.0
    c = np.asarray(centroids, dtype=np.float64)
    for start, block in iter_chunks(x, chunk_rows, spherical):
        diff = block.astype(np.float64) - c[labels[start : start + block.shape[0]]]
        total += float(np.einsum("nd,nd->", diff, diff))
    return total


# ---------------------------------------------------------------------------------------------
# plain k-means (faiss)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansResult:
    """Centroids [K, d] float32, labels [n] int64, squared distances [n] float32, inertia."""

    centroids: np.ndarray
    labels: np.ndarray
    sqdist: np.ndarray
    inertia: float


def _check_k(n: int, k: int) -> None:
    if k <= 0:
        raise ValueError(f"number of clusters must be positive, got {k}")
    if k > n:
        raise ValueError(f"cannot make {k} clusters from {n} points (K > number of points)")


def kmeans_plusplus(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre is a point drawn with
    probability proportional to its squared distance to the nearest centre so far.

    Own implementation because faiss 1.15's KMEANS_PLUS_PLUS init was seen to put two seeds in
    one of five well-separated blobs 2 times in 5 seeds, which exact D^2 sampling essentially
    never does. Cost: k sequential passes over x (O(nkd), memory-bound) -- at large k prefer
    ``init="random"``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    _check_k(n, k)
    rng = np.random.default_rng([seed, 4])
    x_sq = np.einsum("nd,nd->n", x, x, dtype=np.float64)
    picked = np.empty(k, dtype=np.int64)
    picked[0] = rng.integers(n)
    d2 = np.full(n, np.inf)
    for j in range(k):
        if j > 0:
            cum = np.cumsum(d2)
            if cum[-1] <= 0:  # fewer distinct points than k: fill with unused rows
                rest = np.setdiff1d(np.arange(n), picked[:j])
                picked[j:] = rng.choice(rest, k - j, replace=False)
                break
            picked[j] = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), n - 1)
        c = x[picked[j]]
        d2 = np.minimum(d2, np.maximum(x_sq + x_sq[picked[j]] - 2.0 * (x @ c), 0.0))
    return x[picked].copy()


def fit_centroids(x: np.ndarray, k: int, *, n_iter: int = DEFAULT_ITERATIONS, spherical: bool = False,
                  seed: int = 0, init: Init = "kmeans++", init_centroids: np.ndarray | None = None,
                  gpu: bool | None = None, max_points_per_centroid: int | None = None) -> np.ndarray:
    """faiss k-means on an in-memory float32 matrix; returns centroids [k, d].

    ``init_centroids`` overrides ``init``. ``max_points_per_centroid=None`` switches off faiss'
    silent subsampling: the caller chooses the fit set explicitly (``fit_sample``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    _check_k(n, k)
    params: dict[str, Any] = dict(
        niter=int(n_iter), spherical=bool(spherical), seed=int(seed) & 0x7FFFFFFF, verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=int(max_points_per_centroid or max(1, -(-n // k))),
    )
    if init_centroids is None and init == "kmeans++":
        init_centroids = kmeans_plusplus(x, k, seed)
    elif init_centroids is None and init != "random":  # "random": faiss samples k distinct rows
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    km = faiss.Kmeans(d, k, gpu=_use_gpu(gpu), **params)
    if init_centroids is not None:
        init_centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if init_centroids.shape != (k, d):
            raise ValueError(f"init_centroids must be [{k}, {d}], got {init_centroids.shape}")
    km.train(x, init_centroids=init_centroids)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def kmeans(x: np.ndarray, k: int, *, n_iter: int = DEFAULT_ITERATIONS, spherical: bool = False, seed: int = 0,
           init: Init = "kmeans++", gpu: bool | None = None,
           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> KMeansResult:
    """Lloyd's k-means (faiss) then one exact assignment pass of the same points."""
    x = _prep(np.asarray(x), spherical)
    c = fit_centroids(x, k, n_iter=n_iter, spherical=spherical, seed=seed, init=init, gpu=gpu)
    labels, sqdist = assign(x, c, spherical=spherical, chunk_rows=chunk_rows, gpu=gpu)
    return KMeansResult(c, labels, sqdist, float(sqdist.astype(np.float64).sum()))


# ---------------------------------------------------------------------------------------------
# resampling refinement (Vo et al. 2024, Alg. 1 "hierarchical k-means with resampling")
# ---------------------------------------------------------------------------------------------


def resample_per_cluster(labels: np.ndarray, sqdist: np.ndarray, k: int, points_per_cluster: int,
                         strategy: Strategy, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``points_per_cluster`` points of every cluster (sorted).

    ``closest``: the points nearest their centroid; ``random``: uniform without replacement.
    Vectorised: order points by (cluster, key) and keep the first r of each cluster.
    """
    if points_per_cluster <= 0:
        raise ValueError(f"points_per_cluster must be positive, got {points_per_cluster}")
    if strategy == "closest":
        key = sqdist.astype(np.float64)
    elif strategy == "random":
        key = rng.random(labels.size)
    else:
        raise ValueError(f"strategy must be 'closest' or 'random', got {strategy!r}")
    order, rank = rank_within_clusters(labels, key, k)
    return np.sort(order[rank < points_per_cluster])


def rank_within_clusters(labels: np.ndarray, key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``order`` sorts points by (cluster, key); ``rank[j]`` is the 0-based rank of point
    ``order[j]`` inside its cluster. Taking ``rank < count[cluster]`` keeps the first ``count``
    points of every cluster in one vectorised pass (no Python loop over clusters)."""
    order = np.lexsort((key, labels))
    sizes = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(labels.size) - starts[labels[order]]
    return order, rank


def kmeans_with_resampling(x: np.ndarray, k: int, *, refine_steps: int = 10,
                           points_per_cluster: int = 10, strategy: Strategy = "closest",
                           refine_init: RefineInit = "fresh", n_iter: int = DEFAULT_ITERATIONS,
                           spherical: bool = False, seed: int = 0, init: Init = "kmeans++",
                           gpu: bool | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                           prepared: bool = False) -> KMeansResult:
    """k-means followed by ``refine_steps`` resampling steps (Vo et al. 2024, Alg. 1).

    Procedure at one level, on the level's input points X (the data at level 1, the previous
    level's centroids above it):

    1. ``C <- kmeans(X, k)`` (``n_iter`` Lloyd iterations; k-means++ init as in the reference
       code, or faiss' random init);
       assign every point of X to its nearest centroid.
    2. Repeat ``refine_steps`` times:
       a. from each cluster take ``r = points_per_cluster`` points (all of it when smaller):
          the r closest to the current centroid (``strategy="closest"``, the paper's default
          "c") or r uniform random ones (``"random"``); this resampled set X' has at most
          ``k * r`` points and weighs every cluster (nearly) equally;
       b. ``C <- kmeans(X', k)``: a full k-means on X' -- ``refine_init="fresh"`` re-initialises
          it (``init`` with seed ``seed + step + 1``), as in the reference implementation;
          ``"previous"`` warm-starts Lloyd from the current C instead (cheaper);
       c. re-assign every point of X to the new C.

    Why: plain k-means puts many centroids in dense regions; iterating on a per-cluster
    balanced resample moves centroids toward a uniform cover of the support, which is what
    makes the subsequent balanced sampling flatten the concept distribution. The paper uses
    r roughly half the mean cluster size and 10 steps on the upper levels. With ``r <= 1`` there
    is nothing to rebalance: a resample of one point per cluster is k points for k centroids, and
    k-means on it returns those very points, i.e. centroids of the level below (at AMoE's ratios,
    50k -> 20k gives r = 1). Like Vo et al.'s reference (``sample_sizes[level] > 1``), the steps
    are then skipped.
    ``prepared=True`` promises x is already float32, C-contiguous and (if spherical) unit-norm,
    saving a copy of the fit set.
    """
    x = x if prepared else _prep(np.asarray(x), spherical)
    _check_k(x.shape[0], k)
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    if refine_init not in ("fresh", "previous"):
        raise ValueError(f"refine_init must be 'fresh' or 'previous', got {refine_init!r}")
    centroids = fit_centroids(x, k, n_iter=n_iter, spherical=spherical, seed=seed, init=init,
                              gpu=gpu)
    labels, sqdist = assign(x, centroids, spherical=spherical, chunk_rows=chunk_rows, gpu=gpu)
    rng = np.random.default_rng(seed)
    for step in range(refine_steps if points_per_cluster > 1 else 0):
        picked = resample_per_cluster(labels, sqdist, k, points_per_cluster, strategy, rng)
        if picked.size < k:  # empty clusters left fewer than k points: top up at random
            rest = np.setdiff1d(np.arange(x.shape[0]), picked)
            picked = np.sort(np.concatenate([picked, rng.choice(rest, k - picked.size, replace=False)]))
        centroids = fit_centroids(
            x[picked], k, n_iter=n_iter, spherical=spherical, seed=seed + step + 1, init=init,
            init_centroids=centroids if refine_init == "previous" else None, gpu=gpu)
        labels, sqdist = assign(x, centroids, spherical=spherical, chunk_rows=chunk_rows, gpu=gpu)
    return KMeansResult(centroids, labels, sqdist, float(sqdist.astype(np.float64).sum()))
