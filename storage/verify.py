"""Find damage in a store: read every committed unit, check every chunk it owns is there and intact.

A unit is damaged when a chunk (or shard) it wrote is missing, or when reading its rows fails (the
crc32c checksum every array carries does not match, a shard is truncated). ``repair=True``
un-commits the damaged units (removing their markers) and marks what they belong to (the images,
a teacher, one cached layer of a teacher) as not complete, so that rerunning ``cache-teachers`` with the same images and teacher computes exactly
those units again; until then readers refuse the damaged parts instead of reading them as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from . import layout as L
from .index import StoreIndex, array_offsets, plain_select, token_offsets
from .store import STRING_ARRAYS, FeatureStore

__all__ = ["Damage", "ShardCheck", "VerifyReport", "verify_store"]


@dataclass
class Damage:
    part: str  # "images" or "teacher <name>"
    unit: int
    reason: str  # names the array and what is wrong


@dataclass
class VerifyReport:
    url: str
    units_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    repaired: bool = False

    def units(self, part: str) -> list[int]:
        return sorted({d.unit for d in self.damaged if d.part == part})


class ShardCheck:
    """Is the chunk (or shard) object that holds row r of an array on disk? One lookup per object."""

    def __init__(self, store: FeatureStore, array: zarr.Array):
        self.store, self.array = store, array
        self.rows = int((array.shards or array.chunks)[0])
        self.rest = (0,) * (array.ndim - 1)
        self.seen: set[int] = set()

    def missing(self, r0: int, r1: int) -> list[int]:
        """Objects (by index along axis 0) holding rows [r0, r1) that do not exist."""
        return self.missing_objects(range(r0 // self.rows, (r1 - 1) // self.rows + 1) if r1 > r0 else ())

    def missing_rows(self, rows: np.ndarray) -> list[int]:
        """Objects holding any of ``rows`` (axis-0 indices) that do not exist."""
        return self.missing_objects(np.unique(np.asarray(rows, np.int64) // self.rows).tolist())

    def missing_objects(self, objects) -> list[int]:
        out = []
        for k in objects:
            if k in self.seen:
                continue
            key = self.array.metadata.chunk_key_encoding.encode_chunk_key((int(k), *self.rest))
            if self.store.fs.exists(self.store.path(self.array.path, key)):
                self.seen.add(k)
            else:
                out.append(int(k))
        return out


def _check(store: FeatureStore, checks: dict[str, ShardCheck], name: str, arr: zarr.Array, r0: int, r1: int
           ) -> str | None:
    """Why rows [r0, r1) of ``arr`` are damaged, or None."""
    check = checks.setdefault(name, ShardCheck(store, arr))
    gone = check.missing(r0, r1)
    if gone:
        return f"missing chunk object(s) {gone[:3]} of {name}"
    a = r0
    while a < r1:  # an object (chunk or shard) at a time, to its end: memory bounded by one
        b = min(r1, (a // check.rows + 1) * check.rows)
        try:
            np.asarray(arr[a:b])
        except Exception as exc:  # checksum mismatch, truncated shard, undecodable bytes
            return f"unreadable {name} rows {a}:{b}: {type(exc).__name__}: {str(exc)[:160]}"
        a = b
    return None


def verify_store(url: str, *, repair: bool = False) -> VerifyReport:
    store = FeatureStore.open(url, mode="r+" if repair else "r")
    report = VerifyReport(url)
    if L.IMAGES not in store.group or "shard_images" not in store.attrs:
        return report
    plan = store.plan()
    checks: dict[str, ShardCheck] = {}
    images = store.group[L.IMAGES]
    image_log = store.image_commits()
    flat = [(L.PIXELS, L.PIXEL_OFFSETS)] + ([(L.MASKS, L.MASK_OFFSETS)] if L.MASKS in images else [])
    flat += list(STRING_ARRAYS.items()) if store.flat_strings else []
    per_image = (L.HW, L.GRID, L.OK) if store.flat_strings else (L.IDS, L.SOURCE, L.HW, L.GRID, L.OK)
    # offsets read a unit at a time (a unit's own and the last, for the total), never whole
    flat_offsets = {data: array_offsets(images[index], plan.shard_images) for data, index in flat}
    for unit in sorted(image_log.committed()):
        i0, i1 = plan.image_range(unit)
        end = i1 + 1 if unit == plan.num_units - 1 else i1
        report.units_checked += 1
        reasons = [_check(store, checks, f"images/{n}", images[n], i0, i1) for n in per_image]
        for data, index in flat:  # pixels, masks where the store has them, and the strings from version 3
            reasons.append(_check(store, checks, f"images/{index}", images[index], i0, end))
            try:
                r0, r1 = plan.owned_rows(unit, flat_offsets[data], int((images[data].shards or images[data].chunks)[0]))
            except Exception:  # this unit's (or the last unit's) offsets are unreadable: reported as their damage
                continue
            reasons.append(_check(store, checks, f"images/{data}", images[data], r0, r1))
        report.damaged += [Damage("images", unit, r) for r in reasons if r]
    if image_log.committed() and L.FAILURES in images:  # written whole by the ingest's driver: redone with unit 0
        table = images[L.FAILURES]
        for n in (L.FAILURE_INDEX, L.FAILURE_REASON, L.FAILURE_REASON_OFFSETS):
            if n in table:
                why = _check(store, checks, f"images/{L.FAILURES}/{n}", table[n], 0, int(table[n].shape[0]))
                if why:
                    report.damaged.append(Damage("images", 0, why))
    try:  # one pass over ok and grid for the units' first token rows (8 B a unit), then a unit at a time
        tokens = token_offsets(StoreIndex(store, plain_select, teacher=None, capacity=4))
    except Exception:  # a unit's ok or grid is damaged (reported above): the teachers' flat rows are not placed
        tokens = None
    for name in store.teacher_names:
        g = store.teacher_group(name)
        if not g.attrs.get("created", True) or L.PATCHES not in g:
            continue
        for unit in sorted(store.teacher_commits(name).committed()):
            i0, i1 = plan.image_range(unit)
            end = i1 + 1 if unit == plan.num_units - 1 else i1
            report.units_checked += 1
            part = f"teacher {name}"
            reasons = [_check(store, checks, f"{name}/{n}", g[n], i0, i1) for n in (L.SUMMARY, L.REGISTERS) if n in g]
            reasons.append(_check(store, checks, f"{name}/offsets", g[L.OFFSETS], i0, end))
            if tokens is not None:
                r0, r1 = plan.owned_rows(unit, tokens, int(g[L.PATCHES].shards[0]))
                reasons.append(_check(store, checks, f"{name}/patches", g[L.PATCHES], r0, r1))
            report.damaged += [Damage(part, unit, r) for r in reasons if r]
        for k in sorted(int(k) for k in (g.attrs.get("layer_dims") or {})):  # cached layers commit on their own
            if L.LAYERS not in g or str(k) not in g[L.LAYERS] or tokens is None:
                continue
            arr = g[L.LAYERS][str(k)]
            for unit in sorted(store.layer_commits(name, k).committed()):
                report.units_checked += 1
                r0, r1 = plan.owned_rows(unit, tokens, int(arr.shards[0]))
                reason = _check(store, checks, f"{name}/{L.layer_path(k)}", arr, r0, r1)
                if reason:
                    report.damaged.append(Damage(f"teacher {name} layer {k}", unit, reason))
    if repair and report.damaged:
        _uncommit(store, report)
    return report


def _uncommit(store: FeatureStore, report: VerifyReport) -> None:
    if report.units("images"):
        for unit in report.units("images"):
            store.image_commits().uncommit(unit)
        store.update_attrs(images_complete=False)
    for name in store.teacher_names:
        units = report.units(f"teacher {name}")
        if units:
            for unit in units:
                store.teacher_commits(name).uncommit(unit)
            store.teacher_group(name).attrs.update({"complete": False})
        layers = store.teacher_group(name).attrs.get("layers", [])
        for k in sorted(int(k) for k in (store.teacher_group(name).attrs.get("layer_dims") or {})):
            units = report.units(f"teacher {name} layer {k}")
            for unit in units:  # complete or still being cached: its damaged units are computed again
                store.layer_commits(name, k).uncommit(unit)
            if units:  # readers refuse the layer (naming --layers) until cache-teachers rewrites those units
                layers = [j for j in layers if j != k]
        if layers != store.teacher_group(name).attrs.get("layers", []):
            store.teacher_group(name).attrs.update({"layers": layers})
    report.repaired = True
