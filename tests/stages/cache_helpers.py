"""Helpers for the cache-teachers tests: a small real image folder with every kind of bad file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

TINY_VIT = "timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,num_heads=2"
TINY_CNN = "timm:efficientnet_lite0"


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()]


def write_image_folder(root: Path, *, bad: bool = True) -> dict[str, str]:
    """Real photos at several sizes and modes, plus (optionally) every kind of bad file."""
    root.mkdir(parents=True, exist_ok=True)
    expected_bad = {}
    rng = np.random.default_rng(0)
    for k, photo in enumerate(_photos()):
        img = Image.fromarray(photo)
        for j, scale in enumerate((0.25, 0.4)):
            size = (max(8, int(img.width * scale)), max(8, int(img.height * scale * (1 + 0.3 * j))))
            img.resize(size).save(root / f"photo{k}_{j}.png")
    Image.fromarray(_photos()[0]).convert("L").resize((90, 70)).save(root / "gray.png")
    Image.fromarray(_photos()[1]).convert("RGBA").resize((64, 100)).save(root / "rgba.png")
    Image.fromarray(_photos()[2]).convert("P").resize((120, 60)).save(root / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (48, 40))).astype(np.uint16)).save(root / "deep16.png")
    if bad:
        (root / "zero.png").write_bytes(b"")
        (root / "text.jpg").write_bytes(b"this is not an image at all\n" * 10)
        buf = io.BytesIO()
        Image.fromarray(_photos()[3]).resize((200, 150)).save(buf, format="PNG")
        (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        buf = io.BytesIO()
        Image.fromarray(_photos()[4]).resize((200, 150)).convert("RGB").save(buf, format="JPEG")
        raw = bytearray(buf.getvalue())
        raw[200:600] = os.urandom(400)
        (root / "corrupt.jpg").write_bytes(bytes(raw[: len(raw) // 3]))
        expected_bad = {"zero.png": "empty", "text.jpg": "not-an-image", "truncated.png": "truncated"}
    return expected_bad


def store_arrays(url: str) -> dict[str, np.ndarray]:
    """Every array of a Zarr group and its subgroups, by path."""
    import warnings

    import zarr

    out = {}

    def visit(prefix, group):
        for name, arr in group.arrays():
            out[f"{prefix}{name}"] = arr[:]
        for name, sub in group.groups():
            visit(f"{prefix}{name}/", sub)

    with warnings.catch_warnings():  # _commits/, _locks/, phis/ are files beside the arrays, not members
        warnings.simplefilter("ignore")
        visit("", zarr.open_group(url, mode="r"))
    return out
