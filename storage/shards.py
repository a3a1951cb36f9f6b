"""Which worker writes what: the ownership rule that makes writes atomic and resumable.

Work is split into *units* of ``shard_images`` consecutive images. A unit owns the zarr shards of
every per-image array ([N, ...] arrays are sharded by ``shard_images`` along axis 0) for its image
range. Flat token/byte arrays ([T, D] patches, [B] pixels) are sharded by a fixed number of rows, so
their shard boundaries do not line up with image boundaries. Unit ``u`` owns the flat rows
``[ceil(start_u), ceil(start_{u+1}))`` where ``start_u`` is the first row of its first image and
``ceil`` rounds up to a shard boundary (the last unit owns through the end). Owned row ranges are
disjoint, cover everything, and are whole shards, so no two writers ever touch one object. To fill
its rows, a unit also computes the images past its range whose rows spill into its last shard: at
most one shard's rows, so a shard must be small against a unit (``flat_shard_rows``) or units
recompute their neighbours' images (16384-row shards under 18k-row units computed 1.47x the images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShardPlan", "ceil_to", "flat_shard_rows", "images_for_rows"]


def ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def flat_shard_rows(offsets: np.ndarray, shard_images: int, chunk_rows: int, *, shards_per_unit: int = 16,
                    max_rows: int = 16384) -> int:
    """Rows per shard of a flat array, sized to the data: a unit of ``shard_images`` images of mean size
    spans about ``shards_per_unit`` shards, so the images it computes beyond its range (at most one
    shard's rows) add at most ~1/shards_per_unit to its work. A multiple of ``chunk_rows`` (at least
    one chunk), at most ``max_rows``."""
    if chunk_rows <= 0 or shard_images <= 0 or shards_per_unit <= 0:
        raise ValueError("chunk_rows, shard_images and shards_per_unit must be positive")
    num_images = max(1, len(offsets) - 1)
    rows_per_unit = float(offsets[-1]) / num_images * shard_images
    rows = int(rows_per_unit / shards_per_unit) // chunk_rows * chunk_rows
    return max(chunk_rows, min(rows, max_rows // chunk_rows * chunk_rows))


def images_for_rows(offsets: np.ndarray, r0: int, r1: int) -> tuple[int, int]:
    """Smallest image range [i0, i1) whose rows cover [r0, r1) (empty range when r0 >= r1)."""
    if r0 >= r1:
        return 0, 0
    # image i covers rows [offsets[i], offsets[i+1]); zero-row images are skipped naturally
    # the array's own method: the whole array, or storage.index.UnitOffsets that reads only the units it needs
    i0 = int(offsets.searchsorted(r0, side="right")) - 1
    i1 = int(offsets.searchsorted(r1, side="left"))
    return max(i0, 0), min(i1, len(offsets) - 1)


@dataclass(frozen=True)
class ShardPlan:
    """Static partition of N images into write units (see module docstring)."""

    num_images: int
    shard_images: int

    def __post_init__(self) -> None:
        if self.shard_images <= 0:
            raise ValueError(f"shard_images must be positive, got {self.shard_images}")

    @property
    def num_units(self) -> int:
        return max(1, ceil_to(self.num_images, self.shard_images) // self.shard_images)

    def image_range(self, unit: int) -> tuple[int, int]:
        self._check(unit)
        return unit * self.shard_images, min((unit + 1) * self.shard_images, self.num_images)

    def owned_rows(self, unit: int, offsets: np.ndarray, shard_rows: int) -> tuple[int, int]:
        """Rows [r0, r1) of a flat array (rows of image i: offsets[i]:offsets[i+1]) that ``unit`` writes."""
        self._check(unit)
        total = int(offsets[-1])
        i0, i1 = self.image_range(unit)
        r0 = 0 if unit == 0 else min(ceil_to(int(offsets[i0]), shard_rows), total)
        r1 = total if unit == self.num_units - 1 else min(ceil_to(int(offsets[i1]), shard_rows), total)
        return r0, max(r0, r1)

    def work_range(self, unit: int, offsets_list: list[np.ndarray], shard_rows_list: list[int]) -> tuple[int, int]:
        """Images a unit must compute: its own range plus those feeding its owned flat rows."""
        i0, i1 = self.image_range(unit)
        for offsets, shard_rows in zip(offsets_list, shard_rows_list):
            r0, r1 = self.owned_rows(unit, offsets, shard_rows)
            j0, j1 = images_for_rows(offsets, r0, r1)
            if j1 > j0:
                i0, i1 = min(i0, j0), max(i1, j1)
        return i0, i1

    def _check(self, unit: int) -> None:
        if not 0 <= unit < self.num_units:
            raise IndexError(f"unit {unit} out of range [0, {self.num_units})")
