"""Image sources for every stage: folders, path lists and webdataset-style tar shards, decoded to RGB.

Bad files are a fact of billion-image pools, so decoding never raises anything but ``DecodeError``
with a short, deterministic, machine-readable reason ("empty", "not-an-image", "truncated",
"too-large", "corrupt: ...") that the caller records in the store's failure table.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import re
import struct
import tarfile
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "BACKGROUND",
    "absolute_source",
    "printable_source",
    "read_path_table",
    "read_source_table",
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "ImageRef",
    "decode_rgb",
    "image_id",
    "iter_bytes",
    "iter_decoded",
    "list_images",
    "read_bytes",
    "register_spec_reader",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TAR_SEP = "::"
# Pillow plugins allowed to decode (JPEG also opens multi-picture MPO files). Restricting them keeps
# web-pool files away from decoders we never meant to run (EPS, for one, starts Ghostscript); a file
# no listed plugin accepts is "not-an-image".
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
# Alpha is composited over mid-gray rather than dropped (dropping exposes whatever RGB hides under
# alpha=0) or put on white/black: 128 sits near the ImageNet channel means, so a transparent area
# normalizes to about zero for every teacher instead of a strong signal, and all models see the same.
BACKGROUND = (128, 128, 128)
# 8192 x 8192: a decoded RGB image of 200 MB, far beyond the <= 768 px any model here sees. Larger
# files are treated as decompression bombs. (Pillow's own hard stop at 2 x Image.MAX_IMAGE_PIXELS
# still applies above that and also reads "too-large".)
DEFAULT_MAX_PIXELS = 1 << 26
_OPEN_TARS = 8  # shards kept open at once by iter_bytes


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
        """(tar path, member name); only meaningful when ``in_tar``."""
        tar, _, member = self.source.partition(TAR_SEP)
        return tar, member


def printable_source(source: str) -> str:
    """A source as stores and manifests keep it: bytes of a file name that are not UTF-8 become ``\\xNN``.

    Such a name cannot be stored as text, and its escaped form names no file, so the image is recorded
    as a failure (``iter_decoded``) instead of silently kept under a name that does not resolve.
    """
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def absolute_source(source: str) -> str:
    """A source with an absolute path (tar members keep their member name), so it means the same from any folder."""
    if TAR_SEP in source:
        tar, _, member = source.partition(TAR_SEP)
        return f"{Path(tar).resolve()}{TAR_SEP}{member}"
    return str(Path(source).resolve())


def read_path_table(path: str | Path, columns: tuple[str, ...], what: str) -> dict[str, str]:
    """A ``path,<column>`` CSV as {absolute source: value}; paths in it are relative to its folder.

    ``columns`` are tried in order; the first the CSV has is read. The one reader of the labels CSV
    (cache-teachers) and the concepts CSV (curate).
    """
    base = Path(path).resolve().parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        present = set(reader.fieldnames or [])
        key = next((c for c in columns if c in present), None)
        if "path" not in present or key is None:
            wanted = " (or ".join(f"'{c}'" for c in columns) + ")" * (len(columns) - 1)
            raise ValueError(f"{what} file {path} needs the columns 'path' and {wanted}")
        return {absolute_source(str(base / row["path"])): str(row[key]) for row in reader}


def read_source_table(path: str | Path, sources: list[str], columns: tuple[str, ...], what: str
                      ) -> list[str | None]:
    """The value a ``path,<column>`` CSV gives each source (None where it lists none)."""
    table = read_path_table(path, columns, what)
    return [table.get(absolute_source(s)) for s in sources]


# ----------------------------------------------------------------------------- listing
SpecReader = Callable[[Path | str], list[ImageRef]]  # given a Path, or the text of a URL
_SPEC_READERS: list[tuple[Callable[[Path | str], bool], SpecReader]] = []


def register_spec_reader(matches: Callable[[Path | str], bool], read: SpecReader) -> None:
    """Teach ``list_images`` another kind of spec; checked before the built-in kinds, first match wins.

    This is the extension point for the curation manifest: its module registers
    ``(is_manifest, manifest_refs)`` so ``pipeline cache-teachers MANIFEST`` lists the sampled images.
    """
    _SPEC_READERS.append((matches, read))


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style braces, in order: ``a-{000..002}.tar`` (padding kept) and ``{x,y}``, recursively."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if len(lo) > 1 and lo.startswith("0") else 0
        options = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression: keep it literally
        return [head + "{" + body + "}" + t for t in _expand_braces(tail)]
    return [e for opt in options for e in _expand_braces(head + opt + tail)]


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(".tar")


def _member_ref(path: str, name: str, occurrence: int) -> ImageRef:
    """``<tar>::<member>``; a name the tar holds more than once gets ``::<k>`` from its second occurrence on."""
    return ImageRef(f"{path}{TAR_SEP}{name}" + (f"{TAR_SEP}{occurrence}" if occurrence > 1 else ""))


def _tar_members(path: str) -> list[ImageRef]:
    """Image members of one shard in member order; other members (.cls, .json, ...) are skipped.

    A member name that appears twice (tar allows it; extracting keeps only the last) stays two images:
    the k-th occurrence is ``<tar>::<member>::<k>``.
    """
    try:
        with tarfile.open(path) as tar:
            seen: dict[str, int] = {}
            refs = []
            for m in tar:
                if m.isfile() and _is_image_name(m.name):
                    seen[m.name] = seen.get(m.name, 0) + 1
                    refs.append(_member_ref(path, m.name, seen[m.name]))
            return refs
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot read tar shard {path}: {exc}") from None


def _folder_images(path: Path) -> list[ImageRef]:
    """Image files below ``path``, sorted; a link that leads nowhere (dangling, a loop) is listed too, so
    that reading it fails and is recorded instead of the file silently missing from the job."""
    return [ImageRef(str(p)) for p in sorted(path.rglob("*"))
            if _is_image_name(p.name) and (p.is_file() or p.is_symlink())]


def _list_file(path: Path) -> list[ImageRef]:
    """One path per line; relative paths are relative to the list's folder. Every line is an entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither a folder, a .tar shard, an image nor a UTF-8 path list") from None
    refs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line)
            refs.append(ImageRef(str(entry if entry.is_absolute() else path.parent / entry)))
    return refs


def _one_path(path: Path) -> list[ImageRef]:
    for matches, read in _SPEC_READERS:
        if matches(path):
            return read(path)
    if path.is_dir():
        return _folder_images(path)
    if _is_tar_name(path.name):
        return _tar_members(str(path))
    if _is_image_name(path.name):
        return [ImageRef(str(path))]
    return _list_file(path)


def _pattern(text: str) -> list[ImageRef]:
    """Brace/glob pattern of shards (or folders, or image files): brace order, each glob sorted."""
    paths: list[str] = []
    for expanded in _expand_braces(text):
        if glob.has_magic(expanded):
            paths += sorted(glob.glob(expanded))
        elif Path(expanded).exists():
            paths.append(expanded)
    if not paths:
        raise ValueError(f"no files match {text}")
    refs = []
    for p in dict.fromkeys(paths):  # dedupe, keep order
        if Path(p).is_dir() or _is_tar_name(p) or _is_image_name(p):
            refs += _one_path(Path(p))
    return refs


def list_images(spec: str | Path) -> list[ImageRef]:
    """Images named by ``spec``, in a deterministic order.

    * a folder: image files below it (recursive, by extension, case-insensitive), sorted by path;
    * a ``.tar`` shard, or a brace/glob pattern of shards (``shards-{000000..000009}.tar``,
      ``shards-*.tar``): image members in shard order, then member order;
    * a single image file;
    * any other file: a list with one path per line (``#`` comments and blank lines skipped).
      Every listed line is an entry, image or not; a bad one becomes a recorded failure later;
    * a kind registered with ``register_spec_reader`` (the curation manifest), also at an fsspec URL.
    """
    text = str(spec)
    if "://" in text and not text.startswith("file://"):  # a URL: only a registered kind (a manifest in a bucket)
        for matches, read in _SPEC_READERS:
            if matches(text):
                return read(text)
        raise ValueError(f"IMAGES at a URL must be a curation manifest (or a curate --out folder), and {text} is "
                         "none; images themselves are read from paths every node can read")
    if "{" in text or glob.has_magic(text):
        refs = _pattern(text)
    else:
        path = Path(text)
        if not path.exists():
            raise ValueError(f"IMAGES not found: {path}")
        refs = _one_path(path)
    if not refs:
        raise ValueError(f"no images found in {text}")
    return refs


# ----------------------------------------------------------------------------- reading
class _Shard:
    """An open tar with a name index, so a member is one seek + read (tarfile's lookup is linear)."""

    def __init__(self, path: str):
        self.tar = tarfile.open(path)
        self.members: dict[str, list[tarfile.TarInfo]] = {}
        for m in self.tar.getmembers():
            if m.isfile():
                self.members.setdefault(m.name, []).append(m)

    def read(self, member: str) -> bytes:
        """A member's bytes; ``name::k`` is the k-th member of that name (see ``_tar_members``)."""
        infos, k = self.members.get(member), 1
        if infos is None and TAR_SEP in member:
            name, _, occurrence = member.rpartition(TAR_SEP)
            if occurrence.isdigit():
                infos, k = self.members.get(name), int(occurrence)
        f = self.tar.extractfile(infos[k - 1]) if infos is not None and k <= len(infos) else None
        if f is None:
            raise FileNotFoundError(f"no file {member!r} in {self.tar.name}")
        return f.read()

    def close(self) -> None:
        self.tar.close()


def read_bytes(ref: ImageRef) -> bytes:
    """Bytes of one image. For many tar members use ``iter_bytes``, which opens each shard once."""
    if ref.in_tar:
        shard = _Shard(ref.split()[0])
        try:
            return shard.read(ref.split()[1])
        finally:
            shard.close()
    return Path(ref.source).read_bytes()


def iter_bytes(refs: Iterable[ImageRef]) -> Iterator[tuple[ImageRef, bytes | Exception]]:
    """``(ref, bytes)`` for each ref in input order, or ``(ref, exception)`` where it cannot be read.

    Shards stay open (the last few used, LRU) with a member index, so reading N members of a shard
    costs one header scan plus N seeks, also when refs interleave shards.
    """
    shards: OrderedDict[str, _Shard] = OrderedDict()
    try:
        for ref in refs:
            try:
                if ref.in_tar:
                    tar_path, member = ref.split()
                    shard = shards.pop(tar_path, None) or _Shard(tar_path)
                    shards[tar_path] = shard  # most recently used last
                    while len(shards) > _OPEN_TARS:
                        shards.popitem(last=False)[1].close()
                    data = shard.read(member)
                else:
                    data = Path(ref.source).read_bytes()
            except (OSError, tarfile.TarError) as exc:
                yield ref, exc
            else:
                yield ref, data
    finally:
        for shard in shards.values():
            shard.close()


def image_id(data: bytes) -> str:
    """Stable content id: the first 32 hex digits (128 bits) of the bytes' sha256."""
    return hashlib.sha256(data).hexdigest()[:32]


# ----------------------------------------------------------------------------- decoding
class _DecodeSettings:
    """Pillow's process-wide settings while any thread decodes, put back when the last one is done.

    * ``LOAD_TRUNCATED_IMAGES`` off whatever other code set: with it on, Pillow pads missing pixels with
      gray and says nothing; a padded image in the store would be silently wrong pixels and targets.
    * ``DecompressionBombWarning`` ignored: ``max_pixels`` is the limit, Pillow's warning threshold must
      not become a hidden second one.

    Both are global state, so the decoding threads of one process (an actor decodes a unit on all its
    threads) share one save and restore, counted under a lock: per-call saving would let one thread's
    restore switch truncated-file padding back on under another's decode.
    """

    def __init__(self) -> None:
        self.lock, self.active = threading.Lock(), 0
        self.saved_truncated: bool = False
        self.saved_warnings: warnings.catch_warnings | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.active == 0:
                self.saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
                self.saved_warnings = warnings.catch_warnings()
                self.saved_warnings.__enter__()
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            self.active += 1
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1
                if self.active == 0:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self.saved_truncated
                    self.saved_warnings.__exit__(None, None, None)


_decode_settings = _DecodeSettings()


def _riff_truncated(data: bytes) -> bool:
    """WebP states its length in the RIFF header; libwebp's own error on a short file is unspecific."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return len(data) < int.from_bytes(data[4:8], "little") + 8
    return False


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-depth gray (I;16*, I, F) -> uint8 by scaling its range, never by clipping.

    * I;16: v / 257 maps 0..65535 onto 0..255 exactly (65535 -> 255, 32768 -> 128).
    * I (32-bit): Pillow decodes 16-bit PGM (and older Pillows 16-bit PNG) to I, so values within
      0..65535 are read as 16-bit; other ranges are not stated by the file and are min-max stretched.
    * F: values within [0, 1] follow the usual float convention (x 255); others are min-max stretched.
    Non-finite floats become the minimum.
    """
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; alpha (palette transparency too) composited over BACKGROUND."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # RGB, L, 1 (-> 0/255), CMYK, YCbCr, LAB, HSV, RGBX


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a damaged EXIF block costs the orientation, not the image."""
    try:
        return ImageOps.exif_transpose(img)
    except (ValueError, TypeError, KeyError, struct.error, OSError, SyntaxError):
        return img


def _oserror_reason(exc: OSError) -> str:
    msg = str(exc)
    return "truncated" if "truncated" in msg.lower() else f"corrupt: {_clean(msg)}"


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an RGB image, or ``DecodeError(reason)``.

    EXIF orientation is applied, multi-frame files (GIF, TIFF, APNG) give their first frame, any
    mode becomes RGB (see ``_to_rgb``), and images over ``max_pixels`` are refused from their header,
    before any pixel is decoded.
    """
    if not data:
        raise DecodeError("empty")
    if _riff_truncated(data):
        raise DecodeError("truncated")
    try:
        Image.init()  # register every plugin, so that DECODE_FORMATS names only known ones
        with _decode_settings():
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
            if img.width * img.height > max_pixels:
                raise DecodeError(f"too-large: {img.width}x{img.height} > {max_pixels} pixels")
            img.seek(0)
            img.load()
        return _to_rgb(_exif_upright(img))
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not-an-image") from None
    except Image.DecompressionBombError:
        raise DecodeError("too-large") from None
    except OSError as exc:
        raise DecodeError(_oserror_reason(exc)) from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, struct.error) as exc:
        raise DecodeError(f"corrupt: {type(exc).__name__}: {_clean(str(exc))}") from None


def _clean(msg: str) -> str:
    """Drop object addresses so reasons are deterministic across runs; keep them short."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", msg)[:200]


def iter_decoded(sources: Iterable[str], transform: Callable[[Image.Image], Image.Image] | None = None
                 ) -> Iterator[tuple[str, Image.Image | None, str]]:
    """``(content id, RGB image or None, failure reason)`` per source, in order; never raises for a bad file.

    The one decode loop of every stage (ingest, embedding): unreadable files give ``"unreadable: ..."``
    and an empty id, ``DecodeError`` gives its reason, and any other decoder exception is recorded as
    ``"corrupt: ..."`` (a decoder bug on one file must not stop a billion-image job). ``transform``
    (e.g. the store's resize policy) runs under the same protection.
    """
    for ref, data in iter_bytes([ImageRef(s) for s in sources]):
        if isinstance(data, Exception):
            yield "", None, f"unreadable: {printable_source(str(data))}"
            continue
        if printable_source(ref.source) != ref.source:
            yield image_id(data), None, "unreadable: file name is not valid UTF-8"
            continue
        try:
            image = decode_rgb(data)
            if transform is not None:
                image = transform(image)
        except DecodeError as exc:
            yield image_id(data), None, exc.reason
        except Exception as exc:
            yield image_id(data), None, f"corrupt: {type(exc).__name__}: {_clean(str(exc))}"
        else:
            yield image_id(data), image, ""
