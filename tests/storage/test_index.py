"""The per-unit index (``storage.index``) gives the training path exactly what the whole index gave: the same
plans in the same order (pinned against the whole-array implementation, ``stream_reference``), the same
targets, with a bounded number of units in memory and without reading any whole index array."""

from __future__ import annotations

import shutil
from itertools import islice

import numpy as np
import pytest
import zarr

import stream_reference
from synthetic_store import TEACHER, write_synthetic_store
from storage.reader import StoreReader, read_batch
from storage.store import StoreError
from train.config import DataConfig
from train.data import PlanStream, StoreBatches, StoreMix


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores with failed images (with a grid: only ``ok`` says they failed), grids up to 4x4 and 3x3, and a
    last unit shorter than the others."""
    root = tmp_path_factory.mktemp("index")
    return (write_synthetic_store(str(root / "a"), 3001, shard_images=64, max_side=4, failed_every=7, seed=1),
            write_synthetic_store(str(root / "b"), 500, shard_images=32, max_side=3, failed_every=5, seed=2))


def _whole(url: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r")
    return {"ok": g["images/ok"][:], "grid": g["images/grid"][:], "pixel_offsets": g["images/pixel_offsets"][:],
            "pixels": g["images/pixels"][:], "labels": g["labels"][:], "offsets": g[f"teachers/{TEACHER}/offsets"][:],
            "summary": g[f"teachers/{TEACHER}/summary"][:], "patches": g[f"teachers/{TEACHER}/patches"][:]}


@pytest.fixture
def no_whole_index(monkeypatch):
    """Any read of a whole index array fails the test: the training path reads units only."""
    def refuse(self, name, array):
        raise AssertionError(f"the training path read the whole {name}")
    monkeypatch.setattr(StoreReader, "_whole", refuse)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_the_per_unit_plans_are_the_whole_array_plans(stores, mode, no_whole_index):
    cfg = DataConfig(mode=mode, seq_len=40, seqs_per_batch=2, max_images_per_seq=8, shuffle_buffer=100, padded_images=6)
    sizes = [3001, 500]
    for k, weights in ((1, [1.0]), (2, [2.0, 1.0])):
        urls = list(stores[:k])
        whole = [_whole(u) for u in urls]
        ok = np.concatenate([w["ok"] for w in whole])
        grid = np.concatenate([w["grid"] for w in whole])
        starts = np.cumsum([0, *sizes[:k]])
        parts = [(int(starts[j]), int(starts[j + 1]), unit, weights[j]) for j, unit in enumerate((64, 32)[:k])]
        old = list(islice(stream_reference.microbatches(ok, grid, cfg, registers=4, seed=5, parts=parts), 1200))
        assert max(mb.epoch for mb in old) >= 2  # several epochs of the first store
        plans = PlanStream(StoreMix(urls, [TEACHER]).indexes, cfg, registers=4, seed=5, weights=weights)
        assert list(islice(plans.microbatches(), 1200)) == old
        # a resume at step 37 of a 2-rank run with accumulation 2: this rank's share of the same microbatches
        ranked = PlanStream(StoreMix(urls, [TEACHER]).indexes, cfg, registers=4, seed=5, weights=weights,
                            accumulation=2, world=2, rank=1)
        got = [(p.step, p.microbatch) for p in islice(ranked.steps(37), 20)]
        assert got == [(s, old[4 * s + 2 * a + 1]) for s in range(37, 47) for a in range(2)]


def test_batches_read_through_units_are_the_stored_targets(stores, no_whole_index):
    whole = _whole(stores[0])
    reader = StoreReader(stores[0], index_units=3)
    rows = np.flatnonzero(whole["ok"])[[5, 900, 7, 2500, 6, 2571 - 1, 64, 63]]
    for it, i in zip(read_batch(reader, rows), rows):
        assert it.index == i and it.grid == tuple(whole["grid"][i]) and it.label == whole["labels"][i]
        assert it.pixels.tobytes() == whole["pixels"][whole["pixel_offsets"][i]:whole["pixel_offsets"][i + 1]].tobytes()
        np.testing.assert_array_equal(it.patches[TEACHER], whole["patches"][whole["offsets"][i]:whole["offsets"][i + 1]])
        np.testing.assert_array_equal(it.summary[TEACHER], whole["summary"][i])
    one = reader.read(int(rows[3]))
    np.testing.assert_array_equal(one.patches[TEACHER], read_batch(reader, [rows[3]])[0].patches[TEACHER])
    assert len(reader.index._cache) <= 3  # the LRU keeps at most index_units units
    with pytest.raises(ValueError, match="failed to decode"):
        read_batch(reader, [6])  # every 7th image failed


def test_an_image_longer_than_seq_len_is_refused_when_its_unit_is_reached(stores):
    cfg = DataConfig(seq_len=12, seqs_per_batch=2, max_images_per_seq=8, shuffle_buffer=100)  # 4x4 grids need 21
    plans = PlanStream(StoreMix([stores[0]], [TEACHER]).indexes, cfg, registers=4, seed=0)
    with pytest.raises(ValueError, match=f"of {stores[0]} needs 2[01] tokens .* raise data.seq_len"):
        next(plans.steps())


def test_token_offsets_that_disagree_with_the_grid_are_named(stores, tmp_path):
    url = str(tmp_path / "store")
    shutil.copytree(stores[0], url)
    offsets = zarr.open_array(f"{url}/teachers/{TEACHER}/offsets", mode="r+")
    offsets[130] = offsets[130] + 1  # a valid chunk (checksum and all) holding a wrong offset
    reader = StoreReader(url)
    read_batch(reader, [1, 2])  # other units read as before
    with pytest.raises(StoreError, match=f"{TEACHER}/offsets rows 128:192 disagree"):
        read_batch(reader, [1, 135])


def test_eval_keeps_the_whole_index_on_first_use(stores):
    whole = _whole(stores[1])
    reader = StoreReader(stores[1])
    assert "ok" not in vars(reader)  # not read by opening
    np.testing.assert_array_equal(reader.ok, whole["ok"])
    np.testing.assert_array_equal(reader.token_offsets, whole["offsets"])
    ds = StoreBatches(stores[1], [TEACHER], DataConfig(), patch=16, registers=0, seed=0)
    np.testing.assert_array_equal(ds.reader.grid, whole["grid"])
    assert len(ds.reader) == 500


# ---------------------------------------------------------------- offsets read a unit at a time (writers)
def _whole_offsets(ok, grid):
    counts = np.where(ok, grid[:, 0].astype(np.int64) * grid[:, 1], 0)
    return np.concatenate([[0], np.cumsum(counts)])


@pytest.mark.parametrize("n,unit", [(1, 4), (37, 4), (40, 8), (203, 16)])
def test_unit_offsets_index_slice_and_search_as_the_whole_array(n, unit):
    """Against the whole int64 array: every element (negative indices too), slices, and searchsorted on both sides
    for every value from below the first to past the last, with many zero-token (failed) images, whole zero-token
    units among them."""
    from storage.index import ArrayIndex, token_offsets

    rng = np.random.default_rng(n)
    ok = rng.random(n) > 0.3
    ok[unit:2 * unit] = False  # a unit without a token
    grid = rng.integers(1, 4, size=(n, 2)).astype(np.int32)
    whole = _whole_offsets(ok, grid)
    got = token_offsets(ArrayIndex(ok, grid, unit, capacity=2))
    assert len(got) == n + 1
    for i in range(-(n + 1), n + 1):
        assert got[i] == whole[i]
    for a in range(0, n + 2):
        for b in range(a, n + 2):
            np.testing.assert_array_equal(got[a:b], whole[a:b])
    np.testing.assert_array_equal(got[:], whole)
    for v in range(-1, int(whole[-1]) + 2):
        for side in ("left", "right"):
            assert got.searchsorted(v, side) == np.searchsorted(whole, v, side), (v, side)
    with pytest.raises(IndexError):
        got[n + 1]


def test_shard_plans_give_the_same_rows_and_work_from_unit_offsets():
    """``ShardPlan.owned_rows`` and ``work_range`` (what a teacher worker asks per unit) from per-unit offsets equal
    those from the whole array."""
    from storage.index import ArrayIndex, token_offsets
    from storage.shards import ShardPlan

    rng = np.random.default_rng(3)
    n, unit = 500, 32
    ok = rng.random(n) > 0.2
    grid = rng.integers(1, 6, size=(n, 2)).astype(np.int32)
    whole = _whole_offsets(ok, grid)
    lazy = token_offsets(ArrayIndex(ok, grid, unit, capacity=3))
    plan = ShardPlan(n, unit)
    for shard_rows in (16, 64, 1024):
        for u in range(plan.num_units):
            assert plan.owned_rows(u, lazy, shard_rows) == plan.owned_rows(u, whole, shard_rows)
            assert plan.work_range(u, [lazy], [shard_rows]) == plan.work_range(u, [whole], [shard_rows])


def test_a_store_writers_offsets_read_only_the_units_they_touch(stores):
    """token_offsets/pixel_offsets over a store's index read one unit per lookup, never whole arrays, and equal the
    store's own whole arrays."""
    from storage.index import StoreIndex, pixel_offsets, plain_select, token_offsets
    from storage.store import FeatureStore

    store = FeatureStore.open(stores[0])
    reads = []

    def counting(name, array, selection, rows):
        reads.append((name, len(rows)))
        return plain_select(name, array, selection, rows)

    index = StoreIndex(store, counting, teacher=None, capacity=2)
    whole = store.token_offsets()
    tokens = token_offsets(index, units_per_read=4)  # the units' starts: ok and grid, 4 units a read
    units = -(-store.num_images // store.shard_images)
    assert len(reads) == 2 * -(-units // 4) and max(n for _, n in reads) <= 4 * store.shard_images
    np.testing.assert_array_equal(tokens.unit_starts, whole[::store.shard_images].tolist() + [whole[-1]]
                                  if store.num_images % store.shard_images else whole[::store.shard_images])
    reads.clear()
    assert tokens[1000] == whole[1000] and tokens[-1] == whole[-1]
    assert max(n for _, n in reads) <= store.shard_images
    reads.clear()
    pix = pixel_offsets(index)
    assert not reads  # nothing is read to make it: it has no unit starts, and needs none to index and slice
    stored = store.image_array("pixel_offsets")[:]
    np.testing.assert_array_equal(pix[640:700], stored[640:700])
    np.testing.assert_array_equal(pix[2990:], stored[2990:])
    assert pix[-1] == stored[-1]
    assert max(n for _, n in reads) <= store.shard_images + 1
    with pytest.raises(TypeError, match="units. starts"):
        pix.searchsorted(5)
    # a writer's decode reads only ok of the rows it decodes, across unit boundaries, as the whole array has it
    reads.clear()
    ok = store.image_array("ok")[:]
    for a, b in [(0, 0), (5, 70), (store.shard_images - 3, 3 * store.shard_images + 2), (0, store.num_images)]:
        np.testing.assert_array_equal(index.ok_range(a, b), ok[a:b])
    assert {name for name, _ in reads} == {"images/ok"}
    with pytest.raises(IndexError, match="out of range"):
        index.ok_range(5, store.num_images + 1)
