"""Shuffled streaming order over a store: shuffle the shards, then mix through a bounded buffer.

A global permutation of billions of indices does not fit a worker, and reading rows in random order
defeats the shard layout. Like webdataset/MosaicML streaming we shuffle at two levels: the order of the
write units (whole shards, so a reader touches a few shards at a time), the rows inside each unit, and
a reservoir of ``buffer`` rows that mixes neighbouring units. Memory is O(units + buffer); the order
is a pure function of ``(seed, epoch)``, so a resumed run replays exactly the same sequence.

What a row carries (whether it is usable, its token count) is looked up per unit as the unit enters the
reservoir and travels with the row, so the stream never needs the store's whole index, only one unit's.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

__all__ = ["shuffled_order", "shuffled_units", "epoch_stream", "mixture_stream"]


def shuffled_units(num_rows: int, unit_rows: int, *, seed: int, epoch: int, buffer: int,
                   unit_values: Callable[[int], np.ndarray]) -> Iterator[tuple[int, int]]:
    """(row, value) for rows ``0..num_rows-1``, each exactly once, in a seeded shard-then-buffer shuffled
    order; ``unit_values(u)`` gives the values of unit u's rows, asked once, when the unit is reached."""
    if num_rows < 0 or unit_rows <= 0 or buffer <= 0:
        raise ValueError(f"bad stream shape: num_rows={num_rows}, unit_rows={unit_rows}, buffer={buffer}")
    rng = np.random.default_rng([seed, epoch])
    units = rng.permutation(-(-num_rows // unit_rows))
    reservoir: list[tuple[int, int]] = []  # the shuffles below permute by length alone: same order as plain rows
    for unit in units:  # an array: 8 B a unit (a list of ints would take 36)
        start = int(unit) * unit_rows
        rows = np.arange(start, min(num_rows, start + unit_rows))
        rng.shuffle(rows)
        slots = rng.integers(0, buffer, size=len(rows))  # drawn per unit: one RNG call, not one per row
        values = np.asarray(unit_values(int(unit)))[rows - start]
        for item, slot in zip(zip(rows.tolist(), values.tolist()), slots.tolist()):
            if len(reservoir) < buffer:
                reservoir.append(item)
                continue
            yield reservoir[slot]
            reservoir[slot] = item
    rng.shuffle(reservoir)
    yield from reservoir


def shuffled_order(num_rows: int, unit_rows: int, *, seed: int, epoch: int, buffer: int) -> Iterator[int]:
    """Row indices ``0..num_rows-1``, each exactly once, in a seeded shard-then-buffer shuffled order."""
    zeros = np.zeros(unit_rows, np.int64)
    for row, _ in shuffled_units(num_rows, unit_rows, seed=seed, epoch=epoch, buffer=buffer,
                                 unit_values=lambda u: zeros):
        yield row


def epoch_stream(unit_values: Callable[[int], np.ndarray], num_rows: int, unit_rows: int, *, seed: int, buffer: int,
                 start_epoch: int = 0) -> Iterator[tuple[int, int, int]]:
    """(epoch, row, value) forever: every epoch visits each row whose value is >= 0 once, in its own order.

    ``unit_values(u)`` gives unit u's values (e.g. token counts, -1 for a failed image), read once per
    epoch when the stream reaches the unit: the stream holds O(buffer) values, never the store's."""
    epoch = start_epoch
    while True:
        seen = False
        for row, value in shuffled_units(num_rows, unit_rows, seed=seed, epoch=epoch, buffer=buffer,
                                         unit_values=unit_values):
            if value >= 0:
                seen = True
                yield epoch, row, value
        if not seen:
            raise ValueError("the store has no usable image (all failed to decode)")
        epoch += 1


def mixture_stream(streams: list[Iterator[tuple]], weights: list[float], *, seed: int,
                   block: int = 4096) -> Iterator[tuple]:
    """(source, *item) forever (items of ``epoch_stream``: epoch, row, value): each item comes from source s
    with probability w_s / Σw.

    The source of every position is drawn from its own seeded generator in blocks, so the interleaving
    is a pure function of (seed, weights) and a resumed run replays it exactly; each source keeps its
    own order (its own epochs), so a store drawn more often just cycles through its epochs faster.
    One source: its stream as is.
    """
    if len(streams) != len(weights) or not streams or any(not (w > 0) for w in weights):
        raise ValueError(f"a mixture needs one positive weight per source, got {weights}")
    if len(streams) == 1:
        for item in streams[0]:
            yield 0, *item
        return
    p = np.asarray(weights, np.float64) / float(np.sum(weights))
    rng = np.random.default_rng([seed, 0x6D6978])  # "mix": apart from the per-source shuffles
    while True:
        for source in rng.choice(len(streams), size=block, p=p).tolist():
            yield source, *next(streams[source])
