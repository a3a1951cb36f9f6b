"""Deterministic crashes: SIGKILL at each named point (storage.faults), rerun, and the result equals an
uninterrupted run, and the teacher's own output on the stored pixels.

A unit's commit marker must come after its data: a crash right after the marker (``commit.after``) is
then harmless, and a writer that marked a unit before writing it would leave the rerun with holes,
which the comparison with the uninterrupted run catches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_ok, run_pipeline
from stages.config import CacheConfig
from stages.teachers import build_teacher
from storage import layout as L
from storage.faults import POINTS
from storage.image_policy import ImagePolicy
from storage.phis import PhisTransform
from storage.store import FeatureStore

from cache_helpers import TINY_CNN, store_arrays, write_image_folder

TINY_SIGLIP = ("open_clip:ViT-B-16-SigLIP2-256,embed_dim=64,vision_cfg.image_size=64,trunk.depth=2,trunk.embed_dim=64,"
               "trunk.num_heads=2,text_cfg.width=64,text_cfg.heads=2,text_cfg.layers=1,text_cfg.context_length=16,"
               "text_cfg.vocab_size=49408,text_cfg.hf_tokenizer_name=")
IN_PROCESS = {"random_init": True, "min_tokens": 16, "max_tokens": 64, "shard_images": 2, "shard_rows": 32,
              "chunk_rows": 16, "pixel_shard_bytes": 16384, "pixel_chunk_bytes": 4096, "batch_size": 4, "num_cpus": 2}
SETTINGS = ["--random-init", *sum((["--set", f"{k}={v}"] for k, v in IN_PROCESS.items() if k != "random_init"), [])]


def _cache(images: Path, store: Path, teacher: str, name: str, fault: str | None = None):
    return run_pipeline("cache-teachers", images, "--store", store, "--teacher", teacher, "--name", name, *SETTINGS,
                        env={"AMOE_FAULT": fault} if fault else None, new_session=fault is not None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    """Images, and a store of them with teacher "siglip" written without a crash (in-process: the same code)."""
    from stages.cache import run_cache

    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    write_image_folder(images)
    full = root / "full"
    run_cache(str(images), str(full), CacheConfig(teacher=TINY_SIGLIP, name="siglip", **IN_PROCESS))
    return images, full


def _same_store(a: Path, b: Path) -> None:
    x, y_arrays = store_arrays(str(a)), store_arrays(str(b))
    assert x.keys() == y_arrays.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y_arrays[key], err_msg=key)
    for feature in L.PHIS_FEATURES:
        for teacher in FeatureStore.open(str(a)).teacher_names:
            pa, pb = (PhisTransform.load(FeatureStore.open(str(s)).phis_path(teacher, feature)) for s in (a, b))
            # the same statistics; eigenvectors of repeated eigenvalues (and their signs) may come out
            # rotated in another process, so the rotation is checked for what PHI-S asks of it instead
            np.testing.assert_allclose(pb.mean, pa.mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(pb.eigenvalues, pa.eigenvalues, rtol=1e-9, atol=1e-9 * pa.eigenvalues.max())
            assert (pb.method, pb.count, pb.scale) == (pa.method, pa.count, pytest.approx(pa.scale, rel=1e-12))
            rows = y_arrays[f"teachers/{teacher}/{feature}"].astype(np.float64)
            if feature == L.SUMMARY:
                rows = rows[y_arrays["images/ok"]]
            np.testing.assert_allclose(pb.apply(rows).var(0), 1.0, rtol=1e-6)
    store = FeatureStore.open(str(b))
    assert store.teacher_names == FeatureStore.open(str(a)).teacher_names
    assert all(store.teacher_attrs(t)["complete"] for t in store.teacher_names)


def _equals_teacher_output(store_path: Path, name: str, spec: str, images: int = 4) -> None:
    """Independent of both runs: the library teacher on the stored pixels gives the stored targets."""
    store = FeatureStore.open(str(store_path))
    teacher = build_teacher(spec, random_init=True, seed=0)
    g = store.teacher_group(name)
    offsets, pixel_offsets = g[L.OFFSETS][:], store.image_array(L.PIXEL_OFFSETS)[:]
    ok = store.image_array(L.OK)[:]
    for i in np.flatnonzero(ok)[:images]:
        img = ImagePolicy.decode(store.image_array(L.PIXELS)[pixel_offsets[i]: pixel_offsets[i + 1]])
        with torch.inference_mode():
            out = teacher.forward(torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(),
                                  (img.shape[0] // 16, img.shape[1] // 16))
        np.testing.assert_allclose(g[L.SUMMARY][i].astype(np.float32), out.summary[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(g[L.PATCHES][offsets[i]: offsets[i + 1]].astype(np.float32),
                                   out.patches[0].reshape(-1, out.patches.shape[-1]).numpy(), rtol=2e-3, atol=2e-3)


def _crash(proc, point: str) -> None:
    assert proc.returncode != 0, f"the fault point {point} was never reached:\n{proc.stdout}\n{proc.stderr}"


def test_a_crash_at_every_point_of_cache_teachers_then_a_rerun_equals_uninterrupted(reference, tmp_path):
    """One store, one crash at each point in the order a command meets them, each rerun going further:
    the images (after a unit's data but before its marker, then after a marker: they are written by
    Ray tasks in several processes, each counting its own commits, so the first commit of any is the
    point), the teacher group (attributes without arrays, arrays without heads), the teacher's units
    (on its one actor: its second commit), and PHI-S (one file written). Then a clean finish."""
    images, full = reference
    store = tmp_path / "store"
    for point in ("commit.before", "commit.after", "teacher.create", "teacher.heads", "commit.before@2",
                  "commit.after@2", "phis"):
        _crash(_cache(images, store, TINY_SIGLIP, "siglip", fault=point), point)
        state = FeatureStore.open(str(store))
        assert "siglip" not in state.fingerprint()["teachers"], point
        assert state.images_complete == (point not in ("commit.before", "commit.after")), point
    assert_ok(_cache(images, store, TINY_SIGLIP, "siglip"))
    _same_store(full, store)
    _equals_teacher_output(store, "siglip", TINY_SIGLIP)
    assert "attn_pool.latent" in " ".join(FeatureStore.open(str(store)).teacher_group("siglip")[L.HEADS].array_keys())


def test_crashes_while_curating_then_rerun_equals_uninterrupted(reference, tmp_path):
    from stages.config import CurateConfig
    from stages.curate import run_curate

    images, _ = reference
    args = ["curate", images, "--embedder", TINY_CNN, "--random-init", "--levels", "6,2", "--target", "6",
            "--set", "min_tokens=16", "--set", "unit_images=4", "--set", "num_cpus=2"]
    run_curate(str(images), str(tmp_path / "whole"),  # uninterrupted, in-process: the same code
               CurateConfig(embedder=TINY_CNN, random_init=True, levels=[6, 2], target=6, min_tokens=16,
                            unit_images=4, num_cpus=2))
    for point in ("commit.before@2", "manifest"):
        _crash(run_pipeline(*args, "--out", tmp_path / "crashed", env={"AMOE_FAULT": point}, new_session=True), point)
    assert_ok(run_pipeline(*args, "--out", tmp_path / "crashed"))
    from stages.manifest import read_manifest

    a, b = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "crashed")
    for key in ("ids", "source", "index", "clusters"):
        np.testing.assert_array_equal(a[key], b[key])
    x, y = store_arrays(str(tmp_path / "whole")), store_arrays(str(tmp_path / "crashed"))
    np.testing.assert_array_equal(x["embeddings"], y["embeddings"])


def test_crash_during_the_checkpoint_rename_then_resume_equals_uninterrupted(train_store, tmp_path):
    args = ["--model", "tiny", "--steps", "4", "--set", "data.seq_len=160", "--set", "data.seqs_per_batch=2",
            "--set", "data.workers=0", "--set", "run.log_every=1", "--set", "run.checkpoint_every=2",
            "--set", "run.threads=1"]
    assert_ok(run_pipeline("train", "--store", train_store, "--out", tmp_path / "whole", *args))
    crashed = run_pipeline("train", "--store", train_store, "--out", tmp_path / "crashed", *args,
                           env={"AMOE_FAULT": "checkpoint.rename@2"}, new_session=True)
    assert crashed.returncode != 0
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert (ckpts / "step_00000004").is_dir() and (ckpts / "LATEST").read_text() == "step_00000002"
    assert_ok(run_pipeline("train", "--store", train_store, "--out", tmp_path / "crashed", *args))
    import json

    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("whole", "crashed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_every_fault_point_is_exercised():
    tested = {"commit.before", "commit.after", "teacher.create", "teacher.heads", "phis", "checkpoint.rename", "manifest"}
    assert tested == set(POINTS)
