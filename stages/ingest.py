"""Images phase of `cache-teachers`: decode, resize and encode every image into the store's images/.

Three steps, each resumable:
  A. Ray tasks (``stages.runner``), one per unit: read + decode + resize + encode; the unit's bytes
     and metadata are staged in ``_staging/images/unit-*.npz`` (atomic write = the step's commit).
  B. The driver reads the staged metadata (small), computes pixel and token offsets and the
     failure table, and creates the arrays.
  C. Ray tasks, one per unit: write the unit's per-image shards and its owned pixel shards
     (storage.shards ownership rule), then the unit's commit marker.
Failures (unreadable, corrupt, truncated, not an image) are recorded, never dropped. Masks (per-pixel
label maps, ``storage.masks``) travel with their images through the same three steps and commits.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from storage import layout as L
from storage.failures import count_reasons
from storage.fingerprint import digest_strings
from storage.fsutil import atomic_write
from storage.image_policy import ImagePolicy
from storage.masks import MaskInfo, encode_mask, read_mask_file, resize_mask
from storage.shards import ShardPlan, flat_shard_rows
from storage.store import STRING_ARRAYS, FeatureStore, StoreError
from storage.strings import encode_strings

from .runner import UnitJob, ray_node_id
from .sources import ImageRef, absolute_source, iter_decoded, printable_source, read_path_table

__all__ = ["IngestReport", "MaskInput", "ingest_images", "prepare_unit", "read_masks"]

STAGING_IMAGES = f"{L.STAGING}/images"
FLAT_INDEX = {L.PIXELS: L.PIXEL_OFFSETS, L.MASKS: L.MASK_OFFSETS, **STRING_ARRAYS}  # flat byte arrays -> offsets


@dataclass
class IngestReport:
    num_images: int = 0
    num_failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    units_done_before: int = 0
    skipped: bool = False
    labelled: int | None = None  # images the labels CSV gives a label to (None: no CSV)
    labels_changed: int = 0  # labels rewritten on an existing store from a corrected CSV
    masked: int | None = None  # images stored with a mask (None: no masks given)


@dataclass(frozen=True)
class MaskInput:
    """Masks to store with the images: the mask file of each source ("" where it has none), and what they hold."""

    files: list[str]
    info: MaskInfo


def read_masks(path: str, sources: list[str], kind: str = "classes", classes: list[str] | None = None,
               scale: float = 1.0) -> MaskInput:
    """The masks CSV (columns path,mask; both relative to the CSV's folder) for ``sources``.

    Refused at once, before any work: a CSV that gives none of the images a mask, and a mask file that
    does not exist (named).
    """
    table = read_path_table(path, ("mask",), "masks")
    base = Path(path).resolve().parent
    files = [(table.get(absolute_source(s)) or "").strip() for s in sources]  # a blank (or missing) cell: no mask
    files = [str(base / f) if f and f != "None" else "" for f in files]
    if sources and not any(files):
        raise ValueError(f"masks file {path} gives a mask to none of the {len(sources)} images (its paths are "
                         f"relative to {base}; e.g. {printable_source(sources[0])} is not listed)")
    missing = next((f for f in files if f and not Path(f).is_file()), None)
    if missing:
        raise FileNotFoundError(f"masks file {path}: mask {missing} does not exist")
    info = MaskInfo.for_kind(kind, classes=list(classes or []), scale=float(scale), sources_digest=digest_strings(files))
    return MaskInput(files, info)


def _mask_blob(mask_file: str, kind: str, source: str, image_size: tuple[int, int], stored_size: tuple[int, int],
               num_classes: int = 0) -> np.ndarray:
    """One image's mask: read, checked against its decoded image's size (and, with named classes, that every
    value names one of them or is 255), resized like it, PNG-encoded."""
    try:
        data = Path(mask_file).read_bytes()
    except OSError as exc:
        raise ValueError(f"mask {mask_file} cannot be read ({exc.strerror or exc})") from None
    mask = read_mask_file(data, kind, mask_file)
    if mask.size != image_size:
        raise ValueError(f"mask {mask_file} is {mask.size[0]}x{mask.size[1]} pixels, its image "
                         f"{printable_source(source)} {image_size[0]}x{image_size[1]}: a mask labels every pixel")
    if num_classes:
        values = np.asarray(mask)
        beyond = values[(values >= num_classes) & (values != 255)]
        if beyond.size:
            raise ValueError(f"mask {mask_file} has class {int(beyond.max())}, but the mask classes name "
                             f"{num_classes} (0..{num_classes - 1}; 255 = ignore)")
    return np.frombuffer(encode_mask(resize_mask(mask, stored_size)), np.uint8)


def _staged_path(store: FeatureStore, unit: int) -> str:
    return store.path(STAGING_IMAGES, f"unit-{unit:08d}.npz")


def prepare_unit(sources: list[str], policy: ImagePolicy, masks: list[str] | None = None, mask_kind: str = "classes",
                 mask_classes: int = 0) -> dict[str, np.ndarray]:
    """Step A for one unit: decoded, resized, encoded images (and their masks) as flat bytes + per-image metadata."""
    n = len(sources)
    sizes, mask_sizes = np.zeros(n, np.int64), np.zeros(n, np.int64)
    hw = np.zeros((n, 2), np.int32)
    grid = np.zeros((n, 2), np.int32)
    ok = np.zeros(n, bool)
    ids, reasons, blobs, mask_blobs = [""] * n, [""] * n, [], []
    decoded_size = {}

    def resize(image):  # the size before resizing: a mask must match it
        decoded_size["last"] = image.size
        return policy.resize(image)

    for i, (content_id, image, reason) in enumerate(iter_decoded(sources, resize)):
        ids[i], reasons[i] = content_id, reason
        if image is None:
            continue
        blob = policy.encode(image)
        blobs.append(np.frombuffer(blob, np.uint8))
        sizes[i] = len(blob)
        if masks and masks[i]:
            mask_blobs.append(_mask_blob(masks[i], mask_kind, sources[i], decoded_size["last"], image.size,
                                         mask_classes))
            mask_sizes[i] = len(mask_blobs[-1])
        hw[i] = (image.height, image.width)
        grid[i] = (image.height // policy.patch_size, image.width // policy.patch_size)
        ok[i] = True
    return {
        "pixels": np.concatenate(blobs) if blobs else np.zeros(0, np.uint8),
        "sizes": sizes,
        "masks": np.concatenate(mask_blobs) if mask_blobs else np.zeros(0, np.uint8),
        "mask_sizes": mask_sizes,
        "hw": hw,
        "grid": grid,
        "ok": ok,
        "ids": np.asarray(ids, dtype=str),
        "sources": np.asarray([printable_source(s) for s in sources], dtype=str),
        "reasons": np.asarray(reasons, dtype=str),
    }


def _save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(store: FeatureStore, unit: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.fs.cat_file(_staged_path(store, unit))), allow_pickle=False) as z:
        return {k: z[k] for k in keys}


def _stage_task(store_url: str, unit: int, sources: list[str], policy: dict, masks: list[str] | None,
                mask_kind: str, mask_classes: int) -> int:
    store = FeatureStore.open(store_url, mode="r")
    arrays = prepare_unit(sources, ImagePolicy.from_dict(policy), masks, mask_kind, mask_classes)
    atomic_write(store.fs, _staged_path(store, unit), _save_npz(arrays))
    return unit


def _unit_bytes(store: FeatureStore, unit: int, name: str) -> np.ndarray:
    """A staged unit's bytes of flat array ``name``: its pixels or masks, or its ids' or sources' UTF-8."""
    if name in STRING_ARRAYS:
        key = "ids" if name == L.IDS else "sources"
        return encode_strings(_load_npz(store, unit, (key,))[key])[0]
    return _load_npz(store, unit, (name,))[name]


def _owned_bytes(store: FeatureStore, offsets: np.ndarray, r0: int, r1: int, name: str) -> np.ndarray:
    """Rows [r0, r1) of a flat byte array (pixels, masks, ids, source) from the staged units: the writing unit's
    file and, past its end, the next ones'."""
    plan = store.plan()
    first_image = int(np.searchsorted(offsets, r0, "right")) - 1
    parts, cursor, u = [], r0, first_image // plan.shard_images
    while cursor < r1:
        u0, u1 = plan.image_range(u)
        base = int(offsets[u0])
        data = _unit_bytes(store, u, name)
        lo, hi = cursor - base, min(r1, int(offsets[u1])) - base
        parts.append(data[lo:hi])
        cursor = base + hi
        u += 1
    return np.concatenate(parts)


def _write_task(store_url: str, unit: int, offsets_ref: dict[str, np.ndarray]) -> int:
    """Step C for one unit (runs in a Ray task). ``offsets_ref``: the offsets of each flat array it writes
    (pixels; masks where given; ids and source from format version 3)."""
    store = FeatureStore.open(store_url, mode="r+")
    plan = store.plan()
    flat = {name: (FLAT_INDEX[name], np.asarray(offsets)) for name, offsets in offsets_ref.items()}
    i0, i1 = plan.image_range(unit)
    meta = _load_npz(store, unit, ("ids", "sources", "hw", "grid", "ok"))
    images = store.group[L.IMAGES]
    end = i1 + 1 if unit == plan.num_units - 1 else i1
    owned = {name: plan.owned_rows(unit, offsets, int((images[name].shards or images[name].chunks)[0]))
             for name, (_, offsets) in flat.items()}
    rows = {**owned, **{index: (i0, end) for index, _ in flat.values()}}
    per_image = [L.HW, L.GRID, L.OK, *([] if store.flat_strings else [L.IDS, L.SOURCE])]
    for name in (*per_image, *rows):  # rewritten whole
        store.clear_rows(images[name], *rows.get(name, (i0, i1)))
    if not store.flat_strings:  # a store of format version 1 or 2 being repaired
        images[L.IDS][i0:i1] = meta["ids"]
        images[L.SOURCE][i0:i1] = meta["sources"]
    images[L.HW][i0:i1] = meta["hw"]
    images[L.GRID][i0:i1] = meta["grid"]
    images[L.OK][i0:i1] = meta["ok"]
    for name, (index, offsets) in flat.items():
        images[index][i0:end] = offsets[i0:end]
        r0, r1 = owned[name]
        if r1 > r0:
            images[name][r0:r1] = _owned_bytes(store, offsets, r0, r1, name)
    store.image_commits().commit(unit, {"images": [i0, i1], "node": ray_node_id(),
                                        **{f"{n}_rows": list(r) for n, r in owned.items()}})
    return unit


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _string_chunk_bytes(offsets: np.ndarray, shard_images: int) -> int:
    """Chunk size of a string array's bytes (ids, source): a unit's strings span about four chunks (at least
    64 bytes), so a unit writing the chunks it owns reads at most the next unit's staged file to fill its last."""
    return flat_shard_rows(offsets, shard_images, 64, shards_per_unit=4, max_rows=1 << 20)


def read_labels(path: str, sources: list[str]) -> np.ndarray:
    """labels CSV (columns path,label; paths relative to the CSV's folder) -> [N] int32, -1 if unknown.

    Every label must be an integer. A CSV that names none of the images is refused: it is almost
    always a CSV for other paths (or relative to another folder), and storing N times -1 would pass
    for "labelled" downstream.
    """
    table = read_path_table(path, ("label",), "labels")
    values = {}
    for where, v in table.items():
        try:
            values[where] = int(v)
        except ValueError:
            raise ValueError(f"labels file {path}: label {v!r} of {printable_source(where)} is not an integer") from None
    labels = np.asarray([values.get(absolute_source(s), -1) for s in sources], np.int32)
    if len(labels) and not (labels >= 0).any():
        raise ValueError(f"labels file {path} gives a label to none of the {len(labels)} images (its paths are "
                         f"relative to {Path(path).resolve().parent}; e.g. {printable_source(sources[0])} is not listed)")
    return labels


def _check_stored_masks(store: FeatureStore, masks: MaskInput) -> None:
    """A complete store takes ``--masks`` only when it holds exactly these masks (they are written with the images):
    the same files, kind, class names and scale."""
    stored = store.mask_info()
    if stored is None:
        raise StoreError(f"{store.url} was cached without masks, and masks are written with the images: cache "
                         "them into a new --store")
    if stored != masks.info:
        what = [k for k, v in stored.to_dict().items() if masks.info.to_dict()[k] != v]
        raise StoreError(f"{store.url} holds other masks than these (their {', '.join(what)} differ: stored "
                         f"{stored.kind}, digest {stored.sources_digest[:12]}); use a new --store")


def _update_labels(store: FeatureStore, labels: np.ndarray, report: IngestReport) -> None:
    """(Re)write the labels of a complete store when a corrected CSV says something else than what is stored."""
    old = store.labels()
    report.labelled = int((labels >= 0).sum())
    if old is None or not np.array_equal(old, labels):
        report.labels_changed = len(labels) if old is None else int((old != labels).sum())
        store.write_labels(labels, store.shard_images)


def ingest_images(
    refs: list[ImageRef],
    store: FeatureStore,
    *,
    shard_images: int,
    pixel_shard_bytes: int,
    pixel_chunk_bytes: int,
    labels: np.ndarray | None = None,
    masks: MaskInput | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> IngestReport:
    """Fill images/ (and labels) of ``store`` from ``refs``; resumes where a killed run stopped.

    The caller holds the store's ``images`` lock when this writes. A complete store is left as it is,
    except for its labels (``read_labels``), which follow a corrected CSV. A store whose image units
    were un-committed by ``pipeline inspect --verify`` (damage) gets exactly those units rewritten:
    every unit is staged again from its sources (the bytes are a pure function of them), and only
    the missing ones written. Masks are written with the images or not at all: a complete store without
    masks, or with other masks, is refused when ``masks`` are given.
    """
    import ray

    progress = on_progress or (lambda *a: None)
    sources = [r.source for r in refs]
    stored_sources = [printable_source(s) for s in sources]
    report = IngestReport()
    if store.images_complete:
        stored = store.image_strings(L.SOURCE)
        if stored != stored_sources:
            first = next((i for i, (a, b) in enumerate(zip(stored, stored_sources)) if a != b),
                         min(len(stored), len(stored_sources)))
            raise StoreError(f"{store.url} already holds {len(stored)} images from another image list (first "
                             f"difference at index {first}); a store has one image set: use a new --store")
        if masks is not None:
            _check_stored_masks(store, masks)
            offsets = store.image_array(L.MASK_OFFSETS)[:]
            report.masked = int((np.diff(offsets) > 0).sum())
        report.skipped = True
        report.num_images = len(sources)
        ok = store.image_array(L.OK)[:]
        report.num_failed = int((~ok).sum())
        report.failure_reasons = count_reasons(store.failures()[1])
        if labels is not None:
            _update_labels(store, labels, report)
        return report

    expected = {"num_images": len(sources), "shard_images": shard_images,
                "sources_digest": digest_strings(stored_sources),
                **({"masks": masks.info.to_dict()} if masks is not None else {})}  # files, kind, classes, scale
    previous = store.attrs.get("ingest")
    if previous is not None and previous != expected:
        raise StoreError(
            f"{store.url} holds an unfinished ingest of another image list, shard size or masks ({previous}); "
            "rerun with the same IMAGES, --shard-images and --masks, or use a new --store"
        )
    store.update_attrs(ingest=expected, shard_images=shard_images)
    plan = ShardPlan(len(sources), shard_images)

    # step A: stage every unit not staged yet (all of them when repairing a verified store)
    staged = {u for u in range(plan.num_units) if store.fs.exists(_staged_path(store, u))}
    committed = store.image_commits().committed()
    report.units_done_before = len(committed)
    stage = UnitJob("decode + resize", plan.num_units, staged, progress)
    policy = store.policy.to_dict()
    kind = masks.info.kind if masks is not None else "classes"
    named = len(masks.info.classes) if masks is not None and kind == "classes" else 0
    list(stage.run_tasks(_stage_task, lambda u: (store.url, u, sources[slice(*plan.image_range(u))], policy,
                                                 masks.files[slice(*plan.image_range(u))] if masks else None, kind,
                                                 named)))

    # step B: offsets and arrays from the staged metadata
    sizes, mask_sizes, ok, grid, reasons, ids, staged_sources = [], [], [], [], [], [], []
    for u in range(plan.num_units):
        meta = _load_npz(store, u, ("sizes", "mask_sizes", "ok", "grid", "reasons", "ids", "sources"))
        sizes.append(meta["sizes"]), mask_sizes.append(meta["mask_sizes"]), ok.append(meta["ok"])
        grid.append(meta["grid"]), reasons.append(meta["reasons"]), ids.append(meta["ids"])
        staged_sources.append(meta["sources"])
    sizes_a, ok_a = np.concatenate(sizes), np.concatenate(ok)
    reasons_a, ids_a = np.concatenate(reasons), np.concatenate(ids)
    flat = {L.PIXELS: _offsets(sizes_a)}
    if masks:
        flat[L.MASKS] = _offsets(np.concatenate(mask_sizes))
    if store.flat_strings:
        flat[L.IDS] = _offsets(encode_strings(ids_a)[1])
        flat[L.SOURCE] = _offsets(encode_strings(np.concatenate(staged_sources))[1])
    if not committed:
        store.create_image_arrays(len(sources), int(flat[L.PIXELS][-1]), shard_images=shard_images,
                                  pixel_shard_bytes=pixel_shard_bytes, pixel_chunk_bytes=pixel_chunk_bytes,
                                  num_mask_bytes=int(flat[L.MASKS][-1]) if masks else None,
                                  num_string_bytes={n: int(flat[n][-1]) for n in STRING_ARRAYS if n in flat},
                                  string_chunk_bytes={n: _string_chunk_bytes(flat[n], shard_images)
                                                      for n in STRING_ARRAYS if n in flat})
        if masks is not None:
            store.update_attrs(masks=masks.info.to_dict())
    failed = np.flatnonzero(~ok_a)
    store.write_failures(failed, [str(reasons_a[i]) for i in failed])
    if labels is not None:
        store.write_labels(labels, shard_images)
        report.labelled = int((labels >= 0).sum())

    # step C: write shards, unit by unit
    offsets_ref = ray.put(flat)
    write = UnitJob("write images", plan.num_units, committed, progress)
    list(write.run_tasks(_write_task, lambda u: (store.url, u, offsets_ref)))

    store.update_attrs(
        images_complete=True,
        num_images=len(sources),
        images_digest=digest_strings([str(i) for i in ids_a]),
    )
    if store.fs.exists(store.path(L.STAGING)):
        store.fs.rm(store.path(L.STAGING), recursive=True)
    report.num_images = len(sources)
    report.masked = int((np.diff(flat[L.MASKS]) > 0).sum()) if masks else None
    report.num_failed = int((~ok_a).sum())
    report.failure_reasons = count_reasons(reasons_a[~ok_a])
    return report
