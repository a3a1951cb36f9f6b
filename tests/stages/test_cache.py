"""cache-teachers end to end: contract layout, equality with the wrapped library, failures, resume, conflicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from config import load_config
from stages.config import CacheConfig
from stages.cache import FeatureOverflowError, check_range, run_cache
from stages.teachers import build_teacher
from storage import layout as L
from storage.image_policy import ImagePolicy
from storage.store import FeatureStore, StoreError

from cache_helpers import TINY_CNN, TINY_VIT, store_arrays, write_image_folder

SMALL = {"min_tokens": 16, "max_tokens": 64, "shard_images": 4, "shard_rows": 96, "chunk_rows": 32,
         "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12, "batch_size": 4, "phis_max_rows": 5000}


def _cfg(teacher: str, **extra) -> CacheConfig:
    return load_config(CacheConfig, None, {"teacher": teacher, "random_init": True, **SMALL, **extra})


def _reference(store: FeatureStore, teacher_spec: str, seed: int = 0):
    """The wrapped library called directly on the stored pixels, image by image."""
    teacher = build_teacher(teacher_spec, random_init=True, seed=seed, patch_size=16)
    pixels = store.image_array(L.PIXELS)
    offsets = store.image_array(L.PIXEL_OFFSETS)[:]
    ok = store.image_array(L.OK)[:]
    out = {}
    with torch.inference_mode():
        for i in np.flatnonzero(ok):
            img = ImagePolicy.decode(pixels[offsets[i]: offsets[i + 1]])
            x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
            grid = (img.shape[0] // 16, img.shape[1] // 16)
            res = teacher.forward(x, grid)
            out[int(i)] = res
    return out


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_CNN])
def test_store_layout_and_features_equal_library(spec, image_folder, tmp_path, ray_local):
    folder, bad = image_folder
    url = str(tmp_path / "store")
    report = run_cache(str(folder), url, _cfg(spec))
    store = FeatureStore.open(url)
    g = zarr.open_group(url, mode="r")
    n = store.num_images
    assert report.ingest.num_images == n and n == len(list(folder.iterdir()))
    # contract: names, shapes, dtypes
    for name in (L.IDS, L.ID_OFFSETS, L.SOURCE, L.SOURCE_OFFSETS, L.HW, L.GRID, L.PIXELS, L.PIXEL_OFFSETS, L.OK):
        assert name in g[L.IMAGES]
    assert g[L.IMAGES][L.HW].dtype == np.int32 and g[L.IMAGES][L.PIXEL_OFFSETS].shape == (n + 1,)
    t = g[L.TEACHERS][report.teacher]
    offsets = t[L.OFFSETS][:]
    assert t[L.SUMMARY].dtype == np.float16 and t[L.PATCHES].shape[0] == offsets[-1]
    np.testing.assert_array_equal(offsets, store.token_offsets())
    # failures recorded with reasons, never dropped
    ok = g[L.IMAGES][L.OK][:]
    sources = [Path(s).name for s in store.image_strings(L.SOURCE)]
    idx, reasons = store.failures()
    failed = {sources[i]: r for i, r in zip(idx, reasons)}
    for name, reason in bad.items():
        assert failed[name].startswith(reason), failed
    assert "corrupt.jpg" in failed
    assert ok.sum() == n - len(failed)
    grid = g[L.IMAGES][L.GRID][:]
    hw = g[L.IMAGES][L.HW][:]
    assert (hw[ok] == grid[ok] * 16).all()
    tokens = grid[ok, 0] * grid[ok, 1]
    assert tokens.min() >= 16 and tokens.max() <= 64
    # features equal the library on the stored pixels (float16 storage tolerance)
    ref = _reference(store, spec)
    for i, res in ref.items():
        np.testing.assert_allclose(t[L.SUMMARY][i].astype(np.float32), res.summary[0].numpy(), rtol=2e-3, atol=2e-3)
        patches = t[L.PATCHES][offsets[i]: offsets[i + 1]].astype(np.float32)
        np.testing.assert_allclose(patches, res.patches[0].reshape(-1, patches.shape[1]).numpy(), rtol=2e-3, atol=2e-3)
        if res.registers is not None:
            np.testing.assert_allclose(t[L.REGISTERS][i].astype(np.float32), res.registers[0].numpy(), rtol=2e-3, atol=2e-3)
    assert (t[L.SUMMARY][:][~ok] == 0).all()
    # PHI-S files with the contract keys
    for feature in L.PHIS_FEATURES:
        with np.load(store.phis_path(report.teacher, feature)) as z:
            assert {"mean", "whiten", "unwhiten"} <= set(z.files)
    fp = t.attrs["fingerprint"]
    assert fp["dtype"] == "float16" and fp["image_policy"]["max_tokens"] == 64 and fp["student_patch_size"] == 16


def test_second_teacher_leaves_first_untouched_and_conflicts_are_refused(image_folder, tmp_path, ray_local):
    folder, _ = image_folder
    url = str(tmp_path / "store")
    run_cache(str(folder), url, _cfg(TINY_VIT, name="vit"))
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "teachers" / "vit").rglob("*") if p.is_file()}
    second = run_cache(str(folder), url, _cfg(TINY_CNN, name="cnn"))
    assert second.ingest.skipped
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "teachers" / "vit").rglob("*") if p.is_file()}
    assert files == after, "adding a teacher rewrote the first one"
    store = FeatureStore.open(url)
    assert store.teacher_names == ["vit", "cnn"]
    # same name, another fingerprint (seed) -> refused, naming what differs
    with pytest.raises(StoreError, match="another fingerprint"):
        run_cache(str(folder), url, _cfg(TINY_VIT, name="vit", seed=1))
    # the same teacher again is a no-op resume
    again = run_cache(str(folder), url, _cfg(TINY_VIT, name="vit"))
    assert again.resumed and again.images_computed == 0
    # another image list into this store -> refused
    other = tmp_path / "other"
    write_image_folder(other, bad=False)
    (other / "photo0_0.png").unlink()
    with pytest.raises(StoreError, match="another image list"):
        run_cache(str(other), url, _cfg(TINY_VIT, name="vit2"))


def test_float16_overflow_is_an_error_naming_teacher_and_feature():
    with pytest.raises(FeatureOverflowError, match="'big'.*'patches'"):
        check_range(np.array([[1.0, 7e4]], np.float32), "float16", "big", "patches")
    with pytest.raises(FeatureOverflowError, match="NaN"):
        check_range(np.array([np.nan], np.float32), "float32", "t", "summary")
    out = check_range(np.array([7e4], np.float32), "float32", "t", "summary")
    assert out.dtype == np.float32
    # int8: the largest value it accepts decodes finite, even in a chunk whose channel scales span 10³ (one
    # channel 10⁶x the spread of the others) with a row that peaks in a quiet channel
    from storage.codecs import as_stored

    d = 8
    limit = float(np.finfo(np.float32).max) / (4e3 * np.sqrt(d))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, d)) * limit * 1e-6
    x[:, 0] = rng.standard_normal(64) * limit * 0.3
    x[5, 3] = -limit * 0.999
    x = x.astype(np.float32)
    assert np.isfinite(as_stored("int8", check_range(x, "int8", "t", "patches"))).all()
    with pytest.raises(FeatureOverflowError, match="beyond int8"):
        check_range(x * np.float32(1.01 / 0.999), "int8", "t", "patches")


def test_overflowing_teacher_fails_the_job(image_folder, tmp_path, ray_local):
    folder, _ = image_folder
    teacher = build_teacher(TINY_VIT, random_init=True, seed=0)
    state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    for key in state:
        if key.startswith("norm.") and key.endswith("weight"):
            state[key] *= 1e7
    weights = tmp_path / "big.pt"
    torch.save(state, weights)
    cfg = load_config(CacheConfig, None, {"teacher": TINY_VIT, "weights": str(weights), "name": "big", **SMALL})
    with pytest.raises(Exception, match="float16"):
        run_cache(str(folder), str(tmp_path / "store"), cfg)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _kill_when(proc: subprocess.Popen, path: Path, count: int, timeout: float = 240) -> int:
    """SIGKILL the whole process group (driver + Ray) once ``count`` unit markers exist under ``path``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len([p for p in path.iterdir() if p.suffix == ".json"]) >= count:
            break
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's workers die with their raylet a moment after the driver; a unit they finish meanwhile is
    # committed atomically and identical to what the rerun would write. Count once they are gone.
    def count() -> int:
        return len([p for p in path.iterdir() if p.suffix == ".json"])
    last, stable_since = count(), time.time()
    while time.time() - stable_since < 3 and time.time() < deadline + 30:
        time.sleep(0.2)
        if count() != last:
            last, stable_since = count(), time.time()
    return last


@pytest.mark.slow  # kills at a random moment; CI runs the named crash points of tests/stages/test_faults.py
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    folder = tmp_path / "images"
    write_image_folder(folder)
    settings = {**SMALL, "shard_images": 1, "phis_max_rows": 100000}
    args = ["--teacher", TINY_VIT, "--name", "vit", "--random-init",
            *sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])]
    units = len(list(folder.iterdir()))
    full = tmp_path / "full"
    proc = _cli(["cache-teachers", str(folder), "--store", str(full), *args])
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    killed = tmp_path / "killed"
    # kill once while images are written, once while the teacher runs, then finish
    proc = _cli(["cache-teachers", str(folder), "--store", str(killed), *args])
    done = _kill_when(proc, killed / "_commits" / "images", 3)
    assert done < units, "the kill did not land inside the images phase"
    proc = _cli(["cache-teachers", str(folder), "--store", str(killed), *args])
    done = _kill_when(proc, killed / "teachers" / "vit" / "_commits", 3)
    assert done < units, "the kill did not land inside the teacher phase"
    proc = _cli(["cache-teachers", str(folder), "--store", str(killed), *args])
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    assert f"{done} already committed" in out
    a, b = store_arrays(str(full)), store_arrays(str(killed))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for feature in L.PHIS_FEATURES:
        pa = np.load(full / "teachers" / "vit" / "phis" / f"{feature}.npz")
        pb = np.load(killed / "teachers" / "vit" / "phis" / f"{feature}.npz")
        np.testing.assert_array_equal(pa["whiten"], pb["whiten"])


def test_inspect_cli(image_folder, tmp_path, ray_local):
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder, _ = image_folder
    url = str(tmp_path / "store")
    run_cache(str(folder), url, _cfg(TINY_CNN, name="cnn"))
    result = CliRunner().invoke(app, ["inspect", url, "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    t = facts["teachers"]["cnn"]
    assert t["complete"] and t["bytes_per_token"] > 0 and t["compression_ratio"] > 0
    assert facts["images"]["failed"] >= 4
    result = CliRunner().invoke(app, ["inspect", url])
    assert result.exit_code == 0 and "cnn" in result.output
    # readers: one image, a batch (same values, any order), and a dask view
    from storage.reader import StoreReader, dask_view, read_batch

    reader = StoreReader(url)
    g = zarr.open_group(url, mode="r")
    offsets = g["teachers/cnn/offsets"][:]
    valid = reader.valid_indices()
    one = reader.read(int(valid[2]))
    np.testing.assert_array_equal(one.patches["cnn"], g["teachers/cnn/patches"][offsets[valid[2]]: offsets[valid[2] + 1]])
    np.testing.assert_array_equal(one.summary["cnn"], g["teachers/cnn/summary"][valid[2]])
    batch = read_batch(reader, valid[::-1][:5])
    for item in batch:
        ref = reader.read(item.index)
        np.testing.assert_array_equal(item.pixels, ref.pixels)
        np.testing.assert_array_equal(item.patches["cnn"], ref.patches["cnn"])
        np.testing.assert_array_equal(item.summary["cnn"], ref.summary["cnn"])
    assert [b.index for b in batch] == list(valid[::-1][:5])
    bad = int(np.flatnonzero(~reader.ok)[0])
    with pytest.raises(ValueError, match="failed to decode"):
        reader.read(bad)
    view = dask_view(url, "cnn", "patches")
    assert view.shape == g["teachers/cnn/patches"].shape
    np.testing.assert_allclose(float(view[:100].astype("float64").sum().compute()),
                               float(g["teachers/cnn/patches"][:100].astype("float64").sum()))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no feature store" in result.output
