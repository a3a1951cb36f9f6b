"""The per-image index of a store (ok, grid, pixel and token offsets, labels), read one write unit at a time.

Training needs, per image, whether it decoded, its token grid and where its bytes and tokens lie in the
flat arrays. Held whole that is ~25 B per image in every process (5 GB at 200M images). Every per-image
array is chunked by write unit, so one unit's index is one chunk per array: ``StoreIndex`` reads units when
asked and keeps the last few, so memory is bounded by the units in flight, as for the targets themselves.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from . import layout as L
from .store import StoreError, token_counts

__all__ = ["ArrayIndex", "IndexRows", "StoreIndex", "UnitIndex", "UnitOffsets", "DEFAULT_CACHE_UNITS", "UNITS_PER_READ", "array_offsets", "plain_select",
           "pixel_offsets", "token_offsets"]

DEFAULT_CACHE_UNITS = 64  # units kept per reader: a shuffle buffer spans a few units, a batch fewer


class UnitIndex:
    """Rows ``start:stop`` of the index (one write unit); each array is read on first use, so the plan
    stream, which needs only ``ok`` and ``grid``, reads only those."""

    def __init__(self, start: int, stop: int, read: Callable[[str, "UnitIndex"], np.ndarray]):
        self.start, self.stop, self._read = start, stop, read

    @cached_property
    def ok(self) -> np.ndarray:  # [n] bool
        return self._read(L.OK, self)

    @cached_property
    def grid(self) -> np.ndarray:  # [n, 2] int32
        return self._read(L.GRID, self)

    @cached_property
    def pixel_offsets(self) -> np.ndarray:  # [n + 1] int64, absolute: image start+k is pixels[po[k]:po[k+1]]
        return self._read(L.PIXEL_OFFSETS, self)

    @cached_property
    def token_offsets(self) -> np.ndarray:  # [n + 1] int64, absolute, shared by every teacher's flat arrays
        return self._read(L.OFFSETS, self)

    @cached_property
    def labels(self) -> np.ndarray:  # [n] int32, -1 where unknown (or the store has no labels)
        return self._read(L.LABELS, self)

    def tokens(self) -> np.ndarray:
        """Patch tokens of each image: gh·gw, 0 for a failed image (the contract of every ``offsets``)."""
        return token_counts(self.ok, self.grid)


@dataclass(frozen=True)
class IndexRows:
    """The index of arbitrary rows (a batch), gathered from their units."""

    ok: np.ndarray
    grid: np.ndarray
    pixels: tuple[np.ndarray, np.ndarray]  # start, stop in images/pixels
    tokens: tuple[np.ndarray, np.ndarray] | None  # start, stop in every teacher's patches (when asked for)
    labels: np.ndarray


class _Units:
    """Units by number, the ``capacity`` most recently used kept (thread-safe)."""

    def __init__(self, num_rows: int, unit_rows: int, capacity: int, read):
        if unit_rows <= 0 or capacity <= 0:
            raise ValueError(f"bad index shape: unit_rows={unit_rows}, capacity={capacity}")
        self.num_rows, self.unit_rows, self.capacity, self._read = num_rows, unit_rows, capacity, read
        self.name = "the store"  # for messages: a StoreIndex names its URL
        self._cache: OrderedDict[int, UnitIndex] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_units(self) -> int:
        return -(-self.num_rows // self.unit_rows)

    def __len__(self) -> int:
        return self.num_rows

    def unit(self, u: int) -> UnitIndex:
        with self._lock:
            hit = self._cache.get(u)
            if hit is not None:
                self._cache.move_to_end(u)
                return hit
            if not 0 <= u < self.num_units:
                raise IndexError(f"unit {u} out of range [0, {self.num_units})")
            unit = UnitIndex(u * self.unit_rows, min(self.num_rows, (u + 1) * self.unit_rows), self._read)
            self._cache[u] = unit
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return unit

    def ok_range(self, a: int, b: int) -> np.ndarray:
        """``ok`` of rows [a, b), reading only that array of the units they span."""
        if not 0 <= a <= b <= self.num_rows:
            raise IndexError(f"rows [{a}, {b}) out of range [0, {self.num_rows})")
        parts = [self.unit(u).ok for u in range(a // self.unit_rows, -(-b // self.unit_rows))]
        whole = np.concatenate(parts) if parts else np.zeros(0, bool)
        first = (a // self.unit_rows) * self.unit_rows
        return whole[a - first: b - first]

    def rows(self, rows, *, tokens: bool = True) -> IndexRows:
        """The index of ``rows`` (any order, repeats allowed), one lookup per unit they fall in; ``tokens``:
        with their token offsets (a reader of no teacher reads none)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows out of range [0, {self.num_rows})")
        ok = np.zeros(len(rows), bool)
        grid = np.zeros((len(rows), 2), np.int32)
        p0, p1, t0, t1 = (np.zeros(len(rows), np.int64) for _ in range(4))
        labels = np.full(len(rows), -1, np.int32)
        which = rows // self.unit_rows
        for u in np.unique(which).tolist():
            mine = np.flatnonzero(which == u)
            unit = self.unit(u)
            k = rows[mine] - unit.start
            ok[mine], grid[mine], labels[mine] = unit.ok[k], unit.grid[k], unit.labels[k]
            p0[mine], p1[mine] = unit.pixel_offsets[k], unit.pixel_offsets[k + 1]
            if tokens:
                t0[mine], t1[mine] = unit.token_offsets[k], unit.token_offsets[k + 1]
        return IndexRows(ok, grid, (p0, p1), (t0, t1) if tokens else None, labels)


class StoreIndex(_Units):
    """A store's index, read per unit through ``select(name, array, selection, rows)`` (``StoreReader.select``:
    damage is named, never read as data). Token offsets come from ``offsets`` of the complete teacher
    ``teacher`` (every teacher's are the same); None: the caller reads no tokens."""

    def __init__(self, store, select, *, teacher: str | None, capacity: int = DEFAULT_CACHE_UNITS):
        super().__init__(store.num_images, store.shard_images, capacity, self._read_field)
        self.store, self.select, self.teacher, self.name = store, select, teacher, store.url
        images = store.group[L.IMAGES]
        self._arrays = {L.OK: (f"{L.IMAGES}/{L.OK}", images[L.OK]), L.GRID: (f"{L.IMAGES}/{L.GRID}", images[L.GRID]),
                        L.PIXEL_OFFSETS: (f"{L.IMAGES}/{L.PIXEL_OFFSETS}", images[L.PIXEL_OFFSETS])}
        if L.LABELS in store.group:
            self._arrays[L.LABELS] = (L.LABELS, store.group[L.LABELS])
        if teacher is not None:
            self._arrays[L.OFFSETS] = (f"{teacher}/{L.OFFSETS}", store.teacher_group(teacher)[L.OFFSETS])

    def _slice(self, field: str, a: int, b: int) -> np.ndarray:
        name, array = self._arrays[field]
        return self.select(name, array, slice(a, b), np.arange(a, b))

    def _read_field(self, field: str, unit: UnitIndex) -> np.ndarray:
        a, b = unit.start, unit.stop
        if field in (L.OK, L.GRID):
            return self._slice(field, a, b)
        if field == L.PIXEL_OFFSETS:  # the unit's n + 1 offsets: its last image ends where the next unit begins
            return self._slice(field, a, b + 1)
        if field == L.LABELS:
            return self._slice(field, a, b) if L.LABELS in self._arrays else np.full(b - a, -1, np.int32)
        if field == L.OFFSETS:
            if self.teacher is None:
                raise ValueError(f"{self.store.url}: this index was opened without a teacher, so without token offsets")
            # the unit's own chunk of the stored offsets; the end follows from the last image's token count
            start, counts = self._slice(field, a, b), unit.tokens()
            if not np.array_equal(np.diff(start), counts[:-1]):
                raise StoreError(f"{self.store.url}: {self.teacher}/{L.OFFSETS} rows {a}:{b} disagree with images/grid "
                                 f"and images/ok; run `pipeline inspect --verify {self.store.url}`")
            return np.append(start, start[-1] + counts[-1]).astype(np.int64)
        raise KeyError(field)


class ArrayIndex(_Units):
    """The same per-unit view over whole ``ok`` and ``grid`` arrays already in memory (tests, small stores)."""

    def __init__(self, ok: np.ndarray, grid: np.ndarray, unit_rows: int, capacity: int = DEFAULT_CACHE_UNITS):
        self.ok, self.grid = np.asarray(ok, bool), np.asarray(grid)
        super().__init__(len(self.ok), unit_rows, capacity, self._read_field)

    def _read_field(self, field: str, unit: UnitIndex) -> np.ndarray:
        if field == L.OK:
            return self.ok[unit.start:unit.stop]
        if field == L.GRID:
            return self.grid[unit.start:unit.stop]
        raise KeyError(f"an ArrayIndex holds ok and grid only, not {field}")


def plain_select(name: str, array, selection, rows: np.ndarray) -> np.ndarray:
    """``StoreIndex``'s read without the reader's damage naming (a writer's own index: crc32c still checks it)."""
    return np.asarray(array.get_orthogonal_selection(selection))


class UnitOffsets:
    """Absolute offsets ``[N + 1]`` into a flat array, read a write unit at a time: ``unit_offsets(u)`` gives unit
    u's ``n + 1`` (its last equals the next unit's first). Indexes like the whole int64 array (an int, negative
    too, or a slice of step 1) and answers ``searchsorted`` as the array would, so code written for the array
    (``storage.shards``) works unchanged; only the units touched are read (cached by the ``StoreIndex``)."""

    def __init__(self, num_rows: int, unit_rows: int, unit_offsets: Callable[[int], np.ndarray],
                 unit_starts: np.ndarray | None = None):
        self.num_rows, self.unit_rows, self._read_unit = int(num_rows), int(unit_rows), unit_offsets
        self.num_units = max(1, -(-self.num_rows // self.unit_rows))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # the last few units' offsets (lookups come in runs)
        self._lock = threading.Lock()
        # each unit's first offset and the end: needed by searchsorted only (None: reading them would touch
        # every unit, so a reader that only indexes and slices, as pixel offsets are used, goes without)
        self.unit_starts = None if unit_starts is None else np.asarray(unit_starts, np.int64)
        if self.unit_starts is not None and self.unit_starts.shape != (self.num_units + 1,):
            raise ValueError(f"need {self.num_units + 1} unit starts, got {self.unit_starts.shape}")

    @property
    def total(self) -> int:
        """The last offset (the flat array's length): from the unit starts, or the last unit's own offsets."""
        if self.unit_starts is not None:
            return int(self.unit_starts[-1])
        return int(self._unit(self.num_units - 1)[-1])

    def __len__(self) -> int:
        return self.num_rows + 1

    def _unit(self, u: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(u)
            if hit is not None:
                self._cache.move_to_end(u)
                return hit
        off = np.asarray(self._read_unit(u), np.int64)
        with self._lock:
            self._cache[u] = off
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return off

    def _at(self, i: int) -> int:
        if i < 0:
            i += self.num_rows + 1
        if not 0 <= i <= self.num_rows:
            raise IndexError(f"offset {i} out of range [0, {self.num_rows}]")
        if i == self.num_rows:
            return self.total
        u = i // self.unit_rows
        return int(self._unit(u)[i - u * self.unit_rows])

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(self.num_rows + 1)
            if step != 1:
                raise TypeError("UnitOffsets slices take step 1")
            if b <= a:
                return np.zeros(0, np.int64)
            parts = []
            for u in range(a // self.unit_rows, min(self.num_units, -(-b // self.unit_rows))):
                lo = u * self.unit_rows
                off = np.asarray(self._unit(u), np.int64)
                hi = min(b - lo, off.size - 1 if u < self.num_units - 1 else off.size)  # a unit's last is the next's first
                parts.append(off[max(0, a - lo): hi])
            out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            if b == self.num_rows + 1 and (out.size < b - a):
                out = np.append(out, self.total)
            return out
        return self._at(int(key))

    def searchsorted(self, value, side: str = "left") -> int:
        """``np.searchsorted(whole_array, value, side)`` for one value: the unit whose range holds it, then inside."""
        v = int(value)
        if self.unit_starts is None:
            raise TypeError("searchsorted needs the units' starts (UnitOffsets(..., unit_starts=...))")
        starts = self.unit_starts
        # the elements of unit u lie in [starts[u], starts[u+1]]; at most one unit has starts[u] < v <= starts[u+1]
        # (left) or starts[u] <= v < starts[u+1] (right): every unit before it is wholly below, after it above
        if side == "left":
            u = int(np.searchsorted(starts[1:], v, "left"))  # first unit whose end >= v
        elif side == "right":
            u = int(np.searchsorted(starts[1:], v, "right"))  # first unit whose end > v
        else:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if u >= self.num_units:
            return self.num_rows + 1 if (v > starts[-1] or (side == "right" and v == starts[-1])) else self.num_rows
        off = np.asarray(self._unit(u), np.int64)[:-1]  # the unit's own elements
        return u * self.unit_rows + int(np.searchsorted(off, v, side))


UNITS_PER_READ = 256  # units a pass over the whole index reads at once (zarr fetches their chunks concurrently)


def token_offsets(index: _Units, units_per_read: int | None = None) -> UnitOffsets:
    """Every teacher's token offsets (gh·gw rows per usable image) from ``ok`` and ``grid``: one pass for the units'
    starts (8 B per unit held; ``units_per_read`` units per read, so zarr fetches their chunks concurrently),
    then units on demand. For a writer, before any teacher's offsets exist."""
    counts, u_rows = [], index.unit_rows
    units_per_read = units_per_read or UNITS_PER_READ
    for u0 in range(0, index.num_units, units_per_read):
        a, b = u0 * u_rows, min(len(index), (u0 + units_per_read) * u_rows)
        tokens = UnitIndex(a, b, index._read).tokens()  # rows a:b read at once, the LRU of units left alone
        counts.append(np.add.reduceat(tokens, np.arange(0, b - a, u_rows)) if b > a else np.zeros(0, np.int64))
    starts = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)

    def unit(u: int) -> np.ndarray:
        return starts[u] + np.concatenate([[0], np.cumsum(index.unit(u).tokens())]).astype(np.int64)

    return UnitOffsets(len(index), index.unit_rows, unit, starts)


def array_offsets(array, unit_rows: int) -> UnitOffsets:
    """An offsets array ``[N + 1]`` chunked by write unit (pixel, mask or string offsets), read a unit's slice at a
    time; no unit starts (indexing and slices only). A read of a damaged unit raises when that unit is touched."""
    n = int(array.shape[0]) - 1
    return UnitOffsets(n, unit_rows, lambda u: np.asarray(array[u * unit_rows: min((u + 1) * unit_rows, n) + 1]))


def pixel_offsets(index: StoreIndex) -> UnitOffsets:
    """``images/pixel_offsets`` read per unit (each unit's slice is absolute already)."""
    return UnitOffsets(len(index), index.unit_rows, lambda u: index.unit(u).pixel_offsets)
