"""Image sources for every stage: folders, path lists and webdataset-style tar shards, decoded to RGB.

Bad files are a fact of billion-image pools, so decoding never raises anything but ``DecodeError``
with a short, deterministic, machine-readable reason ("empty", "not-an-image", "truncated",
"too-large", "corrupt: ...") that the caller records in the store's failure table.
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DecodeError", "ImageRef", "decode_rgb", "image_id", "iter_bytes", "list_images", "read_bytes"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
TAR_SEP = "::"
# Alpha is composited over mid-gray: neutral for both dark and light content, and the same value
# every teacher and the student see (dropping alpha would expose arbitrary hidden RGB values).
BACKGROUND = (128, 128, 128)
DEFAULT_MAX_PIXELS = 1 << 28  # 268M pixels: larger files are treated as decompression bombs


class DecodeError(ValueError):
    """An image that cannot be used; ``reason`` is short and deterministic (it is stored)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, order=True)
class ImageRef:
    """Where an image lives: a file path, or ``"<tar path>::<member name>"``."""

    source: str

    @property
    def in_tar(self) -> bool:
        return TAR_SEP in self.source

    def split(self) -> tuple[str, str]:
        tar, _, member = self.source.partition(TAR_SEP)
        return tar, member


# ----------------------------------------------------------------------------- listing
def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..003}.tar`` -> a-000.tar ... a-003.tar (zero padding kept), recursively."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for k in range(int(lo), int(hi) + 1):
        out += _expand_braces(pattern[: m.start()] + str(k).zfill(width) + pattern[m.end():])
    return out


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _tar_members(path: str) -> list[ImageRef]:
    try:
        with tarfile.open(path) as tar:
            return [ImageRef(f"{path}{TAR_SEP}{m.name}") for m in tar if m.isfile() and _is_image_name(m.name)]
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot read tar shard {path}: {exc}") from None


def list_images(spec: str | Path) -> list[ImageRef]:
    """Images named by ``spec``: a folder (recursive), a ``.tar``/brace/glob of tar shards, or a path list.

    A curation manifest (a folder or file written by ``pipeline curate``) is another kind of list
    and plugs in here when that stage exists.
    """
    text = str(spec)
    if any(c in text for c in "{*?["):
        shards = sorted({p for pat in _expand_braces(text) for p in glob.glob(pat)})
        if not shards:
            raise ValueError(f"no files match {text}")
        refs = [r for shard in shards for r in _tar_members(shard)]
    else:
        path = Path(text)
        if not path.exists():
            raise ValueError(f"IMAGES not found: {path}")
        if path.is_dir():
            refs = [ImageRef(str(p)) for p in sorted(path.rglob("*")) if p.is_file() and _is_image_name(p.name)]
        elif path.suffix == ".tar":
            refs = _tar_members(str(path))
        else:
            refs = []
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    refs.append(ImageRef(str(entry if entry.is_absolute() else (path.parent / entry))))
    if not refs:
        raise ValueError(f"no images found in {text}")
    return refs


# ----------------------------------------------------------------------------- reading
def read_bytes(ref: ImageRef) -> bytes:
    if ref.in_tar:
        tar_path, member = ref.split()
        with tarfile.open(tar_path) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{member} is not a file in {tar_path}")
            return f.read()
    return Path(ref.source).read_bytes()


def iter_bytes(refs: Iterable[ImageRef]) -> Iterator[tuple[ImageRef, bytes | Exception]]:
    """Bytes of each ref in order; a tar shard is opened once for its consecutive members."""
    open_tar: tuple[str, tarfile.TarFile] | None = None
    try:
        for ref in refs:
            try:
                if ref.in_tar:
                    tar_path, member = ref.split()
                    if open_tar is None or open_tar[0] != tar_path:
                        if open_tar is not None:
                            open_tar[1].close()
                        open_tar = (tar_path, tarfile.open(tar_path))
                    f = open_tar[1].extractfile(member)
                    if f is None:
                        raise FileNotFoundError(f"{member} is not a file in {tar_path}")
                    yield ref, f.read()
                else:
                    yield ref, Path(ref.source).read_bytes()
            except (OSError, tarfile.TarError, KeyError) as exc:
                yield ref, exc
    finally:
        if open_tar is not None:
            open_tar[1].close()


def image_id(data: bytes) -> str:
    """Stable content id: the first 32 hex digits of the bytes' sha256."""
    return hashlib.sha256(data).hexdigest()[:32]


# ----------------------------------------------------------------------------- decoding
def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = arr / 257.0  # 65535 -> 255: the full 16-bit range maps onto 8 bits
        elif mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            scaled = arr / 257.0  # PNG 16-bit gray often decodes as mode I
        else:
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an RGB image (EXIF orientation applied, first frame of animations), or DecodeError."""
    if not data:
        raise DecodeError("empty")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never be padded with gray
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise DecodeError(f"too-large: {img.width}x{img.height}")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not-an-image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError("too-large") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "unrecognized data stream" in msg or "broken data stream" in msg:
            raise DecodeError("truncated") from None
        raise DecodeError(f"corrupt: {_clean(msg)}") from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, struct_error()) as exc:
        raise DecodeError(f"corrupt: {type(exc).__name__}: {_clean(str(exc))}") from None


def struct_error() -> type:
    import struct

    return struct.error


def _clean(msg: str) -> str:
    """Drop object addresses etc. so reasons are deterministic across runs."""
    return re.sub(r" at 0x[0-9a-f]+", "", msg)[:200]
