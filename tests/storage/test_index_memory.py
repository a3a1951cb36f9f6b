"""Training memory does not grow with the store: the data path of a 1M-image store allocates what a 10k-image
store's does (issue 16). The whole index would cost ~25 B per image (ok, grid, pixel and token offsets, labels)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

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
    return {n: write_synthetic_store(str(root / f"n{n}"), n, shard_images=4096, failed_every=97) for n in (SMALL, LARGE)}


def test_a_million_image_store_trains_in_the_memory_of_a_small_one(sized_stores):
    data_path_peak(sized_stores[SMALL], batches=2)  # imports and first-use caches, outside the comparison
    small, large = data_path_peak(sized_stores[SMALL]), data_path_peak(sized_stores[LARGE])
    grown = large - small
    # the whole index of the extra 990k images would be ~25 MB; allow 1 B an image (unit permutation, zarr metadata)
    assert grown < (LARGE - SMALL) * 1, (f"the data path's peak grew by {grown / 1e6:.1f} MB from {SMALL} to {LARGE} "
                                          f"images ({small / 1e6:.1f} -> {large / 1e6:.1f} MB): something holds the "
                                          "whole index")
