import numpy as np
import pytest

from storage.shards import ShardPlan, flat_shard_rows, images_for_rows


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


@pytest.mark.parametrize("tokens_per_image", [16, 70, 196, 256, 1024])
def test_default_flat_shards_keep_recomputed_images_few(tokens_per_image):
    """With ``flat_shard_rows``, the images units compute beyond their own ranges (counted from the work
    ranges, naively) stay within ~1/16 of all images; with 16384-row shards under ~18k-row units
    (Lite0's ~70 tokens, 256 images per unit) they were nearly half."""
    rng = np.random.default_rng(tokens_per_image)
    n, shard_images, chunk_rows = 4096, 256, 256
    counts = rng.integers(tokens_per_image // 2, tokens_per_image * 3 // 2 + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    plan = ShardPlan(n, shard_images)

    def forwarded(shard_rows: int) -> int:
        return sum(np.subtract(*plan.work_range(u, [offsets], [shard_rows])[::-1]) for u in range(plan.num_units))

    rows = flat_shard_rows(offsets, shard_images, chunk_rows)
    assert rows % chunk_rows == 0 and chunk_rows <= rows <= 16384
    # at most one shard's images per unit; a chunk bounds the shard from below for tiny images
    bound = max(1 / 16, chunk_rows / (tokens_per_image * shard_images)) * 1.6
    assert forwarded(rows) / n - 1 <= bound
    if tokens_per_image == 70:
        assert forwarded(16384) / n - 1 > 0.3  # the old fixed default


def test_flat_shard_rows_rejects_bad_sizes():
    with pytest.raises(ValueError):
        flat_shard_rows(np.array([0, 10]), 0, 256)
