"""Facts about a store for `pipeline inspect`: counts, failures, dims, bytes on disk, PHI-S summary."""

from __future__ import annotations

import numpy as np

from . import layout as L
from .codecs import WORD_BYTES
from .failures import count_reasons
from .fsutil import du
from .store import FeatureStore

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


def _mask_facts(store: FeatureStore) -> dict | None:
    info = store.mask_info()
    if info is None:
        return None
    offsets = store.image_array(L.MASK_OFFSETS)[:]
    return {"kind": info.kind, "classes": info.classes, "scale": info.scale, "images": int((np.diff(offsets) > 0).sum()),
            "bytes_on_disk": du(store.fs, store.path(L.IMAGES, L.MASKS))}


def describe_store(url: str) -> dict:
    store = FeatureStore.open(url)
    attrs = store.attrs
    out: dict = {"url": url, "format_version": attrs["format_version"], "created_by": attrs.get("created_by"),
                 "image_policy": attrs["image_policy"], "images_complete": store.images_complete}
    if L.IMAGES not in store.group or not store.images_complete:
        out["images"] = None
        return out
    ok = store.image_array(L.OK)[:]
    grid = store.image_array(L.GRID)[:]
    tokens = (grid[:, 0].astype(np.int64) * grid[:, 1])[ok]
    idx, reasons = store.failures()
    pixel_bytes = du(store.fs, store.path(L.IMAGES, L.PIXELS))
    out["images"] = {
        "count": int(len(ok)),
        "failed": int((~ok).sum()),
        "failure_reasons": count_reasons(reasons),
        "tokens_per_image": {"min": int(tokens.min(initial=0)), "mean": float(tokens.mean()) if len(tokens) else 0.0,
                             "max": int(tokens.max(initial=0)), "total": int(tokens.sum())},
        "pixel_bytes_on_disk": pixel_bytes,
        "pixel_bytes_per_image": pixel_bytes / max(1, int(ok.sum())),
        "labels": int((store.labels() >= 0).sum()) if L.LABELS in store.group else None,  # labelled images
        "masks": _mask_facts(store),
    }
    teachers = {}
    n_ok, n_tok = max(1, int(ok.sum())), max(1, int(tokens.sum()))
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
