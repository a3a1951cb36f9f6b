"""Per-pixel label maps stored next to the pixels (``images/masks``, format version 2).

A mask is one integer per pixel of the stored (policy-resized) image, PNG-encoded: 8-bit for
``classes`` (the value is a class index, 255 = ignore), 16-bit for ``values`` (a regression target such
as depth: the value divided by ``scale``, 65535 = unknown). Masks are resized with nearest-neighbour
sampling, never interpolated: a class index or a depth at a boundary must stay one of the source's
values. ``MaskInfo`` is what the root attribute ``masks`` records.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

__all__ = ["MASK_KINDS", "MaskInfo", "decode_mask", "encode_mask", "read_mask_file", "resize_mask"]

MASK_KINDS = ("classes", "values")
_IGNORE = {"classes": 255, "values": 65535}
_DTYPE = {"classes": np.uint8, "values": np.uint16}


@dataclass(frozen=True)
class MaskInfo:
    """How to read ``images/masks``: the kind, the ignore value, the class names or the value scale."""

    kind: str = "classes"
    classes: list[str] = field(default_factory=list)  # names of class 0, 1, ... (may be empty: indices only)
    scale: float = 1.0  # values: the real target is stored / scale
    ignore: int = 255
    sources_digest: str = ""  # digest of the mask files' list (a rerun with other masks is refused)

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {', '.join(MASK_KINDS)}, got {self.kind!r}")
        if self.ignore != _IGNORE[self.kind]:
            raise ValueError(f"{self.kind} masks use {_IGNORE[self.kind]} as the ignore value, got {self.ignore}")
        if not self.scale > 0:
            raise ValueError(f"mask value scale must be positive, got {self.scale}")
        if len(self.classes) > 255:
            raise ValueError(f"class masks hold at most 255 classes (255 is ignore), got {len(self.classes)} names")

    @classmethod
    def for_kind(cls, kind: str, **kwargs) -> "MaskInfo":
        return cls(kind=kind, ignore=_IGNORE.get(kind, 255), **kwargs)

    @property
    def dtype(self) -> type:
        return _DTYPE[self.kind]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MaskInfo":
        return cls(**{**data, "classes": list(data.get("classes") or [])})


def read_mask_file(data: bytes, kind: str, where: str) -> Image.Image:
    """A mask file's bytes as a PIL image of the kind's integer mode (``L`` or ``I;16``); refuses colour
    images and 16-bit values in a class mask, naming ``where``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise ValueError(f"mask {where} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "F"):
        raise ValueError(f"mask {where} is a {img.mode} image: a mask has one integer channel (mode L, P, I or I;16)")
    values = np.asarray(img)
    if kind == "classes":
        if values.size and (int(values.max()) > 255 or int(values.min()) < 0):
            bad = int(values.max()) if int(values.max()) > 255 else int(values.min())
            raise ValueError(f"mask {where} has value {bad}: class masks hold 0..254 (255 = ignore)")
        return Image.fromarray(values.astype(np.uint8), mode="L")
    if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise ValueError(f"mask {where} has values outside 0..65535")
    return Image.fromarray(values.astype(np.uint16))


def resize_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Nearest-neighbour resize to ``size`` (width, height): every output pixel is one of the input's values."""
    return mask if mask.size == size else mask.resize(size, Image.NEAREST)


def encode_mask(mask: Image.Image | np.ndarray) -> bytes:
    """Lossless PNG of an 8- or 16-bit single-channel mask."""
    img = Image.fromarray(mask) if isinstance(mask, np.ndarray) else mask
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_mask(data: bytes | np.ndarray) -> np.ndarray:
    """PNG bytes -> [H, W] uint8 (classes) or uint16 (values)."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    with Image.open(io.BytesIO(raw)) as img:
        values = np.asarray(img)
    return values.astype(np.uint16) if values.dtype.itemsize > 1 else values.astype(np.uint8)
