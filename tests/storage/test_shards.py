import numpy as np
import pytest

from storage.shards import ShardPlan, images_for_rows


def _random_offsets(rng, n):
    counts = rng.integers(0, 40, size=n)
    counts[rng.random(n) < 0.1] = 0  # failed images have no rows
    return np.concatenate([[0], np.cumsum(counts)])


@pytest.mark.parametrize("seed", range(20))
def test_owned_rows_partition_all_rows_in_whole_shards(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    offsets = _random_offsets(rng, n)
    plan = ShardPlan(n, int(rng.integers(1, 50)))
    shard_rows = int(rng.integers(1, 64))
    total = int(offsets[-1])
    owner = np.full(total, -1)
    for u in range(plan.num_units):
        r0, r1 = plan.owned_rows(u, offsets, shard_rows)
        assert (owner[r0:r1] == -1).all(), "two units own one row"
        owner[r0:r1] = u
        assert r0 % shard_rows == 0 or r0 == total
        assert r1 % shard_rows == 0 or r1 == total
        # the unit can compute every row it owns: its work range covers the owning images
        w0, w1 = plan.work_range(u, [offsets], [shard_rows])
        i0, i1 = plan.image_range(u)
        assert w0 <= i0 and w1 >= i1
        if r1 > r0:
            assert offsets[w0] <= r0 and offsets[w1] >= r1
    assert (owner >= 0).all(), "some rows have no owner"


def test_images_for_rows_matches_brute_force():
    rng = np.random.default_rng(0)
    offsets = _random_offsets(rng, 60)
    total = int(offsets[-1])
    for _ in range(300):
        r0 = int(rng.integers(0, total))
        r1 = int(rng.integers(r0 + 1, total + 1))
        i0, i1 = images_for_rows(offsets, r0, r1)
        covering = [i for i in range(60) if offsets[i] < r1 and offsets[i + 1] > r0]
        assert i0 <= covering[0] and i1 >= covering[-1] + 1
        assert offsets[i0] <= r0 and offsets[i1] >= r1
    assert images_for_rows(offsets, 5, 5) == (0, 0)


def test_plan_ranges_and_errors():
    plan = ShardPlan(10, 4)
    assert plan.num_units == 3
    assert [plan.image_range(u) for u in range(3)] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(IndexError):
        plan.image_range(3)
    with pytest.raises(ValueError):
        ShardPlan(10, 0)
