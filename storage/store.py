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
from zarr.codecs import BloscCodec, BloscShuffle

from . import layout as L
from .failures import read_failure_table, write_failure_table
from .fingerprint import diff, digest
from .fsutil import atomic_write, filesystem, join
from .image_policy import ImagePolicy
from .shards import ShardPlan

__all__ = ["FeatureStore", "StoreError", "TeacherGroupSpec", "feature_compressor"]


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, incompatible, conflicting fingerprint)."""


def feature_compressor(dtype: str) -> BloscCodec:
    """Blosc+zstd with byte shuffle: groups the high bytes of float16/32 values, which compress well."""
    size = np.dtype(dtype).itemsize
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=size)


@dataclass(frozen=True)
class TeacherGroupSpec:
    """Shape facts and fingerprint of one ``teachers/<name>`` group, fixed when it is created."""

    name: str
    summary_dim: int
    patch_dim: int
    num_registers: int
    dtype: str
    fingerprint: dict

    @property
    def fingerprint_digest(self) -> str:
        return digest(self.fingerprint)


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
        group = zarr.open_group(str(url), mode=mode)
        version = group.attrs.get("format_version")
        if version != L.FORMAT_VERSION:
            raise StoreError(f"{url}: store format version {version!r}, this code reads {L.FORMAT_VERSION}")
        return cls(str(url), group)

    @classmethod
    def open_or_create(cls, url: str, policy: ImagePolicy, created_by: str) -> "FeatureStore":
        fs, root = filesystem(str(url))
        if fs.exists(join(root, "zarr.json")):
            store = cls.open(url, mode="r+")
            if store.policy != policy:
                raise StoreError(
                    f"{url} was written with image policy {store.policy.to_dict()}, "
                    f"not {policy.to_dict()}; use another --store or the same policy"
                )
            return store
        group = zarr.open_group(str(url), mode="w")
        group.attrs.update(
            {
                "format_version": L.FORMAT_VERSION,
                "created_by": created_by,
                "image_policy": policy.to_dict(),
                "teachers": [],
                "images_complete": False,
            }
        )
        return cls(str(url), group)

    # ------------------------------------------------------------------ attributes
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def update_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    @property
    def policy(self) -> ImagePolicy:
        return ImagePolicy.from_dict(self.group.attrs["image_policy"])

    @property
    def images_complete(self) -> bool:
        return bool(self.group.attrs.get("images_complete", False))

    @property
    def num_images(self) -> int:
        return int(self.group[f"{L.IMAGES}/{L.IDS}"].shape[0])

    @property
    def teacher_names(self) -> list[str]:
        return list(self.group.attrs.get("teachers", []))

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
    ) -> None:
        """Create images/ arrays (empty); units then fill their shards."""
        g = self.group.require_group(L.IMAGES)
        n = max(num_images, 1)
        per_image = dict(chunks=(shard_images,), overwrite=True)
        g.create_array(L.IDS, shape=(num_images,), dtype=str, **per_image)
        g.create_array(L.SOURCE, shape=(num_images,), dtype=str, **per_image)
        g.create_array(L.OK, shape=(num_images,), dtype=bool, fill_value=False, **per_image)
        for name in (L.HW, L.GRID):
            g.create_array(name, shape=(num_images, 2), dtype="int32", chunks=(shard_images, 2), overwrite=True)
        g.create_array(
            L.PIXEL_OFFSETS, shape=(num_images + 1,), dtype="int64", chunks=(min(shard_images, n + 1),), overwrite=True
        )
        g.create_array(
            L.PIXELS,
            shape=(num_pixel_bytes,),
            dtype="uint8",
            chunks=(pixel_chunk_bytes,),
            shards=(pixel_shard_bytes,),
            compressors=None,  # already PNG/JPEG/WebP
            overwrite=True,
        )

    def write_failures(self, index: np.ndarray, reasons: list[str]) -> None:
        write_failure_table(self.group.require_group(f"{L.IMAGES}/{L.FAILURES}"), index, reasons)

    def failures(self) -> tuple[np.ndarray, list[str]]:
        path = f"{L.IMAGES}/{L.FAILURES}"
        return read_failure_table(self.group[path] if path in self.group else None)

    def write_labels(self, labels: np.ndarray, shard_images: int) -> None:
        arr = self.group.create_array(
            L.LABELS, shape=labels.shape, dtype="int32", chunks=(shard_images,), fill_value=-1, overwrite=True
        )
        arr[:] = labels.astype(np.int32)

    def image_array(self, name: str) -> zarr.Array:
        return self.group[f"{L.IMAGES}/{name}"]

    def token_offsets(self) -> np.ndarray:
        """Student-grid token offsets [N+1] from images/grid (shared by every teacher)."""
        grid = self.image_array(L.GRID)[:]
        ok = self.image_array(L.OK)[:]
        counts = np.where(ok, grid[:, 0].astype(np.int64) * grid[:, 1], 0)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # ------------------------------------------------------------------ teachers
    def teacher_group(self, name: str) -> zarr.Group:
        return self.group[f"{L.TEACHERS}/{name}"]

    def has_teacher(self, name: str) -> bool:
        return f"{L.TEACHERS}/{name}" in self.group

    def check_teacher(self, spec: TeacherGroupSpec) -> bool:
        """True when a group with this exact fingerprint exists (resume); raises on a conflict."""
        if not self.has_teacher(spec.name):
            return False
        existing = self.teacher_group(spec.name).attrs.get("fingerprint", {})
        if digest(existing) != spec.fingerprint_digest:
            changes = "\n  ".join(diff(existing, spec.fingerprint)) or "(digests differ)"
            raise StoreError(
                f"teacher '{spec.name}' already exists in {self.url} with another fingerprint:\n  {changes}\n"
                f"Choose another --name, or write to a new store."
            )
        return True

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
    ) -> zarr.Group:
        """Create teachers/<name>/ with empty arrays sized from the token offsets."""
        num_images, total = len(offsets) - 1, int(offsets[-1])
        g = self.group.require_group(f"{L.TEACHERS}/{spec.name}")
        comp = feature_compressor(spec.dtype)
        # per-image features: one shard per write unit, small inner chunks for random access
        inner = min(image_chunk, shard_images)
        g.create_array(
            L.SUMMARY,
            shape=(num_images, spec.summary_dim),
            dtype=spec.dtype,
            chunks=(inner, spec.summary_dim),
            shards=(shard_images, spec.summary_dim),
            compressors=comp,
            fill_value=0,
            overwrite=True,
        )
        g.create_array(
            L.PATCHES,
            shape=(total, spec.patch_dim),
            dtype=spec.dtype,
            chunks=(min(chunk_rows, shard_rows), spec.patch_dim),
            shards=(shard_rows, spec.patch_dim),
            compressors=comp,
            fill_value=0,
            overwrite=True,
        )
        g.create_array(
            L.OFFSETS, shape=(num_images + 1,), dtype="int64", chunks=(shard_images,), overwrite=True
        )
        if spec.num_registers:
            g.create_array(
                L.REGISTERS,
                shape=(num_images, spec.num_registers, spec.patch_dim),
                dtype=spec.dtype,
                chunks=(inner, spec.num_registers, spec.patch_dim),
                shards=(shard_images, spec.num_registers, spec.patch_dim),
                compressors=comp,
                fill_value=0,
                overwrite=True,
            )
        g.attrs.update(
            {
                "fingerprint": spec.fingerprint,
                "fingerprint_digest": spec.fingerprint_digest,
                "dims": {"summary": spec.summary_dim, "patches": spec.patch_dim},
                "num_registers": spec.num_registers,
                "dtype": spec.dtype,
                "layers": [],
                "complete": False,
                "shard_rows": shard_rows,
                "shard_images": shard_images,
                **(extra_attrs or {}),
            }
        )
        names = self.teacher_names
        if spec.name not in names:
            self.update_attrs(teachers=names + [spec.name])
        return g

    def write_heads(self, name: str, tensors: dict[str, np.ndarray], config: dict) -> None:
        g = self.teacher_group(name).require_group(L.HEADS)
        for key, value in tensors.items():
            arr = g.create_array(key, shape=value.shape, dtype=value.dtype, overwrite=True)
            arr[...] = value
        g.attrs.update({"config": config})

    def write_text(self, name: str, set_name: str, embeddings: np.ndarray, prompts: list[str]) -> None:
        g = self.teacher_group(name).require_group(L.TEXT)
        arr = g.create_array(set_name, shape=embeddings.shape, dtype="float32", overwrite=True)
        arr[...] = embeddings.astype(np.float32)
        arr.attrs.update({"prompts": prompts})

    def phis_path(self, teacher: str, feature: str) -> str:
        return self.path(L.TEACHERS, teacher, L.PHIS, f"{feature}.npz")

    def teacher_attrs(self, name: str) -> dict:
        return dict(self.teacher_group(name).attrs)

    @property
    def shard_images(self) -> int:
        """Images per write unit (and per shard of every per-image array), fixed by the first ingest."""
        return int(self.group.attrs["shard_images"])

    def plan(self) -> ShardPlan:
        return ShardPlan(self.num_images, self.shard_images)
