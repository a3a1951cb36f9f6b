"""A store of any size in seconds, written without any model: for tests (and benchmarks) of the index's scale.

It holds what training reads, through ``FeatureStore``: the per-image arrays (ok, grid, hw, pixel offsets,
labels), pixels (one flat-grey PNG per distinct grid, so every image decodes) and one teacher with small
random targets and its token offsets. Failed images are rows with ``ok`` false, no pixels and no tokens, as
the writers leave them. Not written: commit markers and PHI-S (nothing on the data path reads them), and ids and
sources unless asked (``strings``: what `inspect --verify` checks).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from storage import layout as L
from storage.image_policy import ImagePolicy
from storage.store import STRING_ARRAYS, FeatureStore, TeacherGroupSpec, token_offsets
from storage.strings import encode_strings

TEACHER = "tiny"


def write_synthetic_store(url: str, num_images: int, *, shard_images: int, dim: int = 4, patch: int = 16,
                          max_side: int = 1, failed_every: int = 0, seed: int = 0, strings: bool = False,
                          pixel_shard_bytes: int = 1 << 22) -> str:
    """``num_images`` images of grids up to ``max_side`` x ``max_side`` tokens (drawn from ``seed``); every
    ``failed_every``-th image failed (0: none); one teacher ``TEACHER`` with ``dim``-wide float16 targets."""
    rng = np.random.default_rng(seed)
    policy = ImagePolicy(patch_size=patch, min_tokens=1, max_tokens=max_side * max_side)
    store = FeatureStore.open_or_create(url, policy, "tests/synthetic_store.py")
    store.update_attrs(shard_images=shard_images)
    ok = np.ones(num_images, bool)
    if failed_every:
        ok[failed_every - 1::failed_every] = False
    grid = rng.integers(1, max_side + 1, size=(num_images, 2)).astype(np.int32)
    pngs = {(h, w): np.frombuffer(policy.encode(Image.new("RGB", (w * patch, h * patch), (h * 40, w * 40, 90))), np.uint8)
            for h in range(1, max_side + 1) for w in range(1, max_side + 1)}
    shape = (grid[:, 0] - 1) * max_side + grid[:, 1] - 1  # index of each image's PNG in `table`
    table = list(pngs.values())
    sizes = np.where(ok, np.array([len(p) for p in table])[shape], 0)
    pixel_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    texts = {L.IDS: [f"{i:032x}" for i in range(num_images)],
             L.SOURCE: [f"synthetic/{i}.png" for i in range(num_images)]} if strings else {}
    encoded = {name: encode_strings(items) for name, items in texts.items()}
    store.create_image_arrays(num_images, int(pixel_offsets[-1]), shard_images=shard_images,
                              pixel_shard_bytes=pixel_shard_bytes, pixel_chunk_bytes=1 << 16,
                              num_string_bytes={name: int(data.size) for name, (data, _) in encoded.items()},
                              string_chunk_bytes={name: 1 << 16 for name in encoded})
    images = store.group[L.IMAGES]
    for name, (data, sizes) in encoded.items():
        images[name][:] = data
        images[STRING_ARRAYS[name]][:] = np.concatenate([[0], np.cumsum(sizes)])
    images[L.OK][:] = ok
    images[L.GRID][:] = grid
    images[L.HW][:] = grid * patch
    images[L.PIXEL_OFFSETS][:] = pixel_offsets
    if len(table) == 1:
        images[L.PIXELS][:] = np.tile(table[0], int(ok.sum()))
    else:
        images[L.PIXELS][:] = np.concatenate([table[k] for k in shape[ok]]) if ok.any() else np.zeros(0, np.uint8)
    failed = np.flatnonzero(~ok)
    store.write_failures(failed, ["synthetic"] * len(failed))
    store.write_labels(rng.integers(-1, 10, size=num_images).astype(np.int32), shard_images)

    offsets = token_offsets(ok, grid)
    spec = TeacherGroupSpec(TEACHER, dim, dim, 0, "float16", {"synthetic": True, "dim": dim})
    store.create_teacher(spec, offsets, shard_images=shard_images, shard_rows=1 << 14, chunk_rows=1 << 12,
                         image_chunk=shard_images)  # one inner chunk per shard: fast to write
    g = store.teacher_group(TEACHER)
    g[L.SUMMARY][:] = rng.standard_normal((num_images, dim), np.float32).astype(np.float16)
    g[L.PATCHES][:] = rng.standard_normal((int(offsets[-1]), dim), np.float32).astype(np.float16)
    g[L.OFFSETS][:] = offsets
    g.attrs.update({"complete": True})
    store.update_attrs(images_complete=True, num_images=num_images)
    return url
