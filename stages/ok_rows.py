"""The decodable rows of a curation pool, without holding a row map of the whole pool.

The clustering sees only the images that decoded: its row r is the r-th row whose ``pool/ok`` flag is set.
``np.flatnonzero(ok)`` maps every such rank to its pool row but costs 8 B per pool row in the driver
(18 GB at 2.3B images, plus the flags); :class:`OkRowMap` keeps 8 B per block of ``block_rows`` pool rows
(the count of decodable rows before it) and reads the flags of the blocks a lookup touches, one block
cached. :class:`OkRows` is the embeddings seen through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["OkRowMap", "OkRows"]

DEFAULT_BLOCK_ROWS = 1 << 20  # 1 MB of flags a read; 8 B of counts per block (18 kB at 2.3B rows)


class OkRowMap:
    """Rank → pool row of the rows whose ``ok`` flag (a 1-D bool zarr or numpy array) is set, indexable like
    ``np.flatnonzero(ok)``: an int, a contiguous slice or an int array (any order; negative ranks count from
    the end). One pass over ``ok`` at construction counts the decodable rows per block."""

    def __init__(self, ok: Any, block_rows: int = DEFAULT_BLOCK_ROWS):
        if int(block_rows) < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.ok, self.block_rows = ok, int(block_rows)
        self.num_pool = int(ok.shape[0])
        counts = [int(np.count_nonzero(np.asarray(ok[a: a + self.block_rows])))
                  for a in range(0, self.num_pool, self.block_rows)]
        self.block_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None
        self.blocks_read = 0  # flag blocks read by lookups (tests bound it)

    def __len__(self) -> int:
        return int(self.block_starts[-1])

    @property
    def all_ok(self) -> bool:
        return len(self) == self.num_pool

    def _block_rows(self, block: int) -> np.ndarray:
        """Pool rows of the decodable rows of ``block``, ascending."""
        if self._cached is None or self._cached[0] != block:
            start = block * self.block_rows
            flags = np.asarray(self.ok[start: start + self.block_rows])
            self._cached = (block, np.flatnonzero(flags).astype(np.int64) + start)
            self.blocks_read += 1
        return self._cached[1]

    def _sorted_lookup(self, ranks: np.ndarray) -> np.ndarray:
        out = np.empty(ranks.size, np.int64)
        blocks = np.searchsorted(self.block_starts, ranks, side="right") - 1
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [ranks.size]])):
            if lo == hi:
                continue
            block = int(blocks[lo])
            out[lo:hi] = self._block_rows(block)[ranks[lo:hi] - self.block_starts[block]]
        return out

    def __getitem__(self, key: Any) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise TypeError("OkRowMap supports contiguous slices only")
            return self._lookup(np.arange(start, max(start, stop), dtype=np.int64))
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return int(self[np.array([key])][0])
        ranks = np.asarray(key)
        if ranks.dtype.kind not in "iu":  # a mask or floats would be read as ranks 0/1 or truncated
            raise TypeError(f"OkRowMap takes integer ranks or a slice, not {ranks.dtype} values")
        ranks = ranks.astype(np.int64, copy=False)
        if ranks.size and ranks.min() < 0:
            ranks = np.where(ranks < 0, ranks + n, ranks)
        if ranks.size and (ranks.min() < 0 or ranks.max() >= n):
            raise IndexError(f"rank out of range for {n} decodable rows")
        flat = ranks.ravel()
        if flat.size < 2 or bool((flat[1:] >= flat[:-1]).all()):  # ascending (a fit sample, every row): no sort
            return self._lookup(flat).reshape(ranks.shape)
        order = np.argsort(flat, kind="stable")
        out = np.empty(flat.size, np.int64)
        out[order] = self._lookup(flat[order])
        return out.reshape(ranks.shape)

    def _lookup(self, ranks: np.ndarray, piece: int = 1 << 16) -> np.ndarray:
        """Pool rows of ascending ``ranks``, a piece at a time (temporaries bounded by the piece, not the call)."""
        out = np.empty(ranks.size, np.int64)
        for a in range(0, ranks.size, piece):
            out[a: a + piece] = self._sorted_lookup(ranks[a: a + piece])
        return out


class OkRows:
    """Read-only view of the rows of a 2-D (zarr) array listed in ``rows`` (ascending pool rows: an
    :class:`OkRowMap` or an array), sliceable like an array: ``view[a:b]`` reads only the underlying block
    that spans those rows. The curation code reads embeddings only by contiguous slices, so the failed
    images drop out without a copy."""

    def __init__(self, array: Any, rows: Any):
        self.array = array
        self.rows = rows if isinstance(rows, OkRowMap) else np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), int(array.shape[1]))
        self.dtype = array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("OkRows supports contiguous slices only")
        rows = self.rows[key]
        if rows.size == 0:
            return np.zeros((0, self.shape[1]), dtype=self.dtype)
        block = np.asarray(self.array[int(rows[0]): int(rows[-1]) + 1])
        return block[rows - rows[0]]
