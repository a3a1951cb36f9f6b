"""The feature store: one Zarr v3 group holding images, labels and teacher targets (docs/store-format.md).

This module creates and opens stores and the arrays inside them with the contract's names, shapes,
dtypes and sharding; it never runs a model. Writers (``stages/cache.py``) fill whole shards through
the helpers here and mark progress with ``storage.commits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.errors

from . import layout as L
from .arrays import create_array
from .codecs import STORED_DTYPE, feature_array_options
from .commits import CommitLog
from .failures import read_failure_table, write_failure_table
from .faults import fault_point
from .fingerprint import diff, digest, with_added_fields
from .fsutil import atomic_write, filesystem, is_local, join, zarr_options
from .image_policy import ImagePolicy
from .locks import WriterLock
from .masks import MaskInfo
from .shards import ShardPlan
from .strings import read_strings

__all__ = ["STRING_ARRAYS", "FeatureStore", "StoreError", "TeacherGroupSpec", "token_counts", "token_offsets"]

STRING_ARRAYS = {L.IDS: L.ID_OFFSETS, L.SOURCE: L.SOURCE_OFFSETS}  # images/ string arrays and their offsets (v3)


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, incompatible, conflicting fingerprint)."""


@dataclass(frozen=True)
class TeacherGroupSpec:
    """Shape facts and fingerprint of one ``teachers/<name>`` group, fixed when it is created."""

    name: str
    summary_dim: int
    patch_dim: int
    num_registers: int
    codec: str  # how features are stored: float16, float32, bfloat16 or int8 (storage.codecs)
    fingerprint: dict

    @property
    def fingerprint_digest(self) -> str:
        return digest(self.fingerprint)


def token_counts(ok: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Tokens [N] int64 each image has in every teacher's flat arrays: gh·gw when usable, none when it failed."""
    return np.where(ok, grid[:, 0].astype(np.int64) * grid[:, 1], 0)


def token_offsets(ok: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Token offsets [N+1] of every teacher's flat arrays (the running sum of ``token_counts``)."""
    return np.concatenate([[0], np.cumsum(token_counts(ok, grid))]).astype(np.int64)


class FeatureStore:
    """A handle on one store directory or URL."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = str(url)
        self.group = group
        self.fs, self.root = filesystem(self.url)

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, url: str, mode: str = "r") -> "FeatureStore":
        fs, root = filesystem(str(url))
        if not fs.exists(join(root, "zarr.json")):
            raise StoreError(f"no feature store at {url} (missing zarr.json)")
        group = zarr.open_group(str(url), mode=mode, **zarr_options(url))
        version = group.attrs.get("format_version")
        if version not in L.READABLE_VERSIONS:
            raise StoreError(f"{url}: store format version {version!r}, this code reads versions "
                             f"{', '.join(map(str, L.READABLE_VERSIONS))}")
        return cls(str(url), group)

    @classmethod
    def open_or_create(cls, url: str, policy: ImagePolicy, created_by: str) -> "FeatureStore":
        """Open the store at ``url``, or create it there when nothing is there (or an empty folder).

        Anything else at ``url`` (a non-empty folder that is not a store, a file) is refused: the project
        never writes into, let alone deletes, what it did not write.
        """
        fs, root = filesystem(str(url))
        if not fs.exists(join(root, "zarr.json")):
            if fs.exists(root) and (not fs.isdir(root) or fs.ls(root, detail=False)):
                what = "a file" if not fs.isdir(root) else "a non-empty folder"
                raise StoreError(f"{url} is {what} and not a feature store: refusing to write into it "
                                 "(use a new or empty --store)")
            attrs = {"format_version": L.FORMAT_VERSION, "created_by": created_by, "image_policy": policy.to_dict(),
                     "teachers": [], "images_complete": False}
            try:  # root metadata and attributes in one write: a concurrent opener sees all or nothing
                zarr.create_group(str(url), attributes=attrs, overwrite=False, **zarr_options(url))
            except zarr.errors.ContainsGroupError:
                pass  # another command created it first: use it
        store = cls.open(url, mode="r+")
        if store.policy != policy:
            raise StoreError(
                f"{url} was written with image policy {store.policy.to_dict()}, "
                f"not {policy.to_dict()}; use another --store or the same policy"
            )
        return store

    # ------------------------------------------------------------------ commit markers and writer locks
    def image_commits(self) -> CommitLog:
        """Commit markers of the images units (``_commits/images``)."""
        return CommitLog(self.url, f"{L.COMMITS}/images")

    def teacher_commits(self, name: str) -> CommitLog:
        """Commit markers of one teacher's units (``teachers/<name>/_commits``)."""
        return CommitLog(self.url, f"{L.TEACHERS}/{name}/{L.COMMITS}")

    def layer_commits(self, name: str, k: int) -> CommitLog:
        """Commit markers of one cached teacher layer's units (``teachers/<name>/_commits/layers/<k>``):
        a layer added to a complete teacher is written and resumed on its own, without touching the rest."""
        return CommitLog(self.url, f"{L.TEACHERS}/{name}/{L.COMMITS}/{L.layer_path(k)}")

    def lock(self, what: str) -> WriterLock:
        """The writer lock of ``"images"`` or ``"teacher-<name>"`` (``_locks/<what>.lock``)."""
        label = "the images" if what == "images" else f"teacher '{what.removeprefix('teacher-')}'"
        return WriterLock(self.fs, self.path(L.LOCKS, f"{what}.lock"), f"{label} of {self.url}")

    # ------------------------------------------------------------------ attributes
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def update_attrs(self, **values: Any) -> None:
        """Update root attributes on a freshly read copy (another command may have written since we opened)."""
        self.group = zarr.open_group(self.url, mode="r+", **zarr_options(self.url))
        self.group.attrs.update(values)

    @property
    def policy(self) -> ImagePolicy:
        return ImagePolicy.from_dict(self.group.attrs["image_policy"])

    @property
    def images_complete(self) -> bool:
        return bool(self.group.attrs.get("images_complete", False))

    @property
    def num_images(self) -> int:
        return int(self.group[f"{L.IMAGES}/{L.OK}"].shape[0])

    @property
    def format_version(self) -> int:
        return int(self.group.attrs["format_version"])

    @property
    def flat_strings(self) -> bool:
        """Whether this store's string arrays are UTF-8 bytes with offsets (format version 3 on) or zarr strings."""
        return self.format_version >= L.FLAT_STRINGS_VERSION

    @property
    def teacher_names(self) -> list[str]:
        """Teacher groups of the store, read off ``teachers/`` itself.

        The root ``teachers`` attribute is an index for other tools, kept in creation order; a group it
        misses (two commands that added teachers at once) still counts, and the next cache run repairs
        the index. A group whose creation was interrupted before its attributes does not count.
        """
        if L.TEACHERS not in self.group:
            return []
        parent = self.group[L.TEACHERS]
        present = {name for name in parent.group_keys() if "fingerprint" in parent[name].attrs}
        listed = [name for name in self.group.attrs.get("teachers", []) if name in present]
        return listed + sorted(present - set(listed))

    def repair_teacher_index(self) -> None:
        """Rewrite the root ``teachers`` attribute from the groups when it misses one."""
        names = self.teacher_names
        if list(zarr.open_group(self.url, mode="r", **zarr_options(self.url)).attrs.get("teachers", [])) != names:
            self.update_attrs(teachers=names)

    def fingerprint(self) -> dict:
        """What a training run records: image set and policy, plus every complete teacher's digest."""
        attrs = self.attrs
        teachers = {}
        for name in self.teacher_names:
            tattrs = self.teacher_group(name).attrs
            if tattrs.get("complete"):
                teachers[name] = tattrs["fingerprint_digest"]
        return {
            "format_version": attrs["format_version"],
            "image_policy": attrs["image_policy"],
            "images_digest": attrs.get("images_digest"),
            "teachers": teachers,
        }

    # ------------------------------------------------------------------ files beside the arrays
    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """``path(*parts)`` as a URL another filesystem lookup resolves to the same object (the protocol kept)."""
        where = self.path(*parts)
        return where if is_local(self.url) else self.fs.unstrip_protocol(where)

    def write_file(self, relpath: str, data: bytes) -> None:
        atomic_write(self.fs, self.path(relpath), data)

    def read_file(self, relpath: str) -> bytes:
        return self.fs.cat_file(self.path(relpath))

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    # ------------------------------------------------------------------ images
    def create_image_arrays(
        self,
        num_images: int,
        num_pixel_bytes: int,
        *,
        shard_images: int,
        pixel_shard_bytes: int,
        pixel_chunk_bytes: int,
        num_mask_bytes: int | None = None,
        num_string_bytes: dict[str, int] | None = None,
        string_chunk_bytes: dict[str, int] | None = None,
    ) -> None:
        """Create images/ arrays (empty), with masks/mask_offsets when ``num_mask_bytes`` is given; units then
        fill their shards. ``num_string_bytes`` gives the UTF-8 size of ids and source (format version 3)."""
        g = self.group.require_group(L.IMAGES)
        n = max(num_images, 1)
        per_image = dict(chunks=(shard_images,))
        if self.flat_strings:
            for name, index in STRING_ARRAYS.items():
                create_array(g, index, shape=(num_images + 1,), dtype="int64", chunks=(min(shard_images, n + 1),))
                create_array(g, name, shape=((num_string_bytes or {}).get(name, 0),), dtype="uint8",
                             chunks=((string_chunk_bytes or {}).get(name, 4096),))
        else:  # a store of format version 1 or 2
            create_array(g, L.IDS, shape=(num_images,), dtype=str, **per_image)
            create_array(g, L.SOURCE, shape=(num_images,), dtype=str, **per_image)
        create_array(g, L.OK, shape=(num_images,), dtype=bool, fill_value=False, **per_image)
        for name in (L.HW, L.GRID):
            create_array(g, name, shape=(num_images, 2), dtype="int32", chunks=(shard_images, 2))
        create_array(g, L.PIXEL_OFFSETS, shape=(num_images + 1,), dtype="int64", chunks=(min(shard_images, n + 1),))
        create_array(g, L.PIXELS, shape=(num_pixel_bytes,), dtype="uint8", chunks=(pixel_chunk_bytes,),
                     shards=(pixel_shard_bytes,), compressor=None)  # already PNG/JPEG/WebP
        if num_mask_bytes is not None:
            create_array(g, L.MASK_OFFSETS, shape=(num_images + 1,), dtype="int64",
                         chunks=(min(shard_images, n + 1),))
            create_array(g, L.MASKS, shape=(num_mask_bytes,), dtype="uint8", chunks=(pixel_chunk_bytes,),
                         shards=(pixel_shard_bytes,), compressor=None)  # already PNG

    @property
    def has_masks(self) -> bool:
        return f"{L.IMAGES}/{L.MASKS}" in self.group and "masks" in self.group.attrs

    def mask_info(self) -> MaskInfo | None:
        """The root attribute ``masks`` as a ``MaskInfo`` (None: the store has no masks)."""
        return MaskInfo.from_dict(self.group.attrs["masks"]) if self.has_masks else None

    def write_failures(self, index: np.ndarray, reasons: list[str]) -> None:
        write_failure_table(self.group.require_group(f"{L.IMAGES}/{L.FAILURES}"), index, reasons,
                            flat=self.flat_strings)

    def failures(self) -> tuple[np.ndarray, list[str]]:
        path = f"{L.IMAGES}/{L.FAILURES}"
        return read_failure_table(self.group[path] if path in self.group else None)

    def labels(self) -> np.ndarray | None:
        return self.group[L.LABELS][:] if L.LABELS in self.group else None

    def write_labels(self, labels: np.ndarray, shard_images: int) -> None:
        arr = create_array(self.group, L.LABELS, shape=labels.shape, dtype="int32", chunks=(shard_images,),
                           fill_value=-1)
        arr[:] = labels.astype(np.int32)

    def clear_rows(self, array: zarr.Array, r0: int, r1: int) -> None:
        """Delete the chunk (or shard) objects that hold rows [r0, r1) of ``array`` (whole objects a unit owns).

        A unit rewrites its objects whole; without this, zarr reads an existing object before writing an
        edge chunk into it, and a damaged or half-written object would fail the rewrite that repairs it.
        """
        if r1 <= r0:
            return
        rows = int((array.shards or array.chunks)[0])
        rest = (0,) * (array.ndim - 1)
        for k in range(r0 // rows, (r1 - 1) // rows + 1):
            path = self.path(array.path, array.metadata.chunk_key_encoding.encode_chunk_key((k, *rest)))
            if self.fs.exists(path):
                self.fs.rm(path)

    def image_array(self, name: str) -> zarr.Array:
        return self.group[f"{L.IMAGES}/{name}"]

    def image_strings(self, name: str, rows: slice | None = None) -> list[str]:
        """``images/ids`` or ``images/source`` (rows ``rows``, default all) as strings, in any format version."""
        return read_strings(self.group[L.IMAGES], name, STRING_ARRAYS[name], rows)

    def token_offsets(self) -> np.ndarray:
        """Student-grid token offsets [N+1] from images/grid (shared by every teacher)."""
        return token_offsets(self.image_array(L.OK)[:], self.image_array(L.GRID)[:])

    # ------------------------------------------------------------------ teachers
    def teacher_group(self, name: str) -> zarr.Group:
        return self.group[f"{L.TEACHERS}/{name}"]

    def teacher_codec(self, name: str) -> str:
        """How the teacher's features are stored (``storage.codecs``); groups written before codecs: their dtype."""
        attrs = self.teacher_attrs(name)
        return str(attrs.get("codec") or attrs.get("dtype") or self.teacher_group(name)[L.PATCHES].dtype)

    def has_teacher(self, name: str) -> bool:
        return f"{L.TEACHERS}/{name}" in self.group

    def check_teacher(self, spec: TeacherGroupSpec) -> bool:
        """True when the group exists whole with this exact fingerprint (resume); raises on a conflict.

        A group whose creation was interrupted (no attributes yet, or ``created`` still false) is not
        whole: the caller creates it again.
        """
        if not self.has_teacher(spec.name):
            return False
        attrs = self.teacher_attrs(spec.name)
        if "fingerprint" not in attrs:
            return False
        stored, ours = with_added_fields(attrs["fingerprint"]), with_added_fields(spec.fingerprint)
        if digest(stored) != digest(ours):
            changes = "\n  ".join(diff(stored, ours)) or "(digests differ)"
            raise StoreError(
                f"teacher '{spec.name}' already exists in {self.url} with another fingerprint:\n  {changes}\n"
                f"Choose another --name, or write to a new store (for compute_dtype: pass the stored one with "
                f"--compute-dtype)."
            )
        return bool(attrs.get("created", True))  # stores written before the flag existed were whole

    def create_teacher(
        self,
        spec: TeacherGroupSpec,
        offsets: np.ndarray,
        *,
        shard_images: int,
        shard_rows: int,
        chunk_rows: int,
        image_chunk: int = 16,
        extra_attrs: dict | None = None,
        heads: tuple[dict[str, np.ndarray], dict] | None = None,
    ) -> zarr.Group:
        """Create ``teachers/<name>/`` with empty arrays sized from the token offsets, and its frozen heads.

        Three steps a crash can interrupt, each repaired by creating again: the group with all its
        attributes in one metadata write (``created`` false), then the arrays and heads, then
        ``created`` true. Until then no unit is computed, so recreating loses nothing.
        """
        num_images, total = len(offsets) - 1, int(offsets[-1])
        self._allow_codec(spec.codec)
        attrs = {
            "fingerprint": spec.fingerprint,
            "fingerprint_digest": spec.fingerprint_digest,
            "dims": {"summary": spec.summary_dim, "patches": spec.patch_dim},
            "num_registers": spec.num_registers,
            "dtype": feature_array_options(spec.codec)["dtype"],  # what a read returns
            "codec": spec.codec,
            "layers": [],
            "created": False,
            "complete": False,
            "shard_rows": shard_rows,
            "shard_images": shard_images,
            **(extra_attrs or {}),
        }
        g = self.group.require_group(L.TEACHERS).create_group(spec.name, attributes=attrs, overwrite=True)
        fault_point("teacher.create")
        opts, per_image = feature_array_options(spec.codec), feature_array_options(spec.codec, per_image=True)
        # per-image features: one shard per write unit, small inner chunks for random access
        inner = min(image_chunk, shard_images)
        create_array(g, L.SUMMARY, shape=(num_images, spec.summary_dim), chunks=(inner, spec.summary_dim),
                     shards=(shard_images, spec.summary_dim), fill_value=0, **per_image)
        create_array(g, L.PATCHES, shape=(total, spec.patch_dim), chunks=(min(chunk_rows, shard_rows), spec.patch_dim),
                     shards=(shard_rows, spec.patch_dim), fill_value=0, **opts)
        create_array(g, L.OFFSETS, shape=(num_images + 1,), dtype="int64", chunks=(shard_images,))
        if spec.num_registers:
            create_array(g, L.REGISTERS, shape=(num_images, spec.num_registers, spec.patch_dim),
                         chunks=(inner, spec.num_registers, spec.patch_dim),
                         shards=(shard_images, spec.num_registers, spec.patch_dim), fill_value=0, **per_image)
        fault_point("teacher.heads")
        if heads is not None and heads[0]:
            self.write_heads(spec.name, *heads)
        g.attrs.update({"created": True})
        self.repair_teacher_index()
        return g

    def _allow_codec(self, codec: str) -> None:
        """A codec beyond the plain dtypes needs a reader that knows it: the store says so with its version (4).

        A version 3 store is raised to 4 (its layout is 4's); versions 1-2 keep zarr strings, which 4 does not."""
        if STORED_DTYPE[codec] == codec or self.format_version >= L.CODEC_VERSION:
            return
        if self.format_version < L.FLAT_STRINGS_VERSION:
            raise StoreError(f"{self.url} is a format version {self.format_version} store: it cannot hold targets "
                             f"stored with --codec {codec} (version {L.CODEC_VERSION}); use float16 or float32, or a "
                             "new store")
        self.group.attrs.update({"format_version": L.CODEC_VERSION})

    def create_layers(self, name: str, dims: dict[int, int], rule: str) -> None:
        """Create the arrays ``layers/<k>`` [T, Dk] missing for ``dims`` with the chunks and shards of ``patches``
        (so a unit owns the same rows of each); ``layer_dims`` records every width and ``layer_rule`` what
        they hold. ``layers`` (the complete ones) is only extended by ``complete_layers``."""
        g = self.teacher_group(name)
        patches = g[L.PATCHES]
        opts = feature_array_options(self.teacher_codec(name))
        group = g.require_group(L.LAYERS)
        for k, dim in dims.items():
            if str(k) in group:
                if group[str(k)].shape[1] != dim:
                    raise StoreError(f"{self.url}: teachers/{name}/{L.layer_path(k)} has width {group[str(k)].shape[1]}, "
                                     f"the teacher gives {dim}")
                continue
            create_array(group, str(k), shape=(patches.shape[0], dim), chunks=(patches.chunks[0], dim),
                         shards=(patches.shards[0], dim), fill_value=0, **opts)
        known = {str(k): int(v) for k, v in (g.attrs.get("layer_dims") or {}).items()}
        g.attrs.update({"layer_dims": {**known, **{str(k): int(v) for k, v in dims.items()}}, "layer_rule": rule})

    def complete_layers(self, name: str, layers: list[int]) -> None:
        g = self.teacher_group(name)
        g.attrs.update({"layers": sorted(set(int(k) for k in g.attrs.get("layers", [])) | set(layers))})

    def write_heads(self, name: str, tensors: dict[str, np.ndarray], config: dict) -> None:
        g = self.teacher_group(name).require_group(L.HEADS)
        for key, value in tensors.items():
            arr = create_array(g, key, shape=value.shape, dtype=value.dtype)
            arr[...] = value
        g.attrs.update({"config": config})

    def write_text(self, name: str, set_name: str, embeddings: np.ndarray, attrs: dict) -> None:
        """``text/<set_name>`` [C, D] float32 with ``attrs`` (kind, score, classes or prompts: ``stages.text_sets``);
        a set of that name is replaced."""
        g = self.teacher_group(name).require_group(L.TEXT)
        arr = create_array(g, set_name, shape=embeddings.shape, dtype="float32", overwrite=True)
        arr[...] = embeddings.astype(np.float32)
        arr.attrs.update(attrs)

    def text_sets(self, name: str) -> dict[str, tuple[np.ndarray, dict]]:
        """Every ``text/<set>`` of teacher ``name``: (embeddings [C, D], attrs)."""
        g = self.teacher_group(name)
        if L.TEXT not in g:
            return {}
        return {key: (np.asarray(arr[:], np.float32), dict(arr.attrs)) for key, arr in g[L.TEXT].arrays()}

    def phis_path(self, teacher: str, feature: str) -> str:
        """The URL of a PHI-S file (a local path, or e.g. ``s3://bucket/...``): what ``PhisTransform.save/load``
        open with their own filesystem, so it keeps the store's protocol."""
        return self.url_of(L.TEACHERS, teacher, L.PHIS, f"{feature}.npz")

    def teacher_attrs(self, name: str) -> dict:
        return dict(self.teacher_group(name).attrs)

    @property
    def shard_images(self) -> int:
        """Images per write unit (and per shard of every per-image array), fixed by the first ingest."""
        return int(self.group.attrs["shard_images"])

    def plan(self) -> ShardPlan:
        return ShardPlan(self.num_images, self.shard_images)
