"""The plan stream as it was when it held the whole index (``ok``, ``grid`` of every image) in memory.

Kept verbatim as the reference the per-unit stream (``storage.index``, ``storage.streaming``,
``train.data.PlanStream``) must reproduce: a run resumed on new code replays the order it was started with.
"""

from __future__ import annotations

import numpy as np

from train.packing import pack_stream, padded_stream


def shuffled_order(num_rows, unit_rows, *, seed, epoch, buffer):
    rng = np.random.default_rng([seed, epoch])
    units = rng.permutation(-(-num_rows // unit_rows))
    reservoir = []
    for unit in units:
        rows = np.arange(unit * unit_rows, min(num_rows, (unit + 1) * unit_rows))
        rng.shuffle(rows)
        slots = rng.integers(0, buffer, size=len(rows))
        for row, slot in zip(rows.tolist(), slots.tolist()):
            if len(reservoir) < buffer:
                reservoir.append(row)
                continue
            yield reservoir[slot]
            reservoir[slot] = row
    rng.shuffle(reservoir)
    yield from reservoir


def epoch_stream(valid, unit_rows, *, seed, buffer, start_epoch=0):
    valid = np.asarray(valid, bool)
    if not valid.any():
        raise ValueError("the store has no usable image (all failed to decode)")
    epoch = start_epoch
    while True:
        for row in shuffled_order(len(valid), unit_rows, seed=seed, epoch=epoch, buffer=buffer):
            if valid[row]:
                yield epoch, row
        epoch += 1


def mixture_stream(streams, weights, *, seed, block=4096):
    if len(streams) == 1:
        for epoch, row in streams[0]:
            yield 0, epoch, row
        return
    p = np.asarray(weights, np.float64) / float(np.sum(weights))
    rng = np.random.default_rng([seed, 0x6D6978])
    while True:
        for source in rng.choice(len(streams), size=block, p=p).tolist():
            epoch, row = next(streams[source])
            yield source, epoch, row


def microbatches(ok, grid, cfg, *, registers, seed, parts):
    """``PlanStream(ok, grid, ..., parts=parts).microbatches()`` of the whole-array version; ``parts``:
    (start, stop, unit_rows, weight) of each store in the concatenated rows."""
    prefix = 1 + registers
    streams = [epoch_stream(ok[a:b], u, seed=seed if k == 0 else seed + 7919 * k, buffer=cfg.shuffle_buffer)
               for k, (a, b, u, _) in enumerate(parts)]
    stream = ((e, parts[s][0] + r) for s, e, r in mixture_stream(streams, [p[3] for p in parts], seed=seed))
    tokens_of = lambda row: prefix + int(grid[row, 0]) * int(grid[row, 1])  # noqa: E731
    if cfg.mode == "padded":
        return padded_stream(stream, tokens_of, images=cfg.padded_images)
    return pack_stream(stream, tokens_of, seq_len=cfg.seq_len, seqs=cfg.seqs_per_batch,
                       max_images=cfg.max_images_per_seq)
