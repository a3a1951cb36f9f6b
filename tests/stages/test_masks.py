"""Per-pixel masks in the store (format version 2): written by `cache-teachers --masks` with the images, equal to
the mask files resized by nearest neighbour (computed here with PIL directly), crash-safe, verified, refused
when they cannot be right."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from cli_helpers import error_line, run_pipeline
from stages.config import CacheConfig
from stages.datasets import SEG_CLASSES, write_segmentation_set
from storage import layout as L
from storage.masks import MaskInfo, decode_mask, encode_mask, read_mask_file, resize_mask
from storage.reader import StoreReader
from storage.store import FeatureStore, StoreError

from cache_helpers import TINY_VIT

SETTINGS = {"random_init": True, "min_tokens": 16, "max_tokens": 64, "shard_images": 4, "pixel_shard_bytes": 16384,
            "pixel_chunk_bytes": 4096, "batch_size": 8, "num_cpus": 2}
CLI = ["--random-init", *sum((["--set", f"{k}={v}"] for k, v in SETTINGS.items() if k != "random_init"), [])]


@pytest.fixture(scope="module")
def seg_images(tmp_path_factory) -> Path:
    """Ten segmentation images, one of them without a mask row, and a broken image that has one."""
    root = write_segmentation_set(tmp_path_factory.mktemp("seg") / "data", n_images=10, crop=(64, 160),
                                  digit_px=(16, 48), seed=1).root
    (root / "images" / "broken.png").write_bytes(b"not a png")
    shutil.copy(root / "masks" / "seg_00000.png", root / "masks" / "broken.png")
    rows = list(csv.reader(open(root / "masks.csv")))
    rows = [r for r in rows if r[0] != "images/seg_00003.png"] + [["images/broken.png", "masks/broken.png"]]
    with open(root / "masks.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _config(root: Path, **extra) -> CacheConfig:
    return CacheConfig(teacher=TINY_VIT, name="dino", masks=str(root / "masks.csv"),
                       mask_classes=str(root / "classes.txt"), **SETTINGS, **extra)


@pytest.fixture(scope="module")
def reference(seg_images, tmp_path_factory, ray_local) -> str:
    from stages.cache import run_cache

    url = str(tmp_path_factory.mktemp("ref") / "store")
    report = run_cache(str(seg_images / "images"), url, _config(seg_images))
    assert report.ingest.masked == 9 and report.ingest.num_failed == 1
    return url


def _expected_masks(root: Path, url: str) -> dict[int, np.ndarray | None]:
    """Each stored image's mask from its file: PIL's nearest resize to the stored pixel size (None: no mask)."""
    store = FeatureStore.open(url)
    sources = store.image_strings(L.SOURCE)
    hw, ok = store.image_array(L.HW)[:], store.image_array(L.OK)[:]
    out = {}
    for i, src in enumerate(sources):
        name = Path(src).name
        if not ok[i] or name == "seg_00003.png":
            out[i] = None
            continue
        mask = Image.open(root / "masks" / name)
        out[i] = np.asarray(mask.resize((int(hw[i, 1]), int(hw[i, 0])), Image.NEAREST))
    return out


def _assert_masks(root: Path, url: str) -> None:
    reader = StoreReader(url)
    got = reader.masks(np.arange(len(reader)))
    for i, want in _expected_masks(root, url).items():
        if want is None:
            assert got[i] is None, i
        else:
            assert got[i].dtype == np.uint8 and got[i].shape == want.shape
            np.testing.assert_array_equal(got[i], want, err_msg=f"image {i}")


def test_masks_equal_the_files_resized_by_nearest_neighbour(seg_images, reference):
    _assert_masks(seg_images, reference)
    store = FeatureStore.open(reference)
    info = store.mask_info()
    assert store.attrs["format_version"] == L.FORMAT_VERSION == 4
    assert info.kind == "classes" and info.classes == list(SEG_CLASSES) and info.ignore == 255
    doc = (Path(__file__).resolve().parents[2] / "docs" / "store-format.md").read_text()  # the contract names them
    assert all(f"`{key}`" in doc for key in [*info.to_dict(), *store.attrs]), "an undocumented attribute"
    # a resized mask holds only the file's values (nothing interpolated), and the digits survive the resize
    reader = StoreReader(reference)
    values = np.unique(np.concatenate([m.ravel() for m in reader.masks(np.flatnonzero(reader.ok)) if m is not None]))
    assert set(values.tolist()) <= set(range(11)) and len(values) > 2


def test_value_masks_are_16_bit_with_their_scale(seg_images, tmp_path, ray_local):
    from stages.cache import run_cache

    depth_csv = seg_images / "depth.csv"
    url = str(tmp_path / "store")
    run_cache(str(seg_images / "images"), url,
              _config(seg_images).model_copy(update={"masks": str(depth_csv), "mask_classes": None,
                                                     "mask_kind": "values", "mask_scale": 16.0}))
    reader = StoreReader(url)
    assert reader.mask_info.kind == "values" and reader.mask_info.scale == 16.0 and reader.mask_info.ignore == 65535
    i = int(np.flatnonzero(reader.ok)[0])
    got = reader.masks([i])[0]
    name = Path(reader.store.image_strings(L.SOURCE, slice(i, i + 1))[0]).name
    want = np.asarray(Image.open(seg_images / "depth" / name).resize(got.shape[::-1], Image.NEAREST))
    assert got.dtype == np.uint16 and got.max() > 255
    np.testing.assert_array_equal(got, want)


def test_a_crash_between_units_then_a_rerun_gives_the_same_masks(seg_images, reference, tmp_path, ray_local):
    from stages.cache import run_cache

    store = tmp_path / "store"
    crashed = run_pipeline("cache-teachers", seg_images / "images", "--store", store, "--teacher", TINY_VIT, "--name",
                           "dino", "--masks", seg_images / "masks.csv", "--mask-classes", seg_images / "classes.txt",
                           *CLI, env={"AMOE_FAULT": "commit.before"}, new_session=True)
    assert crashed.returncode != 0
    assert not FeatureStore.open(str(store)).images_complete
    run_cache(str(seg_images / "images"), str(store), _config(seg_images))
    _assert_masks(seg_images, str(store))
    a, b = StoreReader(str(store)), StoreReader(reference)
    for x, y in zip(a.masks(np.arange(len(a))), b.masks(np.arange(len(b)))):
        assert (x is None and y is None) or np.array_equal(x, y)


def test_verify_finds_a_damaged_mask_shard_and_a_rerun_repairs_it(seg_images, reference, tmp_path, ray_local):
    from stages.cache import run_cache
    from storage.verify import verify_store

    store = tmp_path / "store"
    shutil.copytree(reference, store)
    shard = sorted((store / L.IMAGES / L.MASKS / "c").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    report = verify_store(str(store), repair=True)
    assert report.units("images") == [0] and any("images/masks" in d.reason for d in report.damaged)
    with pytest.raises(StoreError, match="images are not complete"):
        StoreReader(str(store))
    # the repair restages the unit from its sources: without the masks it is refused, naming --masks
    with pytest.raises(StoreError, match="--masks"):
        run_cache(str(seg_images / "images"), str(store), _config(seg_images).model_copy(update={"masks": None}))
    run_cache(str(seg_images / "images"), str(store), _config(seg_images))
    assert not verify_store(str(store)).damaged
    _assert_masks(seg_images, str(store))


def test_refusals(seg_images, reference, tmp_path, ray_local):
    from stages.cache import run_cache

    images = str(seg_images / "images")
    # a mask of another size than its image: named in one line by the command, though a Ray task finds it
    bad = tmp_path / "bad"
    shutil.copytree(seg_images, bad)
    Image.open(bad / "masks" / "seg_00001.png").resize((20, 20)).save(bad / "masks" / "seg_00001.png")
    proc = run_pipeline("cache-teachers", bad / "images", "--store", tmp_path / "s1", "--teacher", TINY_VIT,
                        "--masks", bad / "masks.csv", *CLI)
    error_line(proc, "masks/seg_00001.png is 20x20 pixels", "a mask labels every pixel")
    # a colour image as a mask
    Image.open(bad / "images" / "seg_00002.png").save(bad / "masks" / "seg_00002.png")
    with pytest.raises(ValueError, match="seg_00002.png is a RGB image"):
        read_mask_file((bad / "masks" / "seg_00002.png").read_bytes(), "classes", "seg_00002.png")
    # a CSV that names none of the images, and a missing mask file: refused before any store exists
    other = tmp_path / "other.csv"
    other.write_text("path,mask\nelsewhere.png,m.png\n")
    with pytest.raises(ValueError, match="gives a mask to none of the 11 images"):
        run_cache(images, str(tmp_path / "s2"), _config(seg_images).model_copy(update={"masks": str(other)}))
    (bad / "masks" / "seg_00005.png").unlink()
    with pytest.raises(FileNotFoundError, match="seg_00005.png does not exist"):
        run_cache(str(bad / "images"), str(tmp_path / "s3"), _config(bad))
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()
    # a class beyond the named classes; then the same store resumed with another mask kind (its staged
    # units hold the first kind's masks) is refused, not mixed
    for name in ("seg_00001.png", "seg_00002.png", "seg_00005.png"):  # only this mask is wrong now
        shutil.copy(seg_images / "masks" / name, bad / "masks" / name)
    classes = Image.open(seg_images / "masks" / "seg_00004.png")
    Image.fromarray(np.where(np.asarray(classes) > 0, 12, 0).astype(np.uint8)).save(bad / "masks" / "seg_00004.png")
    with pytest.raises(ValueError, match="seg_00004.png has class 12, but the mask classes name 11"):
        run_cache(str(bad / "images"), str(tmp_path / "s4"), _config(bad))
    shutil.copy(seg_images / "masks" / "seg_00004.png", bad / "masks" / "seg_00004.png")
    with pytest.raises(StoreError, match="unfinished ingest of another image list, shard size or masks"):
        run_cache(str(bad / "images"), str(tmp_path / "s4"), _config(bad).model_copy(
            update={"mask_classes": None, "mask_kind": "values", "mask_scale": 16.0}))
    # a blank mask cell is an image without a mask
    rows = list(csv.reader(open(bad / "masks.csv")))
    with open(bad / "blank.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0], [rows[1][0], ""], *rows[2:]])
    from stages.ingest import read_masks

    listed = read_masks(str(bad / "blank.csv"), [str(bad / r[0]) for r in rows[1:]])
    assert listed.files[0] == "" and all(listed.files[1:])
    # masks for a store cached without them, and other masks for a store that has some
    plain = str(tmp_path / "plain")
    run_cache(images, plain, _config(seg_images).model_copy(update={"masks": None, "mask_classes": None}))
    with pytest.raises(StoreError, match="cached without masks"):
        run_cache(images, plain, _config(seg_images))
    with pytest.raises(StoreError, match="holds other masks"):
        run_cache(images, reference, _config(seg_images).model_copy(
            update={"masks": str(seg_images / "depth.csv"), "mask_classes": None, "mask_kind": "values"}))


def test_mask_codec_round_trips_and_never_interpolates():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 11, (37, 53)).astype(np.uint8)
    values = rng.integers(0, 65535, (37, 53)).astype(np.uint16)
    for arr in (classes, values):
        back = decode_mask(np.frombuffer(encode_mask(arr), np.uint8))
        assert back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)
    small = np.asarray(resize_mask(Image.fromarray(values), (20, 11)))
    assert set(np.unique(small)) <= set(np.unique(values))
    with pytest.raises(ValueError, match="class masks hold 0..254"):
        read_mask_file(encode_mask(values), "classes", "deep.png")
    with pytest.raises(ValueError, match="cannot be read"):
        read_mask_file(b"nope", "classes", "x.png")
    with pytest.raises(ValueError, match="ignore value"):
        MaskInfo(kind="values", ignore=255)
    negative = Image.fromarray(np.full((4, 4), -1, np.int32), mode="I")
    buf = __import__("io").BytesIO()
    negative.save(buf, format="TIFF")
    with pytest.raises(ValueError, match="has value -1"):
        read_mask_file(buf.getvalue(), "classes", "negative.tif")


def test_version_1_stores_are_read_and_unknown_versions_refused(reference, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(reference, old)
    group = zarr.open_group(str(old), mode="r+")
    del group[f"{L.IMAGES}/{L.MASKS}"], group[f"{L.IMAGES}/{L.MASK_OFFSETS}"]
    attrs = dict(group.attrs)
    attrs.pop("masks")
    group.attrs.put({**attrs, "format_version": 1})
    reader = StoreReader(str(old))
    assert reader.mask_info is None and len(reader) == 11
    with pytest.raises(StoreError, match="has no masks"):
        reader.masks([0])
    group.attrs.put({**attrs, "format_version": 5})
    with pytest.raises(StoreError, match="format version 5, this code reads versions 1, 2, 3, 4"):
        FeatureStore.open(str(old))
