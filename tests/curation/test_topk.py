"""SmallestPerGroup against a naive per-group sort: any block order, any batch size, ties, empty groups."""

from __future__ import annotations

import numpy as np
import pytest

from curation.topk import SmallestPerGroup


def naive(rows, groups, keys, counts):
    picked = []
    for g in range(counts.size):
        mine = sorted(((keys[i], rows[i]) for i in np.flatnonzero(groups == g)))
        picked += [r for _, r in mine[: counts[g]]]
    return np.sort(np.asarray(picked, np.int64))


@pytest.mark.parametrize("merge_rows", [1, 50, 100_000])
@pytest.mark.parametrize("shuffle_blocks", [False, True])
def test_the_smallest_per_group_equal_a_naive_sort(merge_rows, shuffle_blocks):
    rng = np.random.default_rng(merge_rows)
    n, k = 4000, 30
    rows = np.arange(n) * 3 + 7
    groups = np.minimum(rng.zipf(1.5, n) - 1, k - 1)
    keys = rng.integers(0, 8, n).astype(float)  # ties everywhere, at every boundary: the lower row must win each
    counts = rng.integers(0, 60, k)
    counts[[0, 5]] = 0
    want = naive(rows, groups, keys, counts)
    starts = list(range(0, n, 97))
    if shuffle_blocks:
        rng.shuffle(starts)
    best = SmallestPerGroup(counts, merge_rows=merge_rows)
    for s in starts:
        sl = slice(s, s + 97)
        best.offer(rows[sl], groups[sl], keys[sl], groups[sl] * 10)
    got, payload = best.result()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(payload, groups[(got - 7) // 3] * 10)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        SmallestPerGroup(np.array([1, -1]))
