"""The store's image policy: how a decoded image becomes the pixels the student trains on.

AMoE §3.2/§3.4 trains on native-resolution images packed by token count, so the policy keeps the
aspect ratio, snaps both sides to multiples of the student patch size and clamps the token count to
``[min_tokens, max_tokens]``. It is deterministic (a pure function of the input size), recorded in
the store's attributes, and the same for every teacher of a store.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

__all__ = ["ImagePolicy", "target_grid"]

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _candidates(a: float, b: float) -> list[tuple[int, int]]:
    fa, fb = max(1, math.floor(a)), max(1, math.floor(b))
    return [(x, y) for x in {fa, max(1, math.ceil(a))} for y in {fb, max(1, math.ceil(b))}]


def target_grid(height: int, width: int, patch: int, min_tokens: int, max_tokens: int) -> tuple[int, int]:
    """Token grid (gh, gw) for an image of ``height x width`` pixels.

    Scale the image so its (real-valued) token count ``h*w/patch^2`` lies in ``[min, max]`` (scale 1 when
    it already does), then round each side to an integer number of patches. Among the floor/ceil
    roundings we keep those inside the token range and pick the one whose aspect ratio is closest to
    the original (ties: more tokens). When no rounding fits, the closest-aspect grid with a token
    count in range is searched exhaustively (so the range is always honoured).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if patch <= 0 or min_tokens <= 0 or max_tokens < min_tokens:
        raise ValueError(f"bad policy: patch={patch}, min_tokens={min_tokens}, max_tokens={max_tokens}")
    gh, gw = height / patch, width / patch
    tokens = gh * gw
    scale = 1.0
    if tokens > max_tokens:
        scale = math.sqrt(max_tokens / tokens)
    elif tokens < min_tokens:
        scale = math.sqrt(min_tokens / tokens)
    gh, gw = gh * scale, gw * scale
    aspect = math.log(height / width)
    inside = [(x, y) for x, y in _candidates(gh, gw) if min_tokens <= x * y <= max_tokens]
    if inside:
        return min(inside, key=lambda c: (abs(math.log(c[0] / c[1]) - aspect), -c[0] * c[1]))
    # No rounding fits (very elongated images, or a narrow [min, max] range): search every height
    # for the width in range closest to the aspect ratio. O(max_tokens), taken only in these cases.
    best, best_key = (1, 1), None
    for x in range(1, max_tokens + 1):
        lo, hi = math.ceil(min_tokens / x), max_tokens // x
        if lo > hi:
            continue
        y = min(max(round(x * width / height), lo), hi)
        key = (abs(math.log(x / y) - aspect), -x * y)
        if best_key is None or key < best_key:
            best, best_key = (x, y), key
    return best


@dataclass(frozen=True)
class ImagePolicy:
    """Resize + encode rule shared by every teacher of a store (recorded in the store attributes)."""

    patch_size: int = 16
    min_tokens: int = 64
    max_tokens: int = 256
    format: str = "png"
    quality: int = 95
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.format not in _FORMATS:
            raise ValueError(f"image format must be one of {sorted(_FORMATS)}, got {self.format!r}")
        if self.resample not in ("bicubic", "bilinear", "lanczos"):
            raise ValueError(f"resample must be bicubic, bilinear or lanczos, got {self.resample!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        target_grid(self.patch_size, self.patch_size, self.patch_size, self.min_tokens, self.max_tokens)

    @property
    def lossless(self) -> bool:
        return self.format == "png"

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return target_grid(height, width, self.patch_size, self.min_tokens, self.max_tokens)

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize an RGB image to the policy's pixel size (a multiple of the patch size per side)."""
        gh, gw = self.grid(image.height, image.width)
        size = (gw * self.patch_size, gh * self.patch_size)
        if image.size == size:
            return image
        method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[self.resample]
        return image.resize(size, method, reducing_gap=None)

    def encode(self, image: Image.Image) -> bytes:
        buf = io.BytesIO()
        kwargs = {"optimize": False, "compress_level": 6} if self.format == "png" else {"quality": self.quality}
        if self.format == "webp" and self.quality == 100:
            kwargs = {"lossless": True}
        image.save(buf, format=_FORMATS[self.format], **kwargs)
        return buf.getvalue()

    @staticmethod
    def decode(data: bytes | np.ndarray) -> np.ndarray:
        """Encoded bytes -> uint8 array [H, W, 3]."""
        raw = data.tobytes() if isinstance(data, np.ndarray) else data
        with Image.open(io.BytesIO(raw)) as img:
            return np.asarray(img.convert("RGB"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImagePolicy":
        return cls(**data)
