"""The k smallest keys of every group over a stream of blocks, in memory bounded by the answer.

Balanced sampling keeps, per level-1 cluster, the ``count`` points with the smallest keys; the curation
metrics keep the ``m`` rows with the smallest keys overall (one group). Over a pool read a block at a
time, a block's rows that cannot beat a full group's worst kept key are dropped at once, and the others
are merged with the kept ones in batches of at least the answer's size, so a pass costs one look at
every row plus a few sorts of the answer (random keys: about 1 + ln(N / answer) merges), and holds the
answer, one batch and one block.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SmallestPerGroup"]


class SmallestPerGroup:
    """The ``counts[g]`` smallest ``(key, row)`` of every group g among the rows offered (ties: the lower row),
    each with a payload (e.g. its cluster label)."""

    def __init__(self, counts: np.ndarray, merge_rows: int = 4096):
        self.counts = np.asarray(counts, np.int64)
        if self.counts.size and self.counts.min() < 0:
            raise ValueError("counts must be >= 0")
        self.merge_rows = max(int(self.counts.sum()), int(merge_rows), 1)
        # a full group's worst kept key: rows above it cannot enter (inf until the group is full; -inf: count 0)
        self.worst = np.where(self.counts > 0, np.inf, -np.inf)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))
        self._kept = empty
        self._batch: list[tuple[np.ndarray, ...]] = []
        self._batched = 0

    def offer(self, rows: np.ndarray, groups: np.ndarray, keys: np.ndarray, payload: np.ndarray) -> None:
        groups = np.asarray(groups, np.int64)
        keys = np.asarray(keys, np.float64)
        take = keys <= self.worst[groups]  # equal keys are kept for the merge: a lower row wins the tie there
        if not take.any():
            return
        part = (np.asarray(rows, np.int64)[take], groups[take], keys[take], np.asarray(payload, np.int64)[take])
        self._batch.append(part)
        self._batched += part[0].size
        if self._batched >= self.merge_rows:
            self._merge()

    def _merge(self) -> None:
        rows, groups, keys, payload = (np.concatenate([k[i] for k in [self._kept, *self._batch]]) for i in range(4))
        self._batch, self._batched = [], 0
        order = np.lexsort((rows, keys, groups))  # by group, then key, ties by row
        g = groups[order]
        first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if g.size else np.zeros(0, np.int64)
        start_of = np.repeat(first, np.diff(np.r_[first, g.size]))
        keep = order[np.arange(g.size) - start_of < self.counts[g]]
        self._kept = (rows[keep], groups[keep], keys[keep], payload[keep])
        kg, kk = self._kept[1], self._kept[2]
        if kg.size:  # the kept rows stay sorted by (group, key): each group's last is its worst
            last = np.flatnonzero(np.r_[kg[1:] != kg[:-1], True])
            firsts = np.r_[0, last[:-1] + 1]
            full = (last - firsts + 1) == self.counts[kg[last]]
            self.worst[kg[last[full]]] = kk[last[full]]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows sorted, their payloads) of every group's smallest."""
        self._merge()
        rows, _, _, payload = self._kept
        order = np.argsort(rows, kind="stable")
        return rows[order], payload[order]
