"""Facts about a store for `pipeline inspect`: counts, failures, dims, bytes on disk, PHI-S summary."""

from __future__ import annotations

import numpy as np

from . import index
from . import layout as L
from .codecs import WORD_BYTES
from .failures import count_reasons
from .fsutil import du
from .store import FeatureStore, token_counts

__all__ = ["describe_store"]


def _logical_bytes(group, codec: str) -> int:
    """Bytes of the target arrays before compression, in the codec's words (what compression is measured against)."""
    total = 0
    for key in (L.SUMMARY, L.PATCHES, L.REGISTERS, L.OFFSETS):
        if key in group:
            arr = group[key]
            word = arr.dtype.itemsize if key == L.OFFSETS else WORD_BYTES.get(codec, arr.dtype.itemsize)
            total += int(np.prod(arr.shape)) * word
    return total


def _phis_facts(store: FeatureStore, teacher: str, feature: str) -> dict | None:
    path = store.phis_path(teacher, feature)
    if not store.fs.exists(path):
        return None
    from .phis import PhisTransform

    t = PhisTransform.load(path)
    ev = np.clip(np.asarray(t.eigenvalues, np.float64), 0, None)
    share = float(ev.max() / ev.sum()) if ev.sum() > 0 else 0.0
    p = ev / ev.sum() if ev.sum() > 0 else ev
    eff_rank = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())) if ev.sum() > 0 else 0.0
    return {"method": str(t.method), "scale": float(t.scale), "count": int(t.count),
            "top_eigen_share": share, "effective_rank": eff_rank}


def _image_counts(store: FeatureStore) -> dict:
    """Images, usable images, tokens per usable image (min, max, total) and labelled images, read
    ``index.UNITS_PER_READ`` write units at a time: memory bounded by the read, not the store (9 B per image
    whole)."""
    ok_array, grid_array = store.image_array(L.OK), store.image_array(L.GRID)
    n, step = int(ok_array.shape[0]), int(ok_array.chunks[0]) * index.UNITS_PER_READ
    labels = store.group[L.LABELS] if L.LABELS in store.group else None
    out = {"count": n, "ok": 0, "min": 0, "max": 0, "total": 0, "labelled": None if labels is None else 0}
    lo, hi = None, 0
    for a in range(0, n, step):
        ok, grid = np.asarray(ok_array[a: a + step]), np.asarray(grid_array[a: a + step])
        if labels is not None:
            out["labelled"] += int((np.asarray(labels[a: a + step]) >= 0).sum())
        tokens = token_counts(ok, grid)[ok]
        out["ok"] += int(ok.sum())
        out["total"] += int(tokens.sum())
        if tokens.size:
            lo = int(tokens.min()) if lo is None else min(lo, int(tokens.min()))
            hi = max(hi, int(tokens.max()))
    out["min"], out["max"] = lo or 0, hi
    return out


def _mask_facts(store: FeatureStore) -> dict | None:
    info = store.mask_info()
    if info is None:
        return None
    offsets, masked = store.image_array(L.MASK_OFFSETS), 0
    step = int(offsets.chunks[0]) * index.UNITS_PER_READ
    for a in range(0, int(offsets.shape[0]) - 1, step):  # a block of images and the next one's first offset
        masked += int((np.diff(np.asarray(offsets[a: a + step + 1])) > 0).sum())
    return {"kind": info.kind, "classes": info.classes, "scale": info.scale, "images": masked,
            "bytes_on_disk": du(store.fs, store.path(L.IMAGES, L.MASKS))}


def describe_store(url: str) -> dict:
    store = FeatureStore.open(url)
    attrs = store.attrs
    out: dict = {"url": url, "format_version": attrs["format_version"], "created_by": attrs.get("created_by"),
                 "image_policy": attrs["image_policy"], "images_complete": store.images_complete}
    if L.IMAGES not in store.group or not store.images_complete:
        out["images"] = None
        return out
    counts = _image_counts(store)
    idx, reasons = store.failures()
    pixel_bytes = du(store.fs, store.path(L.IMAGES, L.PIXELS))
    out["images"] = {
        "count": counts["count"],
        "failed": counts["count"] - counts["ok"],
        "failure_reasons": count_reasons(reasons),
        "tokens_per_image": {"min": counts["min"], "mean": counts["total"] / counts["ok"] if counts["ok"] else 0.0,
                             "max": counts["max"], "total": counts["total"]},
        "pixel_bytes_on_disk": pixel_bytes,
        "pixel_bytes_per_image": pixel_bytes / max(1, counts["ok"]),
        "labels": counts["labelled"],  # labelled images (None: the store has no labels)
        "masks": _mask_facts(store),
    }
    teachers = {}
    n_ok, n_tok = max(1, counts["ok"]), max(1, counts["total"])
    for name in store.teacher_names:
        g = store.teacher_group(name)
        ta = dict(g.attrs)
        on_disk = sum(du(store.fs, store.path(L.TEACHERS, name, k)) for k in (L.SUMMARY, L.PATCHES, L.REGISTERS, L.OFFSETS))
        logical = _logical_bytes(g, store.teacher_codec(name))
        phis_bytes = du(store.fs, store.path(L.TEACHERS, name, L.PHIS))
        plan = store.plan()
        teachers[name] = {
            "spec": ta.get("spec"),
            "complete": bool(ta.get("complete")),
            "units_committed": len(store.teacher_commits(name).committed()),
            "units_total": plan.num_units,
            "dims": ta.get("dims"),
            "num_registers": ta.get("num_registers"),
            "dtype": ta.get("dtype"),
            "codec": store.teacher_codec(name),
            "codec_fidelity": ta.get("codec_fidelity"),
            "resampled": ta.get("resampled"),
            "fingerprint_digest": ta.get("fingerprint_digest"),
            "bytes_on_disk": on_disk,  # targets only: summary, patches, registers, offsets
            "phis_bytes": phis_bytes,
            "bytes_per_image": on_disk / n_ok,
            "bytes_per_token": on_disk / n_tok,
            "compression_ratio": logical / on_disk if on_disk else None,
            "heads": sorted(k for k, _ in g[L.HEADS].arrays()) if L.HEADS in g else [],
            "text": {k: {"kind": a.attrs.get("kind", "prompts"), "rows": int(a.shape[0])}
                     for k, a in sorted(g[L.TEXT].arrays())} if L.TEXT in g else {},
            "layers": {str(k): {"dim": int((ta.get("layer_dims") or {}).get(str(k), 0)),
                                "complete": int(k) in ta.get("layers", []),
                                "units_committed": len(store.layer_commits(name, int(k)).committed())}
                       for k in sorted((ta.get("layer_dims") or {}), key=int)},
            "phis": {f: _phis_facts(store, name, f) for f in L.PHIS_FEATURES},
        }
    out["teachers"] = teachers
    return out
