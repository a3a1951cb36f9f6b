"""Store damage is found, named and repaired, never read as data: flipped bytes, a deleted chunk object,
a truncated shard, in teacher targets and in the images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_ok, error_line, run_pipeline
from stages.cache import run_cache
from stages.config import CacheConfig
from storage.reader import StoreReader, read_batch
from storage.store import FeatureStore, StoreError
from storage.verify import verify_store

from cache_helpers import TINY_VIT, store_arrays, write_image_folder

SMALL = {"random_init": True, "min_tokens": 16, "max_tokens": 64, "shard_images": 4, "shard_rows": 96,
         "chunk_rows": 32, "pixel_shard_bytes": 1 << 13, "pixel_chunk_bytes": 1 << 11, "batch_size": 4,
         "phis_max_rows": 5000, "num_cpus": 2}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("damage")
    images = root / "images"
    write_image_folder(images)
    url = root / "store"
    run_cache(str(images), str(url), CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))
    return images, url


def _copy(pristine, tmp_path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(pristine[1], store)
    return store


def _shard(store: Path, array: str, index: int = 1) -> Path:
    files = sorted((store / array / "c").rglob("*"), key=lambda p: [int(x) for x in p.relative_to(store / array / "c").parts])
    return [f for f in files if f.is_file()][index]


def _read_all(url: str) -> None:
    reader = StoreReader(url)
    read_batch(reader, reader.valid_indices())


@pytest.mark.parametrize("damage", ["flip", "delete", "truncate"])
def test_damaged_teacher_targets_are_named_refused_and_repaired(damage, pristine, tmp_path):
    images, clean = pristine
    store = _copy(pristine, tmp_path)
    shard = _shard(store, "teachers/vit/patches")
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x5A
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    with pytest.raises(StoreError, match="vit/patches"):  # before any verification: refused, not read
        _read_all(str(store))

    proc = run_pipeline("inspect", store, "--verify")
    line = error_line(proc, str(store), "teacher vit units")
    assert "vit/patches" in proc.stdout
    report = verify_store(str(store))  # the units are un-committed now: nothing committed is damaged
    assert not report.damaged and not FeatureStore.open(str(store)).teacher_attrs("vit")["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        StoreReader(str(store))
    assert "units" in line

    run_cache(str(images), str(store), CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))  # the repair
    a, b = store_arrays(str(clean)), store_arrays(str(store))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert_ok(run_pipeline("inspect", store, "--verify"))


def test_damaged_images_are_named_refused_and_repaired(pristine, tmp_path):
    images, clean = pristine
    store = _copy(pristine, tmp_path)
    _shard(store, "images/pixels", 0).unlink()
    s = _shard(store, "images/grid", 1)
    s.write_bytes(s.read_bytes()[:-3])
    s = _shard(store, "images/source", 1)  # the strings' bytes (format version 3) are owned by units alike
    s.write_bytes(s.read_bytes()[:-1] + bytes([s.read_bytes()[-1] ^ 1]))
    _shard(store, "images/failures/reason_offsets", 0).unlink()  # the failure table, written whole
    with pytest.raises(StoreError, match="images/"):
        _read_all(str(store))
    proc = run_pipeline("inspect", store, "--verify")
    error_line(proc, "images units")
    assert all(f"images/{n}" in proc.stdout for n in ("pixels", "grid", "source", "failures/reason_offsets"))
    assert not FeatureStore.open(str(store)).images_complete
    run_cache(str(images), str(store), CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))
    a, b = store_arrays(str(clean)), store_arrays(str(store))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not verify_store(str(store)).damaged
    assert FeatureStore.open(str(store)).failures()[1] == FeatureStore.open(str(clean)).failures()[1]


def test_a_clean_store_verifies_clean(pristine):
    report = verify_store(str(pristine[1]))
    assert not report.damaged and report.units_checked == 2 * FeatureStore.open(str(pristine[1])).plan().num_units


def test_a_version_2_store_keeps_its_zarr_strings_through_reads_teachers_and_repairs(pristine, tmp_path):
    """A store begun with format version 2 (strings in zarr-python's own data type) is written, read, extended
    and repaired in that layout, with the same strings and arrays as the version 3 store of the same images;
    tensorstore opens every array of the version 3 store and not the version 2 strings (why version 3 exists)."""
    import zarr

    from storage import layout as L
    from storage.image_policy import ImagePolicy
    from storage.strings import is_flat
    from zarr_compat import assert_every_array_reads_alike, tensorstore_read

    images, clean = pristine
    new = FeatureStore.open(str(clean))
    old = tmp_path / "v2"
    zarr.create_group(str(old), attributes={**{k: new.attrs[k] for k in ("created_by", "image_policy")},
                                             "format_version": 2, "teachers": [], "images_complete": False})
    assert FeatureStore.open(str(old)).policy == new.policy == ImagePolicy.from_dict(new.attrs["image_policy"])
    run_cache(str(images), str(old), CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))
    store = FeatureStore.open(str(old))
    assert store.format_version == 2 and not store.flat_strings
    assert not is_flat(store.image_array(L.IDS)) and str(store.image_array(L.IDS).dtype) != "uint8"
    for name in (L.IDS, L.SOURCE):
        assert store.image_strings(name) == new.image_strings(name), name
    assert store.failures()[1] and store.failures()[1] == new.failures()[1]
    assert [str(r) for r in zarr.open_group(str(old))[f"{L.IMAGES}/{L.FAILURES}/{L.FAILURE_REASON}"][:]] == \
        new.failures()[1]
    a, b = store_arrays(str(clean)), store_arrays(str(old))
    strings = {f"images/{n}" for n in (L.IDS, L.SOURCE, L.ID_OFFSETS, L.SOURCE_OFFSETS)} | {
        f"images/failures/{n}" for n in (L.FAILURE_REASON, L.FAILURE_REASON_OFFSETS)}
    assert set(a) - set(b) == strings - {f"images/{L.IDS}", f"images/{L.SOURCE}", f"images/failures/{L.FAILURE_REASON}"}
    for key in set(a) - strings:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    assert len(assert_every_array_reads_alike(str(clean))) >= 15  # v3, with failures: every array
    with pytest.raises(Exception):
        tensorstore_read(str(old), f"{L.IMAGES}/{L.IDS}")

    # damage to the old layout's per-image strings is found and rewritten in that layout
    _shard(old, "images/source", 1).unlink()
    assert "images/source" in run_pipeline("inspect", old, "--verify").stdout
    run_cache(str(images), str(old), CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))
    store = FeatureStore.open(str(old))
    assert not verify_store(str(old)).damaged and store.format_version == 2 and not store.flat_strings
    assert store.image_strings(L.SOURCE) == new.image_strings(L.SOURCE)
