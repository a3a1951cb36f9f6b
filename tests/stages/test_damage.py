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
    with pytest.raises(StoreError, match="images/"):
        _read_all(str(store))
    proc = run_pipeline("inspect", store, "--verify")
    error_line(proc, "images units")
    assert "images/pixels" in proc.stdout and "images/grid" in proc.stdout
    assert not FeatureStore.open(str(store)).images_complete
    run_cache(str(images), str(store), CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))
    a, b = store_arrays(str(clean)), store_arrays(str(store))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not verify_store(str(store)).damaged


def test_a_clean_store_verifies_clean(pristine):
    report = verify_store(str(pristine[1]))
    assert not report.damaged and report.units_checked == 2 * FeatureStore.open(str(pristine[1])).plan().num_units
