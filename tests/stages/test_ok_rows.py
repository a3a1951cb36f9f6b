"""OkRowMap answers like np.flatnonzero(ok) while holding 8 B per block, and reads only the blocks it touches."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr

from stages.ok_rows import OkRowMap, OkRows


def _flags(n: int, seed: int) -> np.ndarray:
    """About 30% failed rows, plus runs of failures that empty whole blocks and both ends of the pool."""
    rng = np.random.default_rng(seed)
    ok = rng.random(n) > 0.3
    ok[:5] = False
    ok[-3:] = False
    ok[40:120] = False  # several whole blocks at the small block sizes
    return ok


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
def test_every_lookup_equals_flatnonzero(block_rows, tmp_path):
    ok = _flags(1000, seed=block_rows)
    stored = ok  # one-row blocks on numpy (a zarr read per row is slow), zarr otherwise
    if block_rows > 1:
        stored = zarr.create_array(str(tmp_path / "ok"), shape=ok.shape, chunks=(16,), dtype=bool)
        stored[:] = ok
    expected = np.flatnonzero(ok)
    rows = OkRowMap(stored, block_rows=block_rows)
    assert len(rows) == expected.size and not rows.all_ok
    for a in range(0, expected.size + 3, 37):
        for b in range(a, expected.size + 3, 53):
            np.testing.assert_array_equal(rows[a:b], expected[a:b])
    np.testing.assert_array_equal(rows[:], expected)
    np.testing.assert_array_equal(rows[-10:], expected[-10:])
    rng = np.random.default_rng(0)
    ranks = rng.integers(-expected.size, expected.size, size=(50, 7))  # any order, negatives, repeats, 2-D
    np.testing.assert_array_equal(rows[ranks], expected[ranks])
    assert rows[0] == expected[0] and rows[-1] == expected[-1] and isinstance(rows[3], int)
    assert rows[np.zeros(0, np.int64)].shape == (0,)
    with pytest.raises(IndexError, match="out of range"):
        rows[np.array([expected.size])]
    with pytest.raises(TypeError, match="contiguous"):
        rows[::2]
    for bad in (ok, np.array([1.7]), True):  # a mask, floats, a bool: not ranks (numpy would mask or refuse)
        with pytest.raises(TypeError, match="integer ranks"):
            rows[bad]
    assert rows[np.int32(4)] == expected[4] and rows[np.uint8(2)] == expected[2]
    with pytest.raises(ValueError, match="positive"):
        OkRowMap(stored, block_rows=0)


def test_a_pool_without_failures_is_all_ok_and_an_all_failed_pool_is_empty():
    assert OkRowMap(np.ones(100, bool), block_rows=8).all_ok
    empty = OkRowMap(np.zeros(100, bool), block_rows=8)
    assert len(empty) == 0 and empty[:].size == 0


def test_ok_rows_view_reads_the_embeddings_of_the_decodable_rows(tmp_path):
    ok = _flags(500, seed=3)
    x = np.random.default_rng(1).standard_normal((500, 6)).astype(np.float32)
    emb = zarr.create_array(str(tmp_path / "emb"), shape=x.shape, chunks=(32, 6), dtype="float32")
    emb[:] = x
    view = OkRows(emb, OkRowMap(ok, block_rows=50))
    kept = x[np.flatnonzero(ok)]
    assert view.shape == kept.shape and len(view) == len(kept)
    for a, b in [(0, 10), (17, 240), (0, len(kept)), (len(kept) - 1, len(kept) + 5), (30, 30)]:
        np.testing.assert_array_equal(view[a:b], kept[a:b])


def test_memory_and_reads_are_bounded_by_blocks_not_the_pool(tmp_path):
    """4M pool rows in zarr: the map holds 62 block counts, not 29 MB of row indices; a lookup of 10,000
    scattered ranks reads each touched block of flags once."""
    n, block = 4_000_000, 65_536
    ok = zarr.create_array(str(tmp_path / "ok"), shape=(n,), chunks=(block,), dtype=bool)
    flags = np.random.default_rng(2).random(n) > 0.1
    ok[:] = flags
    expected_size = int(flags.sum())
    ranks = np.random.default_rng(3).integers(0, expected_size, 10_000)
    expected = np.flatnonzero(flags)[ranks]
    del flags
    tracemalloc.start()
    rows = OkRowMap(ok, block_rows=block)
    got = rows[ranks]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(got, expected)
    assert rows.block_starts.nbytes == 8 * (-(-n // block) + 1)
    assert peak < 4e6, peak  # the rank lookup, one block of flags and its rows: np.flatnonzero alone is 29 MB
    touched = np.unique(np.searchsorted(rows.block_starts, ranks, side="right") - 1).size
    assert rows.blocks_read == touched


def test_an_ascending_lookup_of_every_rank_takes_the_memory_of_its_answer():
    """The level-1 fit of a whole pool maps every rank (np.arange): no sort and no whole-size temporaries beyond
    the answer (8 B a rank), where a sort-based lookup held 56 B a rank (measured in review)."""
    n = 3_000_000
    ok = np.random.default_rng(5).random(n) > 0.1
    rows = OkRowMap(ok, block_rows=1 << 16)
    ranks = np.arange(len(rows))
    tracemalloc.start()
    got = rows[ranks]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(got, np.flatnonzero(ok))
    assert peak < 8 * ranks.size + 12e6, peak / ranks.size  # the answer, one piece's temporaries, the order check
