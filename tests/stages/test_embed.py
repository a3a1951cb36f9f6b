"""Embedding job of `pipeline curate`: rows equal the adapter, bad images recorded, kill -9 + resume."""

from __future__ import annotations

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
from stages.config import CurateConfig
from stages.embed import EmbedError, run_embed
from stages.sources import decode_rgb, list_images
from stages.teachers import build_teacher
from storage.failures import read_failure_table
from storage.image_policy import ImagePolicy

from cache_helpers import TINY_VIT, write_image_folder

SMALL = {"min_tokens": 16, "max_tokens": 64, "unit_images": 4, "batch_size": 3}


def _cfg(**extra) -> CurateConfig:
    base = {"embedder": TINY_VIT, "random_init": True, "levels": [4, 2], "target": 4, **SMALL}
    return load_config(CurateConfig, None, {**base, **extra})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embed_rows_equal_direct_adapter_call_and_failures_are_recorded(dtype, image_folder, tmp_path, ray_local):
    folder, bad = image_folder
    refs = list_images(folder)
    out = tmp_path / "run"
    report = run_embed(refs, str(out), _cfg(dtype=dtype))
    g = zarr.open_group(str(out), mode="r")
    emb, ok = g["embeddings"][:], g["pool/ok"][:]
    assert emb.dtype == np.dtype(dtype) and emb.shape == (len(refs), report.dim)
    assert [str(s) for s in g["pool/source"][:]] == [r.source for r in refs]
    assert report.units_total == -(-len(refs) // 4) and report.units_skipped == 0

    # the adapter called directly, image by image, on the store policy's pixels
    teacher = build_teacher(TINY_VIT, random_init=True, seed=0, patch_size=16)
    policy = ImagePolicy(16, 16, 64)
    names = [Path(r.source).name for r in refs]
    for i, ref in enumerate(refs):
        if names[i] in bad or names[i] == "corrupt.jpg":
            continue
        img = np.asarray(policy.resize(decode_rgb(Path(ref.source).read_bytes())))
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].contiguous()
        with torch.inference_mode():
            s = teacher.forward(x, (img.shape[0] // 16, img.shape[1] // 16)).summary[0].numpy()
        expected = s / np.linalg.norm(s)
        assert ok[i], names[i]
        tol = 1e-5 if dtype == "float32" else 2e-3
        np.testing.assert_allclose(emb[i].astype(np.float32), expected, atol=tol, rtol=0, err_msg=names[i])
        assert abs(np.linalg.norm(emb[i].astype(np.float32)) - 1) < tol * 10

    # bad files: ok false, zero rows, reasons in the failure table; the job went on
    index, reasons = read_failure_table(g["pool/failures"])
    index = list(index)
    table = {names[i]: r for i, r in zip(index, reasons)}
    for name, reason in bad.items():
        assert table[name] == reason
    assert table["corrupt.jpg"]  # some deterministic reason
    assert set(table) == set(bad) | {"corrupt.jpg"}
    assert not ok[index].any() and not emb[index].any()
    assert report.num_failed == len(table) and sum(report.failure_reasons.values()) == len(table)

    # a rerun finds every unit committed and computes nothing
    again = run_embed(refs, str(out), _cfg(dtype=dtype))
    assert again.skipped and again.images_computed == 0 and again.units_skipped == report.units_total
    # a folder recorded before compute_dtype existed meant float32: it resumes as such, bf16 is refused
    group = zarr.open_group(str(out), mode="r+")
    group.attrs.update({"embed": {k: v for k, v in group.attrs["embed"].items() if k != "compute_dtype"}})
    assert run_embed(refs, str(out), _cfg(dtype=dtype)).skipped
    with pytest.raises(EmbedError, match="compute_dtype"):
        run_embed(refs, str(out), _cfg(dtype=dtype, compute_dtype="bfloat16"))
    # another embedder in the same folder is refused, naming what differs
    with pytest.raises(EmbedError, match="embedder"):
        run_embed(refs, str(out), _cfg(dtype=dtype, embedder=TINY_VIT.replace("depth=2", "depth=1")))


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_after(proc: subprocess.Popen, markers: Path, count: int, timeout: float = 240) -> int:
    """SIGKILL the process group (driver + Ray) once ``count`` unit markers exist; wait for stragglers."""
    def n() -> int:
        return len([p for p in markers.iterdir() if p.suffix == ".json"]) if markers.exists() else 0

    deadline = time.time() + timeout
    while n() < count:
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed:\n{proc.stdout.read().decode()[-3000:]}")
        assert time.time() < deadline, "no unit committed in time"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last, stable = n(), time.time()
    while time.time() - stable < 2:
        time.sleep(0.2)
        if n() != last:
            last, stable = n(), time.time()
    return last


@pytest.mark.slow  # kills at a random moment; CI runs the named crash points of tests/stages/test_faults.py
def test_sigkill_mid_embed_then_rerun_equals_uninterrupted_run(tmp_path, ray_local):
    from stages.curate import run_curate

    folder = tmp_path / "images"
    write_image_folder(folder)
    n = len(list_images(folder))
    settings = {**SMALL, "unit_images": 1}
    full = tmp_path / "full"
    run_curate(str(folder), str(full), _cfg(unit_images=1, levels=[6, 2], target=5))

    killed = tmp_path / "killed"
    args = ["curate", str(folder), "--out", str(killed), "--embedder", TINY_VIT, "--random-init",
            "--levels", "6,2", "--target", "5", *sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])]
    done = _kill_after(_cli(args), killed / "_commits" / "embed", 3)
    assert done < n, "the kill did not land inside the embedding phase"
    assert not (killed / "manifest").exists()
    proc = _cli(args)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    assert f"({done} already committed)" in out

    a, b = zarr.open_group(str(full), mode="r"), zarr.open_group(str(killed), mode="r")
    for name in ("embeddings", "pool/ids", "pool/source", "pool/ok", "pool/failures/index",
                 "pool/failures/reason", "manifest/index", "manifest/clusters", "manifest/source"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
