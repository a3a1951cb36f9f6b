"""Read access to a store: whole images' targets by index, and dask views for streaming statistics.

The per-image index (ok, grid, offsets, labels) is read one write unit at a time (``storage.index``) and
feature rows on demand, so memory stays bounded by what the caller asks for, not by the store's size.
The whole index arrays (``ok``, ``grid``, ...) are there for evaluation over a whole store, read on first
use; the training path never touches them. Safe to use from several threads.

Damage is never read as data: a chunk object that should be there and is not (it would read as zeros)
and a chunk that fails its checksum both raise ``StoreError`` naming the store, the array and the
rows, and pointing at ``pipeline inspect --verify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import layout as L
from .index import DEFAULT_CACHE_UNITS, StoreIndex
from .masks import decode_mask
from .store import FeatureStore, StoreError, token_offsets
from .verify import ShardCheck

__all__ = ["ImageTargets", "StoreReader", "dask_view", "read_batch"]


@dataclass
class ImageTargets:
    index: int
    pixels: np.ndarray  # encoded bytes (uint8)
    grid: tuple[int, int]
    summary: dict[str, np.ndarray]  # teacher -> [D]
    patches: dict[str, np.ndarray]  # teacher -> [gh*gw, D]
    registers: dict[str, np.ndarray]  # teacher -> [R, D] where present
    label: int = -1
    layers: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # teacher -> {k: [gh*gw, Dk]} asked for

    @property
    def nbytes(self) -> int:
        parts = [self.pixels, *self.summary.values(), *self.patches.values(), *self.registers.values(),
                 *(a for per in self.layers.values() for a in per.values())]
        return int(sum(p.nbytes for p in parts))


class StoreReader:
    """``layers`` names the cached teacher layers to read with each image (``{teacher: [k, ...]}``);
    ``index_units``: write units of the per-image index kept in memory (``storage.index``)."""

    def __init__(self, url: str, teachers: list[str] | None = None, layers: dict[str, list[int]] | None = None,
                 index_units: int = DEFAULT_CACHE_UNITS):
        self.store = FeatureStore.open(url)
        if not self.store.images_complete:
            raise StoreError(f"{url}: images are not complete (an interrupted cache-teachers?)")
        names = teachers if teachers is not None else self.store.teacher_names
        for name in names:
            if not self.store.has_teacher(name) or not self.store.teacher_attrs(name).get("complete"):
                raise StoreError(f"{url}: teacher '{name}' is missing or incomplete")
        self.teachers = list(names)
        self.url = url
        self._checks: dict[str, ShardCheck] = {}
        self.num_images = self.store.num_images
        self.index = StoreIndex(self.store, self.select, teacher=self.teachers[0] if self.teachers else None,
                                capacity=index_units)
        self.pixels = self.store.image_array(L.PIXELS)
        self.mask_info = self.store.mask_info()
        self.arrays = {}
        for name in self.teachers:
            g = self.store.teacher_group(name)
            self.arrays[name] = {k: g[k] for k in (L.SUMMARY, L.PATCHES, L.REGISTERS) if k in g}
        self.layers: dict[str, dict[int, object]] = {}
        for name, ks in (layers or {}).items():
            complete = set(self.store.teacher_attrs(name).get("layers", [])) if name in self.arrays else set()
            missing = [k for k in ks if k not in complete]
            if missing:
                raise StoreError(f"{url}: teacher '{name}' has no complete layers {missing} (complete: "
                                 f"{sorted(complete) or 'none'}); cache them with `pipeline cache-teachers ... --name "
                                 f"{name} --layers {','.join(map(str, missing))}`")
            self.layers[name] = {k: self.store.teacher_group(name)[L.layer_path(k)] for k in ks}

    # the whole index, for evaluation over a whole store: read on first use, never by the training path
    @cached_property
    def ok(self) -> np.ndarray:
        return self._whole(f"{L.IMAGES}/{L.OK}", self.store.image_array(L.OK))

    @cached_property
    def grid(self) -> np.ndarray:
        return self._whole(f"{L.IMAGES}/{L.GRID}", self.store.image_array(L.GRID))

    @cached_property
    def pixel_offsets(self) -> np.ndarray:
        return self._whole(f"{L.IMAGES}/{L.PIXEL_OFFSETS}", self.store.image_array(L.PIXEL_OFFSETS))

    @cached_property
    def token_offsets(self) -> np.ndarray:
        return token_offsets(self.ok, self.grid)

    @cached_property
    def labels(self) -> np.ndarray | None:
        return self._whole(L.LABELS, self.store.group[L.LABELS]) if L.LABELS in self.store.group else None

    @cached_property
    def mask_offsets(self) -> np.ndarray | None:
        return (self._whole(f"{L.IMAGES}/{L.MASK_OFFSETS}", self.store.image_array(L.MASK_OFFSETS))
                if self.mask_info is not None else None)

    def _whole(self, name: str, array) -> np.ndarray:
        return self.select(name, array, slice(None), np.arange(array.shape[0]) if array.shape[0] else np.zeros(0, int))

    def select(self, name: str, array, selection, rows: np.ndarray) -> np.ndarray:
        """``array.get_orthogonal_selection(selection)``; ``rows`` are the axis-0 rows it touches.

        Refuses to return a block whose chunk object is missing, and names the store, array and rows
        when a chunk is damaged (checksum mismatch, truncated shard)."""
        check = self._checks.setdefault(name, ShardCheck(self.store, array))
        gone = check.missing_rows(rows) if len(rows) else []
        if gone:
            raise StoreError(f"{self.url}: {name} is damaged: chunk object(s) {gone[:3]} holding rows of "
                             f"committed images are missing; run `pipeline inspect --verify {self.url}`")
        try:
            return array.get_orthogonal_selection(selection)
        except Exception as exc:
            lo, hi = (int(np.min(rows)), int(np.max(rows)) + 1) if len(rows) else (0, 0)
            raise StoreError(f"{self.url}: {name} rows {lo}:{hi} are damaged ({type(exc).__name__}: "
                             f"{str(exc)[:160]}); run `pipeline inspect --verify {self.url}`") from None

    def __len__(self) -> int:
        return self.num_images

    def masks(self, indices) -> list[np.ndarray | None]:
        """Decoded masks [H, W] (``storage.masks``) of ``indices``, None for an image without one; one read."""
        if self.mask_info is None:
            raise StoreError(f"{self.url} has no masks: cache the images with `pipeline cache-teachers ... --masks CSV`")
        idx = np.asarray(indices, np.int64)
        m0, m1 = self.mask_offsets[idx], self.mask_offsets[idx + 1]
        rows = _ranges(m0, m1)
        data = self.select(f"{L.IMAGES}/{L.MASKS}", self.store.image_array(L.MASKS), rows, rows)
        parts = np.split(data, np.cumsum(m1 - m0)[:-1])
        return [decode_mask(p) if len(p) else None for p in parts]

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(self.ok)

    def read(self, i: int) -> ImageTargets:
        if not 0 <= i < self.num_images:
            raise IndexError(f"image {i} out of range [0, {self.num_images})")
        unit = self.index.unit(i // self.index.unit_rows)
        k = i - unit.start
        if not unit.ok[k]:
            raise ValueError(f"image {i} failed to decode at cache time (see images/failures)")
        t0, t1 = (int(unit.token_offsets[k]), int(unit.token_offsets[k + 1])) if self.arrays else (0, 0)
        p0, p1 = int(unit.pixel_offsets[k]), int(unit.pixel_offsets[k + 1])
        one = np.array([i])
        summary, patches, registers = {}, {}, {}
        for name, arrays in self.arrays.items():
            summary[name] = self.select(f"{name}/{L.SUMMARY}", arrays[L.SUMMARY], (i, slice(None)), one)
            patches[name] = self.select(f"{name}/{L.PATCHES}", arrays[L.PATCHES], (slice(t0, t1), slice(None)),
                                        np.arange(t0, t1))
            if L.REGISTERS in arrays:
                registers[name] = self.select(f"{name}/{L.REGISTERS}", arrays[L.REGISTERS],
                                              (i, slice(None), slice(None)), one)
        return ImageTargets(
            index=i,
            pixels=self.select(f"{L.IMAGES}/{L.PIXELS}", self.pixels, slice(p0, p1), np.arange(p0, p1)),
            grid=(int(unit.grid[k, 0]), int(unit.grid[k, 1])),
            summary=summary,
            patches=patches,
            registers=registers,
            label=int(unit.labels[k]),
        )


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[k], stops[k]) without a Python loop."""
    lengths = stops - starts
    if lengths.sum() == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(lengths.sum(), dtype=np.int64) + offsets


def read_batch(reader: StoreReader, indices) -> list[ImageTargets]:
    """Targets of several images with one zarr selection per array (chunks fetched concurrently).

    zarr-python 3 pays ~1-3 ms of fixed cost per call; reading a batch in one orthogonal selection
    per array amortizes it and lets zarr decode the needed chunks in parallel.
    """
    idx = np.asarray(indices, np.int64)
    if len(idx) == 0:
        return []
    order = np.argsort(idx, kind="stable")
    sidx = idx[order]
    index = reader.index.rows(sidx, tokens=bool(reader.arrays))  # few units: the stream is shuffled by unit
    if (~index.ok).any():
        raise ValueError(f"images {sidx[~index.ok].tolist()} failed to decode at cache time")
    t0, t1 = index.tokens or (np.zeros_like(sidx), np.zeros_like(sidx))
    p0, p1 = index.pixels
    rows, pixel_rows = _ranges(t0, t1), _ranges(p0, p1)
    pix = reader.select(f"{L.IMAGES}/{L.PIXELS}", reader.pixels, pixel_rows, pixel_rows)
    tok_split = np.cumsum(t1 - t0)[:-1]
    pix_split = np.cumsum(p1 - p0)[:-1]
    pixels = np.split(pix, pix_split)
    per_teacher = {}
    for name, arrays in reader.arrays.items():
        summary = reader.select(f"{name}/{L.SUMMARY}", arrays[L.SUMMARY], (sidx, slice(None)), sidx)
        patches = np.split(reader.select(f"{name}/{L.PATCHES}", arrays[L.PATCHES], (rows, slice(None)), rows), tok_split)
        regs = (reader.select(f"{name}/{L.REGISTERS}", arrays[L.REGISTERS], (sidx, slice(None), slice(None)), sidx)
                if L.REGISTERS in arrays else None)
        per_teacher[name] = (summary, patches, regs)
    per_layer = {name: {k: np.split(reader.select(f"{name}/{L.layer_path(k)}", array, (rows, slice(None)), rows), tok_split)
                        for k, array in arrays.items()}
                 for name, arrays in reader.layers.items()}
    out: list[ImageTargets | None] = [None] * len(idx)
    for k, pos in enumerate(order):
        i = int(sidx[k])
        out[pos] = ImageTargets(
            index=i,
            pixels=pixels[k],
            grid=(int(index.grid[k, 0]), int(index.grid[k, 1])),
            summary={n: v[0][k] for n, v in per_teacher.items()},
            patches={n: v[1][k] for n, v in per_teacher.items()},
            registers={n: v[2][k] for n, v in per_teacher.items() if v[2] is not None},
            layers={n: {layer: maps[k] for layer, maps in per.items()} for n, per in per_layer.items()},
            label=int(index.labels[k]),
        )
    return out


def dask_view(url: str, teacher: str, feature: str):
    """A lazy dask array over one teacher feature (chunked like the store's inner chunks)."""
    import dask.array as da

    store = FeatureStore.open(url)
    arr = store.teacher_group(teacher)[feature]
    return da.from_array(arr, chunks=arr.chunks)
