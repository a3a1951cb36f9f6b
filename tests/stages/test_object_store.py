"""The store on an object store: `s3://` URLs against a real S3-compatible server (moto's, on 127.0.0.1).

The claims: cache-teachers writes the same arrays to a bucket as to a local folder; inspect, train and
eval read it there and give what they give on the local copy; a writer killed between a unit's objects
and its commit marker (an object store has no rename: the marker, one PUT after the data, is the commit)
leaves nothing that reads as committed, and the rerun completes the store; a second writer is refused by
the lock's conditional create, the object-store form of O_EXCL.

Commands that start Ray run as subprocesses with the AWS environment (their Ray workers inherit it, as a
user's would); the others run in this process with the same environment patched in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_ok, error_line, run_pipeline
from s3_server import patched_environ, s3_server
from stages.cache import run_cache
from stages.config import CacheConfig
from storage.store import FeatureStore
from storage.verify import verify_store

from cache_helpers import TINY_VIT, store_arrays
from train_helpers import write_train_images

SETTINGS = {"random_init": True, "seed": 0, "min_tokens": 16, "max_tokens": 48, "shard_images": 8, "shard_rows": 64,
            "chunk_rows": 32, "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12, "batch_size": 8,
            "num_cpus": 2}
TRAIN = ["--model", "tiny", "--steps", "3", "--set", "data.seq_len=160", "--set", "data.seqs_per_batch=2",
         "--set", "data.workers=1", "--set", "run.log_every=1", "--set", "run.threads=1",
         # raw targets: PHI-S estimated in another process may rotate the eigenvectors of (near-)repeated
         # eigenvalues, which changes the loss in PHI-S space but not what was read
         "--set", "loss.phis=false"]


def _cli_settings() -> list[str]:
    return ["--random-init", *sum((["--set", f"{k}={v}"] for k, v in SETTINGS.items() if k != "random_init"), [])]


@pytest.fixture(scope="module")
def s3():
    with s3_server("stores") as env:
        yield env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("s3_images")
    labels = write_train_images(root / "images")
    images = root / "images"
    url = str(images.parent / "local_store")
    run_cache(str(images), url, CacheConfig(teacher=TINY_VIT, name="dino", labels=str(labels), **SETTINGS))
    return images, labels, url


def _cache_to(url: str, reference, env: dict, fault: str | None = None):
    images, labels, _ = reference
    return run_pipeline("cache-teachers", images, "--store", url, "--teacher", TINY_VIT, "--name", "dino",
                        "--labels", labels, *_cli_settings(), env={**env, **({"AMOE_FAULT": fault} if fault else {})},
                        new_session=fault is not None)


def _assert_same_arrays(a_url: str, b_url: str) -> None:
    a, b = store_arrays(a_url), store_arrays(b_url)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_job_into_a_bucket_killed_before_a_commit_marker_resumes_equal_to_the_local_job(s3, reference, tmp_path):
    """Killed after a unit's objects and before its marker: nothing uncommitted counts and what is committed is
    whole; the rerun completes the store, whose arrays equal the local job's; inspect, train and eval read it
    in the bucket and give what they give on the local store."""
    url = "s3://stores/job"
    proc = _cache_to(url, reference, s3, fault="commit.before@2")
    assert proc.returncode != 0, f"commit.before@2 was never reached: {proc.stderr}"
    with patched_environ(s3):
        store = FeatureStore.open(url)
        assert not store.images_complete or "dino" not in store.fingerprint()["teachers"]
        assert not verify_store(url).damaged  # every committed unit's objects are there and whole
    assert_ok(_cache_to(url, reference, s3))
    with patched_environ(s3):
        _assert_same_arrays(reference[2], url)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        assert fs.exists("stores/job/zarr.json") and fs.exists("stores/job/teachers/dino/patches/zarr.json")
        assert not fs.exists("stores/job/_staging")  # the staged units are removed once the images are complete
        # PHI-S statistics live in the bucket (not in a local folder of the same name) and equal the local job's
        from storage import layout as L
        from storage.phis import PhisTransform

        bucket, local = FeatureStore.open(url), FeatureStore.open(reference[2])
        for feature in L.PHIS_FEATURES:
            assert bucket.phis_path("dino", feature).startswith("s3://")
            assert fs.exists(f"stores/job/teachers/dino/phis/{feature}.npz")
            a, b = (PhisTransform.load(s.phis_path("dino", feature)) for s in (local, bucket))
            assert (a.method, a.count) == (b.method, b.count)
            np.testing.assert_allclose(b.mean, a.mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-9, atol=1e-9 * a.eigenvalues.max())
        assert not Path("stores").exists(), "a bucket path was written as a local folder"
        assert "no damage" in assert_ok(run_pipeline("inspect", url, "--verify")).stdout
        assert "dino" in assert_ok(run_pipeline("inspect", url)).stdout
        runs = {}
        for name, where in (("bucket", url), ("local", reference[2])):
            runs[name] = tmp_path / name
            assert_ok(run_pipeline("train", "--store", where, "--out", runs[name], *TRAIN))
            assert_ok(run_pipeline("eval", runs[name], "--store", where, "--tasks", "knn", "--k", "5"))
    losses = {n: [json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for n, r in runs.items()}
    assert len(losses["bucket"]) == 3 and losses["bucket"] == losses["local"]
    knn = {n: json.loads((r / "eval.json").read_text())["knn"] for n, r in runs.items()}
    assert knn["bucket"]["top1"] == knn["local"]["top1"] and knn["bucket"]["query_images"] == 40


def test_a_second_writer_in_a_bucket_is_refused_by_the_conditional_create(s3, reference):
    from storage.locks import LockError, WriterLock

    url = "s3://stores/locked"
    with patched_environ(s3):
        store = FeatureStore.open_or_create(url, FeatureStore.open(reference[2]).policy, created_by="test")
        first = store.lock("teacher-dino")
        first.acquire()  # held by this live process
        with pytest.raises(LockError, match="being written by another process"):
            WriterLock(store.fs, first.path, "teacher dino").acquire()
        try:
            error_line(_cache_to(url, reference, s3), "being written by another process", "teacher-dino.lock")
        finally:
            first.release()
        assert not store.exists("_locks/teacher-dino.lock")


def test_commit_markers_written_by_another_process_are_seen_at_once(s3):
    """The driver lists a bucket's commit markers while Ray workers (other processes) add them: a listing cached
    by this process must never hide a marker written since."""
    import subprocess
    import sys

    from storage.commits import CommitLog

    url = "s3://stores/markers"
    with patched_environ(s3):
        log = CommitLog(url, "_commits/images")
        log.commit(0)
        assert log.committed() == {0}
        code = "from storage.commits import CommitLog; CommitLog('s3://stores/markers', '_commits/images').commit(1)"
        subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ}, timeout=120)
        assert log.committed() == {0, 1}
        assert CommitLog(url, "_commits/images").committed() == {0, 1}


def test_an_unreachable_endpoint_or_a_missing_bucket_is_one_line(s3, reference):
    from s3_server import _free_port

    closed = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    error_line(run_pipeline("inspect", "s3://stores/job", env=closed), "Could not connect to the endpoint URL")
    error_line(run_pipeline("inspect", "s3://no-such-bucket/store", env=s3), "no feature store at s3://no-such-bucket")
    error_line(_cache_to("s3://no-such-bucket/store", reference, s3), "s3://no-such-bucket/store",
               "bucket does not exist")


CURATE = ["--embedder", TINY_VIT, "--random-init", "--levels", "4,2", "--target", "6", "--set", "min_tokens=16",
          "--set", "max_tokens=48", "--set", "unit_images=8", "--set", "num_cpus=2"]


def test_curate_into_a_bucket_equals_the_local_run_and_its_manifest_is_images_there(s3, reference, tmp_path):
    """`curate --out s3://...`: embeddings, pool labels, manifest, tree, metrics and plots in the bucket, equal to
    the same curation in a local folder; a rerun resumes there; the manifest's URL is IMAGES for cache-teachers;
    a prefix that holds something else is refused."""
    import zarr

    from stages.config import CurateConfig
    from stages.curate import run_curate
    from stages.manifest import read_manifest
    from stages.sources import list_images
    from storage.fsutil import filesystem

    images, _, _ = reference
    url = "s3://stores/curated"
    assert_ok(run_pipeline("curate", images, "--out", url, *CURATE, env=s3))
    local = str(tmp_path / "curated")
    run_curate(str(images), local, CurateConfig(embedder=TINY_VIT, random_init=True, levels=[4, 2], target=6,
                                                min_tokens=16, max_tokens=48, unit_images=8, num_cpus=2))
    with patched_environ(s3):
        a, b = read_manifest(local), read_manifest(url)
        for key in ("ids", "source", "index", "clusters"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        there = zarr.open_group(url, mode="r", storage_options={"use_listings_cache": False})
        here = zarr.open_group(local, mode="r")
        for key in ("embeddings", "pool/ok", "clusters/level1", "clusters/sqdist"):
            np.testing.assert_array_equal(here[key][:], there[key][:], err_msg=key)
        fs, root = filesystem(url)
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        assert {"manifest", "metrics.json", "hierarchy.npz", "plots", "clusters", "embeddings"} <= names
        assert fs.cat_file(f"{root}/plots/entropy.png")[:8] == b"\x89PNG\r\n\x1a\n"
        metrics = json.loads(fs.cat_file(f"{root}/metrics.json"))
        assert metrics["n_selected"] == 6 == json.loads(Path(local, "metrics.json").read_text())["n_selected"]
        assert [r.source for r in list_images(f"{url}/manifest")] == [r.source for r in list_images(local)]
        assert [r.source for r in list_images(url)] == [str(s) for s in b["source"]]
        fs.pipe_file("stores/someone-else/notes.txt", b"not ours")
        with pytest.raises(ValueError, match="must be a curation manifest"):
            list_images("s3://stores/someone-else")
    again = assert_ok(run_pipeline("curate", images, "--out", url, *CURATE, env=s3))
    assert "already committed" in again.stdout
    error_line(run_pipeline("curate", images, "--out", "s3://stores/someone-else", *CURATE, env=s3),
               "not a curation run folder")
    with patched_environ(s3):
        assert fs.cat_file("stores/someone-else/notes.txt") == b"not ours"
