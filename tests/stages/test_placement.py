"""Teachers on accelerators, as far as CPU can prove it: device and replica placement from the Ray
cluster's GPUs (Ray's own GPU scheduling, with GPUs declared to a real cluster), compute precision
(bf16 autocast runs on CPU) against float32, and precision as part of the teacher's identity."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import error_line, run_pipeline
from config import load_config
from stages.cache import run_cache
from stages.config import CacheConfig
from stages.datasets import bundled_photos
from stages.placement import DeviceError, resolve_placement
from stages.teachers import build_teacher
from storage import layout as L
from storage.image_policy import ImagePolicy
from storage.store import FeatureStore, StoreError

from cache_helpers import TINY_VIT, write_image_folder

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what happens without a GPU")


# ------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("device, dtype, per_worker, workers, gpus, expected", [
    ("auto", None, 1.0, None, 0, ("cpu", None, 0.0, 1)),
    ("cpu", None, 1.0, 3, 8, ("cpu", None, 0.0, 3)),  # asked for CPU on a GPU cluster
    ("auto", None, 1.0, None, 4, ("cuda", None, 1.0, 4)),  # one replica per GPU
    ("cuda", "float32", 0.5, None, 3, ("cuda", "float32", 0.5, 6)),  # two replicas share a GPU
    ("auto", None, 2, None, 5, ("cuda", None, 2.0, 2)),  # whole GPUs per replica; one GPU left over
    ("cuda", "bfloat16", 0.25, 3, 1, ("cuda", "bfloat16", 0.25, 3)),
])
def test_placement_follows_the_clusters_gpus(device, dtype, per_worker, workers, gpus, expected):
    p = resolve_placement(device, dtype, per_worker, workers, gpus)
    assert (p.device, p.compute_dtype, p.gpus_per_worker, p.workers) == expected


@pytest.mark.parametrize("device, per_worker, workers, gpus, message", [
    ("cuda", 1.0, None, 0, "--device cuda: the cluster has no CUDA GPU"),
    ("auto", 1.5, None, 4, "--gpus-per-worker 1.5"),
    ("cuda", 2, None, 1, "has only 1 GPUs"),
    ("cuda", 1.0, 3, 2, "--workers 3 x --gpus-per-worker 1 needs 3 GPUs"),  # Ray would never place the third
    ("gpu", 1.0, None, 1, "device 'gpu' is not one of"),
])
def test_placement_refuses_what_the_cluster_cannot_serve(device, per_worker, workers, gpus, message):
    with pytest.raises(DeviceError, match=message.replace("(", r"\(")):
        resolve_placement(device, None, per_worker, workers, gpus)


def test_replicas_the_cluster_cannot_place_are_refused_not_left_hanging():
    from stages.placement import check_fits

    p = resolve_placement("cuda", None, 1.0, None, 2)  # two replicas on two GPUs
    check_fits(p, 8, 16)
    with pytest.raises(DeviceError, match="2 replica\\(s\\) x 16 CPU threads need 32 CPUs; the cluster has 16"):
        check_fits(p, 16, 16)  # each asks for every CPU: Ray would never place the second


def test_replicas_ask_ray_for_gpus_and_fractions_share_one(tmp_path):
    """A real Ray cluster that declares one GPU: `--device auto` becomes CUDA, 0.5 GPU per replica
    places two replicas, and Ray gives both the same GPU (its CUDA_VISIBLE_DEVICES)."""
    script = textwrap.dedent("""
        import json, logging, os, ray
        from stages.placement import check_fits, cluster_resources, resolve_placement
        from stages.runner import UnitJob

        class Probe:
            def run_unit(self, unit):
                import time
                time.sleep(0.5)  # both replicas are alive at once
                return {"unit": unit, "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                        "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
        gpus, cpus, where = cluster_resources(None)
        p = resolve_placement("auto", None, 0.5, None, gpus, where)
        check_fits(p, 1, cpus, where)
        rows = list(UnitJob("probe", 4).run_actors(Probe, (), workers=p.workers, num_cpus=1,
                                                   num_gpus=p.gpus_per_worker))
        print(json.dumps({"gpus": gpus, "device": p.device, "workers": p.workers, "rows": rows}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["gpus"] == 1.0 and out["device"] == "cuda" and out["workers"] == 2
    assert sorted(r["unit"] for r in out["rows"]) == [0, 1, 2, 3]
    assert len({r["pid"] for r in out["rows"]}) == 2  # two replicas
    assert all(r["gpu_ids"] == ["0"] and r["visible"] == "0" for r in out["rows"])  # sharing GPU 0


@NO_CUDA
def test_a_cuda_request_without_a_gpu_is_refused_before_any_work(tmp_path):
    images = tmp_path / "images"
    write_image_folder(images, bad=False)
    store, out = tmp_path / "store", tmp_path / "curated"
    # on its own (no Ray running yet): refused before a cluster is started
    error_line(run_pipeline("cache-teachers", images, "--store", store, "--teacher", TINY_VIT, "--random-init",
                            "--device", "cuda", alone=True), "--device cuda", "this machine has no CUDA GPU")
    error_line(run_pipeline("curate", images, "--out", out, "--embedder", TINY_VIT, "--random-init",
                            "--levels", "4,2", "--target", "5", "--device", "cuda", alone=True),
               "this machine has no CUDA GPU")
    # joined to a running cluster without GPUs (the tests' own)
    error_line(run_pipeline("cache-teachers", images, "--store", store, "--teacher", TINY_VIT, "--random-init",
                            "--device", "cuda"), "--device cuda", "the running Ray cluster has no CUDA GPU")
    assert not store.exists() and not out.exists()
    with pytest.raises(ValueError, match="no CUDA GPU"):
        build_teacher(TINY_VIT, random_init=True, device="cuda")


# ------------------------------------------------------------------------------------ precision
def test_the_default_compute_dtype_is_the_teachers():
    vit = build_teacher(TINY_VIT, random_init=True)
    cnn = build_teacher("timm:efficientnet_lite0", random_init=True)
    assert [vit.default_compute_dtype(d) for d in ("cpu", "cuda")] == ["float32", "bfloat16"]
    assert [cnn.default_compute_dtype(d) for d in ("cpu", "cuda")] == ["float32", "float32"]
    with pytest.raises(ValueError, match="compute dtype 'int8'"):
        build_teacher(TINY_VIT, random_init=True, compute_dtype="int8")


def _real_images(n: int) -> dict[int, np.ndarray]:
    policy = ImagePolicy(16, 64, 256)
    photos = sorted(bundled_photos().items())[:n]
    return {i: np.asarray(policy.resize(Image.fromarray(a).convert("RGB"))) for i, (_, a) in enumerate(photos)}


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    keep = (a.norm(dim=-1) > 0) | (b.norm(dim=-1) > 0)  # a zero row (ReLU) has no direction
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)[keep]


def _bf16_vs_fp32(spec: str, random_init: bool, images) -> tuple[torch.Tensor, torch.Tensor]:
    out = {}
    for dtype in ("float32", "bfloat16"):
        teacher = build_teacher(spec, random_init=random_init, seed=0, compute_dtype=dtype)
        out[dtype] = {tuple(k): o for k, o in teacher.forward_images(images, 8)}
    keys = list(out["float32"])
    summary = torch.cat([_cosines(out["float32"][k].summary, out["bfloat16"][k].summary) for k in keys])
    patches = torch.cat([_cosines(out["float32"][k].patches, out["bfloat16"][k].patches) for k in keys])
    return summary, patches


def test_bf16_autocast_against_float32_on_real_images():
    """A ViT keeps cosine >= 0.999 under bf16 (the issue's bar). The real EfficientNet-Lite0 stays a close
    approximation (>= 0.99) but misses the CNN bar of 0.995 on these photos (benchmarks/compute_dtype.py),
    which is why CNN teachers default to float32 (``TimmTeacher.default_compute_dtype``)."""
    images = _real_images(10)
    vit_summary, vit_patches = _bf16_vs_fp32("timm:vit_small_patch16_dinov3,depth=4", True, images)
    assert vit_summary.min() >= 0.999 and vit_patches.median() >= 0.999
    cnn_summary, cnn_patches = _bf16_vs_fp32("timm:efficientnet_lite0", False, images)
    assert cnn_summary.mean() >= 0.99 and cnn_patches.median() >= 0.99


def test_stored_targets_are_computed_in_the_asked_precision_and_never_mixed(tmp_path, ray_local):
    images = tmp_path / "images"
    write_image_folder(images, bad=False)
    url = str(tmp_path / "store")
    small = {"teacher": TINY_VIT, "random_init": True, "name": "vit", "min_tokens": 16, "max_tokens": 64,
             "shard_images": 4, "shard_rows": 96, "chunk_rows": 32, "pixel_shard_bytes": 1 << 14,
             "pixel_chunk_bytes": 1 << 12, "batch_size": 4, "dtype": "float32", "phis": False}
    report = run_cache(str(images), url, load_config(CacheConfig, None, {**small, "compute_dtype": "bfloat16"}))
    assert report.placement.startswith("cpu bfloat16")
    store = FeatureStore.open(url)
    ok = store.image_array(L.OK)[:]
    stored = store.teacher_group("vit")[L.SUMMARY][:][ok]
    assert store.teacher_attrs("vit")["fingerprint"]["compute_dtype"] == "bfloat16"
    # the stored float32 summaries are the bf16 forward's, bit for bit, and not the float32 forward's
    pixels, offsets = store.image_array(L.PIXELS), store.image_array(L.PIXEL_OFFSETS)[:]
    decoded = {int(i): ImagePolicy.decode(pixels[offsets[i]: offsets[i + 1]]) for i in np.flatnonzero(ok)}
    for dtype, same in (("bfloat16", True), ("float32", False)):
        teacher = build_teacher(TINY_VIT, random_init=True, seed=0, compute_dtype=dtype)
        direct = np.zeros_like(store.teacher_group("vit")[L.SUMMARY][:])
        for keys, out in teacher.forward_images(decoded, 4):
            direct[keys] = out.summary.numpy()
        assert np.array_equal(stored, direct[ok]) == same, dtype
    # float32-computed targets never join the bf16 group; the same precision resumes it
    with pytest.raises(StoreError, match="compute_dtype: 'bfloat16' != 'float32'"):
        run_cache(str(images), url, load_config(CacheConfig, None, {**small, "compute_dtype": "float32"}))
    again = run_cache(str(images), url, load_config(CacheConfig, None, {**small, "compute_dtype": "bfloat16"}))
    assert again.resumed and again.images_computed == 0


def test_a_store_from_before_compute_dtype_resumes_as_float32_and_refuses_bf16(tmp_path, ray_local):
    """Fingerprints written before ``compute_dtype`` existed mean float32: such a teacher resumes under
    float32 (the old default) and refuses bf16, naming the field."""
    import zarr

    images = tmp_path / "images"
    write_image_folder(images, bad=False)
    url = str(tmp_path / "store")
    small = {"teacher": TINY_VIT, "random_init": True, "name": "vit", "min_tokens": 16, "max_tokens": 64,
             "shard_images": 4, "batch_size": 4, "phis": False}
    run_cache(str(images), url, load_config(CacheConfig, None, small))
    group = zarr.open_group(url, mode="r+")["teachers/vit"]
    legacy = {k: v for k, v in group.attrs["fingerprint"].items() if k != "compute_dtype"}
    group.attrs.update({"fingerprint": legacy})  # as the previous version wrote it
    again = run_cache(str(images), url, load_config(CacheConfig, None, small))
    assert again.resumed and again.images_computed == 0
    with pytest.raises(StoreError, match="compute_dtype: 'float32' != 'bfloat16'"):
        run_cache(str(images), url, load_config(CacheConfig, None, {**small, "compute_dtype": "bfloat16"}))
