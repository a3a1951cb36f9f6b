"""Cap allocation vs a bisection reference; top-down allocation; balanced sampling on a long tail."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from curation.hierarchy import Hierarchy, fit_hierarchy, iter_label_blocks
from curation.keys import row_keys
from curation.metrics import compare_to_random, coverage, curation_metrics, normalized_entropy
from curation.sampling import (allocate, allocate_grouped, curate_embeddings, hierarchical_allocation,
                               hierarchical_sample, hierarchical_sample_with_labels, select_points)


def cap_by_bisection(sizes: np.ndarray, target: int) -> int:
    """Reference: the largest integer x with sum(min(x, n_i)) <= target (plain bisection)."""
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(mid, sizes).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_allocation(alloc: np.ndarray, sizes: np.ndarray, target: int) -> None:
    assert alloc.sum() == min(target, sizes.sum())
    assert (alloc >= 0).all() and (alloc <= sizes).all()
    if target < sizes.sum():
        x = cap_by_bisection(sizes, target)
        full = alloc == sizes
        assert ((alloc == x) | (alloc == x + 1) | full).all()  # the cap property
        assert (alloc[~full] >= x).all() and (alloc <= x + 1).all()


def zipf_concepts(n_concepts=30, head=2500, a=1.45, dim=16, seed=0):
    """Long-tailed mixture: concept i has round(head / i^a) points (head/tail ~ 140x)."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(np.round(head / np.arange(1, n_concepts + 1) ** a).astype(int), 1)
    centers = rng.normal(size=(n_concepts, dim)) * 10
    labels = np.repeat(np.arange(n_concepts), sizes)
    x = centers[labels] + rng.normal(size=(labels.size, dim))
    perm = rng.permutation(labels.size)
    return x[perm].astype(np.float32), labels[perm]


# ------------------------------------------------------------------------ allocation


@pytest.mark.parametrize("seed", range(6))
def test_allocate_matches_bisection_cap(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.zipf(1.6, size=rng.integers(1, 60)).clip(max=500).astype(np.int64)
    sizes[rng.random(sizes.size) < 0.1] = 0  # empty clusters are allowed
    for target in [0, 1, 7, int(sizes.sum()) // 3, int(sizes.sum()) - 1, int(sizes.sum()),
                   int(sizes.sum()) + 10]:
        check_allocation(allocate(sizes, target, np.random.default_rng(seed)), sizes, target)


def test_allocate_remainder_and_determinism():
    sizes = np.array([1, 5, 100, 3, 50, 50, 50])
    a = allocate(sizes, 100, np.random.default_rng(0))
    # cap: 1+5+3 taken whole, 91 over 4 clusters -> x = 22, remainder 3 to random clusters
    assert cap_by_bisection(sizes, 100) == 22
    np.testing.assert_array_equal(a[[0, 1, 3]], [1, 5, 3])
    assert sorted(a[[2, 4, 5, 6]].tolist()) == [22, 23, 23, 23]
    np.testing.assert_array_equal(a, allocate(sizes, 100, np.random.default_rng(0)))
    seen = {tuple(allocate(sizes, 100, np.random.default_rng(s))) for s in range(20)}
    assert len(seen) > 1  # the remainder really goes to random clusters


@pytest.mark.parametrize("seed", range(4))
def test_allocate_grouped_equals_per_group(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 8, size=200)
    groups[groups == 5] = 6  # group 5 is empty
    sizes = rng.integers(0, 40, size=200)
    totals = np.bincount(groups, weights=sizes, minlength=8).astype(int)
    targets = (totals * rng.random(8)).astype(int)
    targets[2] = totals[2] + 5  # more than available: take all
    alloc = allocate_grouped(sizes, groups, targets, rng)
    for g in range(8):
        check_allocation(alloc[groups == g], sizes[groups == g], int(targets[g]))


def test_allocate_bad_input():
    with pytest.raises(ValueError, match=">= 0"):
        allocate(np.array([3, -1]), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 0"):
        allocate(np.array([3, 1]), -2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="group ids"):
        allocate_grouped(np.array([3, 1]), np.array([0, 2]), np.array([1, 1]),
                         np.random.default_rng(0))


# ------------------------------------------------------------------------ hierarchical sampling


@pytest.fixture(scope="module")
def tree():
    x, labels = zipf_concepts()
    h = fit_hierarchy(x, [90, 30, 6], refine_steps=[0, 3, 3], points_per_cluster=[10, 2, 2],
                      seed=0)
    return x, labels, h


def test_top_down_allocation_is_consistent(tree):
    _, _, h = tree
    alloc = hierarchical_allocation(h, 500, np.random.default_rng(0))
    assert alloc[-1].sum() == 500
    for lvl in range(1, h.n_levels):  # children of every cluster share exactly its allocation
        per_parent = np.bincount(h.parents[lvl - 1], weights=alloc[lvl - 1], minlength=h.levels[lvl])
        np.testing.assert_array_equal(per_parent, alloc[lvl])
        sizes = h.cluster_sizes(lvl)
        for parent in range(h.levels[lvl]):  # the cap property holds among siblings
            kids = h.parents[lvl - 1] == parent
            check_allocation(alloc[lvl - 1][kids], sizes[kids], int(alloc[lvl][parent]))
    assert (alloc[0] <= h.cluster_sizes(1)).all()


@pytest.mark.parametrize("selection", ["random", "closest"])
def test_sample_exact_size_unique_sorted_deterministic(tree, selection):
    _, _, h = tree
    for target in [1, 37, 500, h.n_points - 1]:
        sel = hierarchical_sample(h, target, selection=selection, seed=4)
        assert sel.size == target and sel.dtype == np.int64
        assert (np.diff(sel) > 0).all() and sel[0] >= 0 and sel[-1] < h.n_points
    np.testing.assert_array_equal(hierarchical_sample(h, 500, selection=selection, seed=4),
                                  hierarchical_sample(h, 500, selection=selection, seed=4))
    np.testing.assert_array_equal(hierarchical_sample(h, h.n_points + 3), np.arange(h.n_points))


def test_closest_selection_takes_nearest_points(tree):
    _, _, h = tree
    sel = hierarchical_sample(h, 400, selection="closest", seed=0)
    chosen = np.zeros(h.n_points, bool)
    chosen[sel] = True
    for c in np.unique(h.assignments[sel]):
        members = h.assignments == c
        if (members & ~chosen).any():
            assert h.sqdist[members & chosen].max() <= h.sqdist[members & ~chosen].min()


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_sampling_flattens_long_tail(tree, seed):
    x, labels, deep = tree
    h = fit_hierarchy(x, [90, 30], refine_steps=[0, 3], points_per_cluster=[10, 2], seed=seed)
    sel = hierarchical_sample(h, 450, selection="random", seed=seed)
    cmp = compare_to_random(labels, sel, seed=seed, num_labels=30)
    assert cmp["entropy_curated"] >= 0.9, cmp
    assert cmp["entropy_random"] < 0.7, cmp
    assert cmp["coverage_curated"] >= 0.95, cmp
    assert normalized_entropy(labels[sel], 30) == pytest.approx(cmp["entropy_curated"])
    assert coverage(labels[sel], 30) == cmp["coverage_curated"]
    # a deeper tree (6 top nodes over 30 concepts) balances nodes, not concepts: still far flatter
    deep_cmp = compare_to_random(labels, hierarchical_sample(deep, 450, seed=seed), seed=seed,
                                 num_labels=30)
    assert deep_cmp["entropy_curated"] >= 0.85 > 0.7 > deep_cmp["entropy_random"], deep_cmp


def test_curate_embeddings_end_to_end_from_zarr(tmp_path):
    x, labels = zipf_concepts(seed=1)
    z = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=x.shape, dtype="float16",
                          chunks=(512, x.shape[1]))
    z[:] = x.astype(np.float16)
    res = curate_embeddings(z, [90, 30], 450, fit_sample=3000, refine_steps=[1, 3],
                            points_per_cluster=[5, 2], selection="closest", seed=1, chunk_rows=700)
    assert isinstance(res.hierarchy, Hierarchy) and res.hierarchy.n_points == len(x)
    assert res.selected_indices.size == 450
    assert len(np.unique(res.selected_indices)) == 450
    m = res.metrics
    assert [row["level"] for row in m["per_level"]] == [1, 2]
    assert m["per_level"][1]["entropy_curated"] > m["per_level"][1]["entropy_random"]
    assert set(m["timings_s"]) >= {"level_1_fit", "assign_pool", "sampling"}
    assert normalized_entropy(labels[res.selected_indices], 30) >= 0.85


def test_sampling_bad_input(tree):
    x, _, h = tree
    with pytest.raises(ValueError, match="positive number of points"):
        hierarchical_sample(h, 0)
    with pytest.raises(ValueError, match="positive number of points"):
        curate_embeddings(x, [10, 2], -5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        curate_embeddings(x, [10, 20], 5)
    with pytest.raises(ValueError, match="larger than the number of points"):
        curate_embeddings(x[:50], [60, 2], 5)
    with pytest.raises(ValueError, match="selection"):
        hierarchical_sample(h, 10, selection="farthest")


def grouped_zipf_concepts(seed: int, n_concepts: int = 30, groups: int = 4, head: int = 1750, dim: int = 16):
    """A long tail (as ``zipf_concepts``) whose concepts fall into ``groups`` broader groups, as real
    concepts do (breeds of dogs, kinds of vehicles): the structure hierarchical k-means is meant to find."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(np.round(head / np.arange(1, n_concepts + 1) ** 1.45).astype(int), 1)
    group = rng.permutation(np.arange(n_concepts) % groups)
    centers = rng.normal(size=(groups, dim))[group] * 30 + rng.normal(size=(n_concepts, dim)) * 6
    labels = np.repeat(np.arange(n_concepts), sizes)
    x = centers[labels] + rng.normal(size=(labels.size, dim))
    perm = rng.permutation(labels.size)
    return x[perm].astype(np.float32), labels[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_level_at_amoe_ratios_does_not_collapse_onto_the_level_below(seed):
    """AMoE's 50k -> 20k has ~2 centroids per top cluster, so r = 1: resampling one point per cluster
    would hand k-means its own answer, every top centroid landing exactly on a level-3 centroid.
    At the same ratios (4,118 points, 100 / 10 / 4) each top centroid must be the mean of its
    members, never one of them (but for a cluster of one), and the curation must stay balanced."""
    x, labels = grouped_zipf_concepts(seed)
    h = fit_hierarchy(x, [100, 10, 4], seed=seed)
    top, below, parent = h.centroids[2], h.centroids[1], h.parents[1]
    multi = 0
    for c in range(len(top)):
        members = below[parent == c]
        if len(members) < 2:
            continue
        multi += 1
        gap = np.sqrt(((members - top[c]) ** 2).sum(-1)).min()
        assert gap > 1e-3 * np.abs(members).max(), f"top centroid {c} sits on one of its {len(members)} members"
        np.testing.assert_allclose(top[c], members.mean(0), rtol=1e-4, atol=1e-3)
    assert multi >= 2
    cmp = compare_to_random(labels, hierarchical_sample(h, 400, seed=seed), seed=seed, num_labels=30)
    assert cmp["entropy_curated"] >= 0.85 > 0.7 > cmp["entropy_random"], cmp


# ------------------------------------------------------------------------- selection in one pass of blocks
def naive_selection(labels: np.ndarray, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Reference: per cluster, a Python sort of its rows by (key, row), the first counts[c] kept."""
    picked = []
    for c in range(counts.size):
        rows = sorted(np.flatnonzero(labels == c).tolist(), key=lambda r: (keys[r], r))
        picked += rows[: int(counts[c])]
    return np.sort(np.asarray(picked, np.int64))


def test_row_keys_are_uniform_and_a_pure_function_of_seed_and_row():
    rows = np.arange(200_000)
    k = row_keys(rows, seed=7, stream=2)
    assert k.dtype == np.float64 and (k >= 0).all() and (k < 1).all()
    hist = np.bincount((k * 20).astype(int), minlength=20)  # chi-square against uniform, 19 dof
    chi2 = ((hist - rows.size / 20) ** 2 / (rows.size / 20)).sum()
    assert chi2 < 50, chi2  # p ~ 1e-4
    assert abs(np.corrcoef(k[:-1], k[1:])[0, 1]) < 0.01  # neighbouring rows are not correlated
    np.testing.assert_array_equal(row_keys(rows[1234:1300], 7, 2), k[1234:1300])  # no dependence on the block
    assert not np.array_equal(row_keys(rows[:100], 8, 2), k[:100])
    assert not np.array_equal(row_keys(rows[:100], 7, 3), k[:100])
    assert np.unique(k).size == k.size


@pytest.mark.parametrize("selection", ["random", "closest"])
@pytest.mark.parametrize("block_rows", [1, 37, 5000])
def test_selection_over_blocks_equals_a_naive_whole_array_reference(selection, block_rows):
    rng = np.random.default_rng(3)
    n, k = 3000, 25
    labels = np.minimum(rng.zipf(1.6, n) - 1, k - 1).astype(np.int64)
    sqdist = np.round(rng.random(n), 2).astype(np.float32)  # many ties: the lower row must win them
    counts = np.minimum(np.bincount(labels, minlength=k), rng.integers(0, 40, k))
    blocks = [(np.arange(s, min(s + block_rows, n)), labels[s:s + block_rows], sqdist[s:s + block_rows])
              for s in range(0, n, block_rows)]
    rows, got_labels = select_points(iter(blocks), counts, selection, seed=5)
    keys = row_keys(np.arange(n), 5, stream=2) if selection == "random" else sqdist.astype(np.float64)
    np.testing.assert_array_equal(rows, naive_selection(labels, keys, counts))
    np.testing.assert_array_equal(got_labels, labels[rows])
    np.testing.assert_array_equal(np.bincount(got_labels, minlength=k), counts)


@pytest.mark.parametrize("selection", ["random", "closest"])
def test_a_tree_whose_labels_are_in_zarr_samples_and_measures_as_the_in_memory_tree(tree, tmp_path, selection):
    """The pool's labels written to zarr (with unlabelled rows, -1, as a curation folder has for failed images)
    give the same selection and the same metrics as the same labels in memory, read a chunk at a time."""
    _, _, h = tree
    n = h.n_points
    holes = np.arange(0, n, 17)  # rows that are not points: the zarr tree has n + holes.size rows
    pool_rows = np.setdiff1d(np.arange(n + holes.size), holes + np.arange(holes.size))
    labels = np.full(n + holes.size, -1, np.int32)
    sqdist = np.zeros(n + holes.size, np.float32)
    labels[pool_rows], sqdist[pool_rows] = h.assignments, h.sqdist
    za = zarr.create_array(str(tmp_path / "l.zarr"), shape=labels.shape, dtype="int32", chunks=(97,))
    zs = zarr.create_array(str(tmp_path / "s.zarr"), shape=labels.shape, dtype="float32", chunks=(97,))
    za[:], zs[:] = labels, sqdist
    lazy = Hierarchy(h.centroids, za, zs, h.parents, h.inertia)
    assert not lazy.in_memory
    for lvl in (1, 2, 3):
        np.testing.assert_array_equal(lazy.cluster_sizes(lvl), h.cluster_sizes(lvl))
    mem_sel = hierarchical_sample(h, 500, selection=selection, seed=4)
    zarr_sel, zarr_lab = hierarchical_sample_with_labels(lazy, 500, selection=selection, seed=4)
    np.testing.assert_array_equal(zarr_lab, labels[zarr_sel])
    if selection == "closest":  # keys are distances: the same points whatever the row numbering
        np.testing.assert_array_equal(zarr_sel, pool_rows[mem_sel])
    else:  # keys hash the row: the zarr rows are numbered differently, the allocation per cluster is the same
        np.testing.assert_array_equal(np.bincount(zarr_lab, minlength=h.levels[0]),
                                      np.bincount(h.assignments[mem_sel], minlength=h.levels[0]))
        assert np.isin(zarr_sel, pool_rows).all()
    m_mem, m_zarr = curation_metrics(h, mem_sel, seed=1), curation_metrics(lazy, zarr_sel, seed=1)
    for a, b in zip(m_mem["per_level"], m_zarr["per_level"]):
        assert a["sizes"] == b["sizes"] and a["entropy_pool"] == pytest.approx(b["entropy_pool"])
        if selection == "closest":
            assert a["entropy_curated"] == pytest.approx(b["entropy_curated"])
    assert m_zarr["n_points"] == n
    with pytest.raises(TypeError, match="in memory"):
        lazy.point_clusters(1)
    with pytest.raises(ValueError, match="not a point"):
        curation_metrics(lazy, np.array([holes[0]]))


def test_sampling_from_zarr_labels_holds_one_block_not_the_pool(tmp_path):
    """The selection over 2M labels in zarr (16 MB as int32 + float32) traces far less than the labels: the
    candidates (at most the target) and one block, as the module says."""
    import tracemalloc

    n, k, block = 2_000_000, 1000, 20_000
    rng = np.random.default_rng(0)
    za = zarr.create_array(str(tmp_path / "l.zarr"), shape=(n,), dtype="int32", chunks=(block,))
    zs = zarr.create_array(str(tmp_path / "s.zarr"), shape=(n,), dtype="float32", chunks=(block,))
    for s in range(0, n, 200_000):
        za[s:s + 200_000] = rng.integers(0, k, 200_000)
        zs[s:s + 200_000] = rng.random(200_000)
    counts = np.full(k, 2, np.int64)
    tracemalloc.start()
    rows, _ = select_points(iter_label_blocks(za, zs, block), counts, "random", seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows.size == 2 * k
    assert peak < 4_000_000, f"selection traced {peak / 1e6:.1f} MB for {n * 8 / 1e6:.0f} MB of labels"


def test_a_curation_reads_the_labels_three_times_not_once_per_question(tree):
    """Cluster sizes are counted once per tree: the split, the pick and the metrics are three passes over the labels
    (a pool in zarr: minutes each), and the counts handed out are copies."""
    _, _, h = tree
    fresh = Hierarchy(h.centroids, h.assignments, h.sqdist, h.parents, h.inertia)
    passes = []
    fresh.blocks = lambda block_rows=65536: (passes.append(1), h.blocks(block_rows))[1]
    sel, _ = hierarchical_sample_with_labels(fresh, 300, seed=1)
    curation_metrics(fresh, sel, seed=1)
    fresh.cluster_sizes(2)
    assert len(passes) == 3
    fresh.sizes_per_level()[0][:] = -5
    np.testing.assert_array_equal(fresh.cluster_sizes(1), h.cluster_sizes(1))


def test_fit_sample_of_a_large_pool_is_the_smallest_keys_without_holding_the_pool():
    """Above ``permute_below`` rows the fit sample is the m rows of smallest row key, found in two passes
    of blocks: equal to a naive sort of every key, uniform over the pool, and in memory the sample's size
    (Generator.choice permutes all n rows: 8 B per pool row)."""
    import tracemalloc

    from curation.hierarchy import sample_fit_rows, smallest_key_rows
    from curation.keys import row_keys

    n, m = 50_000, 4_000
    got = sample_fit_rows(n, m, seed=7, permute_below=1000, block_rows=3_000)
    keys = row_keys(np.arange(n), 7, stream=1)
    np.testing.assert_array_equal(got, np.sort(np.lexsort((np.arange(n), keys))[:m]))
    assert got.dtype == np.int64 and np.all(np.diff(got) > 0)
    # every block count and bucket edge: small buckets put many candidates in the edge bucket
    for blocks, buckets in [(1, 4), (977, 2), (n, 1 << 16)]:
        np.testing.assert_array_equal(smallest_key_rows(n, m, 7, 1, blocks, buckets), got)
    # uniform over the pool: chi-square over 50 equal ranges of rows (99.9% quantile at 49 dof: 85.4)
    counts = np.bincount(got * 50 // n, minlength=50)
    assert ((counts - m / 50) ** 2 / (m / 50)).sum() < 85.4
    # small pools keep the generator's draw (the figures measured with it stay reproducible)
    small = sample_fit_rows(900, 100, seed=7)
    np.testing.assert_array_equal(small, np.sort(np.random.default_rng([7, 1]).choice(900, size=100, replace=False)))
    n, m = 4_000_000, 400_000
    tracemalloc.start()
    rows = sample_fit_rows(n, m, seed=1, permute_below=1 << 20, block_rows=1 << 16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rows.size == m and peak < 3 * m * 8 + 8e6, peak  # the sample (and its sort); the permutation: 32 MB
