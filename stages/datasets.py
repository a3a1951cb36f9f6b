"""Real image sets shipped inside installed packages (scikit-image, scikit-learn): never downloaded.

* ``write_demo_images``: the bundled photos plus the 1,797 scikit-learn digits, upscaled, with a
  labels CSV and a stratified train/held-out split (the demo's kNN evaluation set).
* ``write_longtail_pool``: a real long-tailed pool for curation: random crops of the bundled photos
  whose count per source photo follows a Zipf law; a crop's concept is its source photo.
* ``write_segmentation_set``: the real digits pasted into crops of the real photos, with a per-pixel
  class mask (background + 10 digits) and a per-pixel regression target (distance to the nearest
  digit), for the dense probes of ``pipeline eval --tasks seg``.
"""

from __future__ import annotations

import csv
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DemoImageSet", "LongtailPool", "SegmentationSet", "bundled_photos", "write_demo_images",
           "write_longtail_pool", "write_segmentation_set"]

# every one of these ships inside the scikit-image wheel (skimage/data/*.png|jpg)
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "horse", "hubble_deep_field",
    "immunohistochemistry", "page", "text", "clock", "coins", "retina", "colorwheel", "brick",
    "grass", "gravel", "logo",
)


def bundled_photos() -> dict[str, np.ndarray]:
    """name -> image array (uint8 HxW, HxWx3 or HxWx4), from scikit-image and scikit-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in SKIMAGE_PHOTOS:
        arr = np.asarray(getattr(skimage.data, name)())
        photos[name] = (arr * 255).astype(np.uint8) if arr.dtype == bool else arr.astype(np.uint8)
    sample = load_sample_images()
    for fname, arr in zip(sample.filenames, sample.images):
        photos[Path(fname).stem] = np.asarray(arr, np.uint8)
    return photos


@dataclass(frozen=True)
class DemoImageSet:
    root: Path
    photos: list[Path]
    digits: list[Path]
    labels_csv: Path
    num_train: int
    num_heldout: int


def _stratified_split(labels: np.ndarray, heldout: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out items: a seeded ``heldout`` share of every class."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = int(round(len(idx) * heldout))
        mask[rng.choice(idx, size=take, replace=False)] = True
    return mask


def claim_folder(out: Path, kind: str) -> Path:
    """Make ``out`` a folder this project writes ``kind`` into: absent, empty, or written by it before.

    A marker file ``.amoe-<kind>`` records the claim; a non-empty folder without it is refused, so a
    command never overwrites files it did not write.
    """
    out = Path(out)
    marker = out / f".amoe-{kind}"
    if out.exists() and not marker.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is {'a non-empty folder' if out.is_dir() else 'a file'} not written by `pipeline "
                         f"{kind.replace('-', ' ')}`: refusing to write into it (use a new or empty folder)")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return out


def _save_if_changed(img: Image.Image, path: Path) -> None:
    """PNG writes are deterministic; skipping identical files keeps reruns cheap and idempotent."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)


def write_demo_images(out: Path, *, digits_size: int = 64, heldout: float = 0.2, seed: int = 0) -> DemoImageSet:
    """Write photos to ``out/photos`` and digits to ``out/digits`` with ``out/digits/labels.csv``.

    Digits (8x8, values 0-16) are scaled to 0-255 and upscaled with bicubic interpolation: smooth
    strokes look more like the natural images the teachers were trained on than nearest's blocks.
    The CSV's ``path`` column is relative to ``out``.
    """
    from sklearn.datasets import load_digits

    out = claim_folder(out, "data-demo")
    (out / "photos").mkdir(parents=True, exist_ok=True)
    (out / "digits").mkdir(parents=True, exist_ok=True)
    photo_paths = []
    for name, arr in bundled_photos().items():
        path = out / "photos" / f"{name}.png"
        _save_if_changed(Image.fromarray(arr), path)
        photo_paths.append(path)
    digits = load_digits()
    labels = digits.target.astype(int)
    held = _stratified_split(labels, heldout, seed)
    digit_paths = []
    rows = []
    for i, (img, label) in enumerate(zip(digits.images, labels)):
        arr = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr, "L").resize((digits_size, digits_size), Image.BICUBIC)
        rel = Path("digits") / f"digit_{i:04d}.png"
        _save_if_changed(pil, out / rel)
        digit_paths.append(out / rel)
        rows.append((str(rel), int(label), "heldout" if held[i] else "train"))
    labels_csv = out / "digits" / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return DemoImageSet(out, photo_paths, digit_paths, labels_csv, int((~held).sum()), int(held.sum()))


@dataclass(frozen=True)
class LongtailPool:
    root: Path
    concepts_csv: Path
    counts: dict[str, int]  # crops per concept, most frequent first

    @property
    def num_crops(self) -> int:
        return sum(self.counts.values())


def zipf_counts(total: int, num_concepts: int, head_to_tail: float) -> np.ndarray:
    """Crops per concept, ∝ 1/k^s with s chosen so that count_1 / count_K = head_to_tail.

    Largest-remainder rounding keeps the exact total; a total too small for every concept to get at
    least one crop at this ratio is an error rather than a silently flatter distribution.
    """
    if num_concepts < 2 or head_to_tail < 1:
        raise ValueError(f"need >= 2 concepts and head_to_tail >= 1 (got {num_concepts}, {head_to_tail})")
    s = math.log(head_to_tail) / math.log(num_concepts)
    weights = 1.0 / np.arange(1, num_concepts + 1) ** s
    ideal = total * weights / weights.sum()
    if ideal.min() < 1:
        need = math.ceil(weights.sum() / weights.min())
        raise ValueError(f"{total} crops cannot give {num_concepts} concepts a {head_to_tail:g}:1 Zipf law; need >= {need}")
    counts = np.floor(ideal).astype(int)
    remainder = total - counts.sum()
    counts[np.argsort(-(ideal - counts), kind="stable")[:remainder]] += 1
    return counts


def _write_crops(job: tuple) -> list[tuple[str, str]]:
    root, photo_name, arr, start, count, crop_min, crop_max, seed = job
    rng = np.random.default_rng([seed, start])
    img = Image.fromarray(arr).convert("RGB")
    rows = []
    for j in range(count):
        side = int(rng.integers(crop_min, crop_max + 1))
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(img.width, max(8, int(round(side * math.sqrt(aspect)))))
        h = min(img.height, max(8, int(round(side / math.sqrt(aspect)))))
        x = int(rng.integers(0, img.width - w + 1))
        y = int(rng.integers(0, img.height - h + 1))
        crop = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        rel = f"crops/{photo_name}/{start + j:06d}.png"
        crop.save(Path(root) / rel, format="PNG", compress_level=1)
        rows.append((rel, photo_name))
    return rows


def write_longtail_pool(
    out: Path,
    *,
    n_crops: int = 20000,
    head_to_tail: float = 100.0,
    crop_min: int = 48,
    crop_max: int = 160,
    seed: int = 0,
    workers: int = 2,
) -> LongtailPool:
    """Write a Zipf-distributed pool of crops and ``concepts.csv`` (path relative to ``out``, concept)."""
    if crop_min < 8 or crop_max < crop_min:
        raise ValueError(f"bad crop size range [{crop_min}, {crop_max}]")
    out = claim_folder(out, "data-longtail")
    photos = bundled_photos()
    names = sorted(photos)
    order = np.random.default_rng(seed).permutation(len(names))  # which photo is the head: seeded
    names = [names[i] for i in order]
    counts = zipf_counts(n_crops, len(names), head_to_tail)
    jobs, start = [], 0
    for name, count in zip(names, counts):
        (out / "crops" / name).mkdir(parents=True, exist_ok=True)
        for s in range(0, int(count), 500):  # chunks keep both workers busy
            jobs.append((str(out), name, photos[name], start + s, min(500, int(count) - s), crop_min, crop_max, seed))
        start += int(count)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_write_crops, jobs))
    else:
        results = [_write_crops(j) for j in jobs]
    concepts_csv = out / "concepts.csv"
    with open(concepts_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "concept"])
        for rows in results:
            writer.writerows(rows)
    return LongtailPool(out, concepts_csv, dict(zip(names, map(int, counts))))


SEG_CLASSES = ("background", *(f"digit {d}" for d in range(10)))  # mask value v names SEG_CLASSES[v]
DISTANCE_SCALE = 16  # depth/*.png hold the distance to the nearest digit in pixels x 16 (1/16 px steps)


@dataclass(frozen=True)
class SegmentationSet:
    root: Path
    images: list[Path]
    masks_csv: Path  # path,mask: class masks (8-bit)
    depth_csv: Path  # path,mask: distance-to-digit targets (16-bit, value / DISTANCE_SCALE pixels)
    classes_txt: Path
    digit_pixels: float  # share of pixels labelled as a digit


def _segmentation_image(photo: np.ndarray, digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                        crop: tuple[int, int], digit_px: tuple[int, int], per_image: tuple[int, int]):
    """One photo crop with 1..n pasted digits: (RGB uint8, class mask uint8, distance-to-digit uint16)."""
    from scipy.ndimage import distance_transform_edt

    img = Image.fromarray(photo).convert("RGB")
    side = int(rng.integers(crop[0], crop[1] + 1))
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(img.width, max(32, int(round(side * math.sqrt(aspect)))))
    h = min(img.height, max(32, int(round(side / math.sqrt(aspect)))))
    x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    canvas = np.asarray(img.crop((x, y, x + w, y + h)), np.float64)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
        k = int(rng.integers(len(digits)))
        size = int(rng.integers(digit_px[0], min(digit_px[1], w, h) + 1))
        stroke = np.asarray(Image.fromarray(np.clip(digits[k] * (255 / 16), 0, 255).astype(np.uint8), "L")
                            .resize((size, size), Image.BICUBIC), np.float64) / 255.0
        px, py = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        region = canvas[py:py + size, px:px + size]
        # a colour far from the background under the digit, so every digit stays visible
        colour = np.where(region.mean((0, 1)) > 127, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))
        canvas[py:py + size, px:px + size] = region * (1 - stroke[..., None]) + colour * stroke[..., None]
        mask[py:py + size, px:px + size][stroke > 0.5] = int(labels[k]) + 1  # later digits occlude earlier ones
    distance = distance_transform_edt(mask == 0) if (mask > 0).any() else np.full(mask.shape, float(max(h, w)))
    depth = np.clip(np.rint(distance * DISTANCE_SCALE), 0, 65534).astype(np.uint16)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask, depth


def write_segmentation_set(out: Path, *, n_images: int = 200, crop: tuple[int, int] = (128, 256),
                           digit_px: tuple[int, int] = (24, 80), per_image: tuple[int, int] = (1, 4), seed: int = 0
                           ) -> SegmentationSet:
    """Write ``images/``, ``masks/`` (class per pixel: 0 background, d + 1 digit d), ``depth/`` (distance to the
    nearest digit pixel x DISTANCE_SCALE), ``masks.csv``, ``depth.csv`` and ``classes.txt``.

    Every image is a seeded random crop of a bundled photo with 1-4 of the 1,797 scikit-learn digits
    (upscaled, alpha-blended in a contrasting colour) pasted at random positions and sizes; the mask
    labels the pixels where the digit's stroke covers more than half.
    """
    from sklearn.datasets import load_digits

    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if not 8 <= digit_px[0] <= digit_px[1] or crop[0] < 32 or crop[1] < crop[0]:
        raise ValueError(f"bad sizes: digits {digit_px}, crops {crop}")
    out = claim_folder(out, "data-segmentation")
    for sub in ("images", "masks", "depth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    photos = bundled_photos()
    names = sorted(photos)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    paths, rows, depth_rows, digit_share = [], [], [], []
    for i in range(n_images):
        photo = photos[names[int(rng.integers(len(names)))]]
        rgb, mask, depth = _segmentation_image(photo, digits.images, digits.target, rng, crop, digit_px, per_image)
        name = f"seg_{i:05d}.png"
        _save_if_changed(Image.fromarray(rgb), out / "images" / name)
        _save_if_changed(Image.fromarray(mask, "L"), out / "masks" / name)
        _save_if_changed(Image.fromarray(depth), out / "depth" / name)
        paths.append(out / "images" / name)
        rows.append((f"images/{name}", f"masks/{name}"))
        depth_rows.append((f"images/{name}", f"depth/{name}"))
        digit_share.append(float((mask > 0).mean()))
    masks_csv, depth_csv, classes_txt = out / "masks.csv", out / "depth.csv", out / "classes.txt"
    for path, table in ((masks_csv, rows), (depth_csv, depth_rows)):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "mask"])
            writer.writerows(table)
    classes_txt.write_text("\n".join(SEG_CLASSES) + "\n")
    return SegmentationSet(out, paths, masks_csv, depth_csv, classes_txt, float(np.mean(digit_share)))
