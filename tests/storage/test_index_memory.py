"""Training memory does not grow with the store: the data path of a 1M-image store allocates what a 10k-image
store's does (issue 16). The whole index would cost ~25 B per image (ok, grid, pixel and token offsets, labels)."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import zarr

from synthetic_store import TEACHER, write_synthetic_store
from train.config import DataConfig
from train.data import PlanStream, StoreBatches

SMALL, LARGE, BATCHES = 10_000, 1_000_000, 20


def data_path_peak(url: str, batches: int = BATCHES) -> int:
    """Peak bytes traced (numpy's buffers included) while opening the store, building the plan stream as the
    trainer does (``train.trainer._batches``) and loading ``batches`` microbatches through ``StoreBatches``."""
    cfg = DataConfig(seq_len=64, seqs_per_batch=4, max_images_per_seq=16, workers=0)
    gc.collect()
    tracemalloc.start()
    try:
        dataset = StoreBatches(url, [TEACHER], cfg, patch=16, registers=0, seed=0)
        plans = PlanStream(dataset.reader.indexes, cfg, registers=0, seed=0).steps(0)
        for _ in range(batches):
            batch = dataset[next(plans)]
            assert batch["pixels"].shape[0] == batch["real_tokens"] - batch["layout"].num_images  # 1 patch an image
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def sized_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_memory")
    # 1x1-token images, one failure in 97, 4096 images a unit (few files, so 1M rows are written in seconds)
    # pixel shards of 256 kB: verify reads an object at a time, and the index, not the pixels, is under test
    return {n: write_synthetic_store(str(root / f"n{n}"), n, shard_images=4096, failed_every=97, strings=True,
                                     pixel_shard_bytes=1 << 18) for n in (SMALL, LARGE)}


def test_a_million_image_store_trains_in_the_memory_of_a_small_one(sized_stores):
    data_path_peak(sized_stores[SMALL], batches=2)  # imports and first-use caches, outside the comparison
    small, large = data_path_peak(sized_stores[SMALL]), data_path_peak(sized_stores[LARGE])
    grown = large - small
    # the whole index of the extra 990k images would be ~25 MB; allow 1 B an image (unit permutation, zarr metadata)
    assert grown < (LARGE - SMALL) * 1, (f"the data path's peak grew by {grown / 1e6:.1f} MB from {SMALL} to {LARGE} "
                                          f"images ({small / 1e6:.1f} -> {large / 1e6:.1f} MB): something holds the "
                                          "whole index")


def _peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_inspect_and_verify_of_a_million_image_store_take_the_memory_of_a_small_one(sized_stores, monkeypatch):
    """`pipeline inspect` and `inspect --verify` read the index a block of units at a time: the whole of ok, grid,
    pixel and token offsets would be 25 MB more at 1M images. Every unit is committed, so verify visits all.
    Passes over the index read 16 units (65,536 images) at a time here: at the default 256 the block would be
    the whole 1M-image store."""
    import storage.index

    monkeypatch.setattr(storage.index, "UNITS_PER_READ", 16)
    from storage.inspect import describe_store
    from storage.store import FeatureStore
    from storage.verify import verify_store

    facts = {}
    for n, url in sized_stores.items():
        store = FeatureStore.open(url, mode="r+")
        for unit in range(store.plan().num_units):  # the synthetic writer leaves no markers
            store.image_commits().commit(unit)
            store.teacher_commits(TEACHER).commit(unit)
        facts[n] = describe_store(url)
    # the counts equal the synthetic writer's: one image in 97 failed, one token per usable image
    for n, f in facts.items():
        usable = n - n // 97
        assert f["images"]["count"] == n and f["images"]["failed"] == n // 97
        assert f["images"]["tokens_per_image"] == {"min": 1, "mean": 1.0, "max": 1, "total": usable}
    report = verify_store(sized_stores[LARGE])
    assert not report.damaged and report.units_checked == 2 * FeatureStore.open(sized_stores[LARGE]).plan().num_units
    # bounded by one read of 65,536 images (ok, grid, labels and their token counts: about 1.6 MB) and, for
    # inspect, the failure table (10,309 reasons): ok, grid, labels and the offsets whole would be 25-40 MB
    for fn in (describe_store, verify_store):
        fn(sized_stores[SMALL])  # first-use caches
        large = _peak(lambda: fn(sized_stores[LARGE]))
        assert large < 4e6, (fn.__name__, large / 1e6)


def test_inspect_counts_in_blocks_equal_the_whole_arrays(tmp_path, monkeypatch):
    """Varied grids, failures and labels, read one unit of 8 images at a time: the counts equal numpy's on the
    whole arrays (the last unit's smallest grid is not the store's: a min over the last read alone is caught)."""
    import storage.index
    from storage.inspect import describe_store

    monkeypatch.setattr(storage.index, "UNITS_PER_READ", 1)
    url = write_synthetic_store(str(tmp_path / "s"), 1000, shard_images=8, max_side=4, failed_every=7, seed=5)
    g = zarr.open_group(url, mode="r")
    ok, grid, labels = g["images/ok"][:], g["images/grid"][:], g["labels"][:]
    tokens = (grid[:, 0].astype(np.int64) * grid[:, 1])[ok]
    facts = describe_store(url)["images"]
    assert facts["count"] == 1000 and facts["failed"] == int((~ok).sum()) and facts["labels"] == int((labels >= 0).sum())
    assert facts["tokens_per_image"] == {"min": int(tokens.min()), "mean": pytest.approx(float(tokens.mean())),
                                         "max": int(tokens.max()), "total": int(tokens.sum())}
    last = (grid[-8:, 0].astype(np.int64) * grid[-8:, 1])[ok[-8:]]
    assert tokens.min() == 1 and tokens.max() == 16 and last.min() > 1 and last.max() < 16  # the grids do vary
