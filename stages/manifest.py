"""The curation manifest: the images `pipeline curate` selected, readable as IMAGES by every stage.

A manifest is a Zarr v3 group (``DIR/manifest``) whose attrs say ``kind = "amoe-curation-manifest"``:

```
manifest/
  zarr.json   attrs: kind, version, levels, target, selection, seed, embedder, num_pool, created_by
  ids       [n] str     content hash of each selected image (stages.sources.image_id)
  source    [n] str     where it came from (absolute path, or "<tar>::<member>")
  index     [n] int64   its row in the pool (DIR/embeddings and DIR/pool/*)
  clusters  [n, L] int32  its cluster at every level (column l-1 = level l, finest first)
```

Importing this module registers it with ``stages.sources.register_spec_reader`` (``stages/__init__``
imports it, so every ``list_images`` caller sees it): ``list_images("DIR/manifest")`` and
``list_images("DIR")`` (a curation run folder) return the selected images in pool order. ``DIR`` may be
any fsspec URL (``s3://bucket/run``), as ``pipeline curate --out`` may.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from storage.arrays import create_array
from storage.faults import fault_point
from storage.fsutil import filesystem, join, zarr_options

from .sources import ImageRef, absolute_source, register_spec_reader

__all__ = ["MANIFEST", "MANIFEST_KIND", "is_manifest", "manifest_refs", "read_manifest", "write_manifest"]

MANIFEST = "manifest"
MANIFEST_KIND = "amoe-curation-manifest"
MANIFEST_VERSION = 1


def _attrs(url: str) -> dict:
    """The attributes of the zarr group at ``url`` (a path or any fsspec URL), {} when there is none."""
    try:
        fs, root = filesystem(url)
        meta = join(root, "zarr.json")
        if not fs.isfile(meta):
            return {}
        return json.loads(fs.cat_file(meta)).get("attributes", {}) or {}
    except (OSError, ValueError):
        return {}


def _manifest_dir(path: str | Path) -> str | None:
    """The manifest group named by ``path`` (a path or fsspec URL): the group itself, or a curation run folder
    holding one."""
    url = str(path).rstrip("/")
    if _attrs(url).get("kind") == MANIFEST_KIND:
        return url
    if _attrs(join(url, MANIFEST)).get("kind") == MANIFEST_KIND:
        return join(url, MANIFEST)
    return None


def is_manifest(path: str | Path) -> bool:
    return _manifest_dir(path) is not None


def write_manifest(path: str | Path, *, ids: np.ndarray, sources: np.ndarray, index: np.ndarray,
                   clusters: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write (or replace) the manifest group at ``path``; its kind attribute comes last.

    Only a Zarr group (a manifest, or one a crash left half-written) or an empty folder is replaced;
    anything else at ``path`` is refused.
    """
    import zarr

    n = len(index)
    clusters = np.asarray(clusters, dtype=np.int32).reshape(n, -1)
    if not (len(ids) == len(sources) == n):
        raise ValueError("ids, sources, index and clusters need one row per selected image")
    url = str(path)
    fs, root = filesystem(url)
    if fs.exists(root) and not fs.isfile(join(root, "zarr.json")) and (not fs.isdir(root) or fs.ls(root, detail=False)):
        raise ValueError(f"{url} exists and is not a curation manifest: refusing to replace it (move it away "
                         "or use a new --out)")
    group = zarr.open_group(url, mode="w", **zarr_options(url))
    chunk = max(1, min(n, 1 << 16))
    for name, value, dtype in (("ids", ids, str), ("source", [absolute_source(str(s)) for s in sources], str),
                               ("index", index, "int64")):
        arr = create_array(group, name, shape=(n,), dtype=dtype, chunks=(chunk,))
        if n:
            arr[:] = np.array([str(v) for v in value], dtype=str) if dtype is str else np.asarray(value, dtype)
    arr = create_array(group, "clusters", shape=clusters.shape, dtype="int32", chunks=(chunk, clusters.shape[1]))
    if n:
        arr[:] = clusters
    fault_point("manifest")
    group.attrs.update({"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "num_selected": n, **attrs})


def read_manifest(path: str | Path) -> dict[str, Any]:
    """ids, source, index, clusters as numpy arrays, plus ``attrs``."""
    import zarr

    where = _manifest_dir(path)
    if where is None:
        raise ValueError(f"{path} is not a curation manifest (nor a curate --out folder holding one)")
    group = zarr.open_group(where, mode="r", **zarr_options(where))
    out: dict[str, Any] = {name: group[name][:] for name in ("ids", "source", "index", "clusters")}
    out["attrs"] = dict(group.attrs)
    return out


def manifest_refs(path: str | Path) -> list[ImageRef]:
    return [ImageRef(str(s)) for s in read_manifest(path)["source"]]


register_spec_reader(is_manifest, manifest_refs)
