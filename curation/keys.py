"""Random keys that belong to rows, not to the order rows are read in.

A selection made block by block over a pool in zarr (``curation.sampling``, ``curation.metrics``) must
equal the whole-array one, so a row's random key is a hash of (seed, stream, row), not the next draw
of a generator.
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_keys"]

_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014), elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def row_keys(rows: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A uniform key in [0, 1) (float64, 53 random bits) per row, a pure function of (seed, stream, row).

    Why a hash and not ``rng.random(N)``: the key of row i must not depend on which block row i is read
    in, so that a selection made block by block (a pool in zarr) equals the whole-array one."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([(int(seed) * 0x632BE59BD9B4E019 + int(stream)) % 2**64], np.uint64))[0]
        z = _splitmix64(np.asarray(rows, np.int64).astype(np.uint64) * _GOLDEN + base)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
