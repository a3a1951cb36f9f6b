"""Shuffled streaming order over a store: shuffle the shards, then mix through a bounded buffer.

A global permutation of billions of indices does not fit a worker, and reading rows in random order
defeats the shard layout. Like webdataset/MosaicML streaming we shuffle at two levels: the order of the
write units (whole shards, so a reader touches a few shards at a time), the rows inside each unit, and
a reservoir of ``buffer`` rows that mixes neighbouring units. Memory is O(units + buffer); the order
is a pure function of ``(seed, epoch)``, so a resumed run replays exactly the same sequence.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["shuffled_order", "epoch_stream", "mixture_stream"]


def shuffled_order(num_rows: int, unit_rows: int, *, seed: int, epoch: int, buffer: int) -> Iterator[int]:
    """Row indices ``0..num_rows-1``, each exactly once, in a seeded shard-then-buffer shuffled order."""
    if num_rows < 0 or unit_rows <= 0 or buffer <= 0:
        raise ValueError(f"bad stream shape: num_rows={num_rows}, unit_rows={unit_rows}, buffer={buffer}")
    rng = np.random.default_rng([seed, epoch])
    units = rng.permutation(-(-num_rows // unit_rows))
    reservoir: list[int] = []
    for unit in units:
        rows = np.arange(unit * unit_rows, min(num_rows, (unit + 1) * unit_rows))
        rng.shuffle(rows)
        slots = rng.integers(0, buffer, size=len(rows))  # drawn per unit: one RNG call, not one per row
        for row, slot in zip(rows.tolist(), slots.tolist()):
            if len(reservoir) < buffer:
                reservoir.append(row)
                continue
            yield reservoir[slot]
            reservoir[slot] = row
    rng.shuffle(reservoir)
    yield from reservoir


def epoch_stream(valid: np.ndarray, unit_rows: int, *, seed: int, buffer: int, start_epoch: int = 0
                 ) -> Iterator[tuple[int, int]]:
    """(epoch, row) forever: every epoch visits each row with ``valid[row]`` once, in its own order."""
    valid = np.asarray(valid, bool)
    if not valid.any():
        raise ValueError("the store has no usable image (all failed to decode)")
    epoch = start_epoch
    while True:
        for row in shuffled_order(len(valid), unit_rows, seed=seed, epoch=epoch, buffer=buffer):
            if valid[row]:
                yield epoch, row
        epoch += 1


def mixture_stream(streams: list[Iterator[tuple[int, int]]], weights: list[float], *, seed: int,
                   block: int = 4096) -> Iterator[tuple[int, int, int]]:
    """(source, epoch, row) forever: each item comes from source s with probability w_s / Σw.

    The source of every position is drawn from its own seeded generator in blocks, so the interleaving
    is a pure function of (seed, weights) and a resumed run replays it exactly; each source keeps its
    own order (its own epochs), so a store drawn more often just cycles through its epochs faster.
    One source: its stream as is.
    """
    if len(streams) != len(weights) or not streams or any(not (w > 0) for w in weights):
        raise ValueError(f"a mixture needs one positive weight per source, got {weights}")
    if len(streams) == 1:
        for epoch, row in streams[0]:
            yield 0, epoch, row
        return
    p = np.asarray(weights, np.float64) / float(np.sum(weights))
    rng = np.random.default_rng([seed, 0x6D6978])  # "mix": apart from the per-source shuffles
    while True:
        for source in rng.choice(len(streams), size=block, p=p).tolist():
            epoch, row = next(streams[source])
            yield source, epoch, row
