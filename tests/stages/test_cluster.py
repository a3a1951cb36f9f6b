"""curate and cache-teachers on a real multi-node Ray cluster (three worker nodes on 127.0.0.1,
tests/ray_nodes.py), joined with --ray-address: the work runs on every node (curate's embedding units,
level-1 fit shards and pool assignment units; cache-teachers' image and teacher units), and a node killed
mid-job (its raylet and its workers, by PID) costs nothing: Ray restarts the lost teacher actor on another
node and retries its calls, and the results equal the ones of an uninterrupted job on this process's own Ray."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_ok, run_pipeline
from ray_nodes import LOOPBACK_ENV, ray_nodes
from stages.cache import run_cache
from stages.config import CacheConfig
from storage.store import FeatureStore

from cache_helpers import TINY_VIT, store_arrays, write_image_folder

# a teacher slow enough (~0.1 s per image on one thread) that a node can be killed while it works
TEACHER = "timm:vit_small_patch16_dinov3,depth=6"
SETTINGS = {"random_init": True, "seed": 0, "min_tokens": 64, "max_tokens": 96, "shard_images": 1,
            "shard_rows": 64, "chunk_rows": 32, "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12,
            "batch_size": 4, "workers": 2, "threads": 1, "phis": False}


@pytest.fixture(scope="module")
def images_and_reference(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("cluster")
    write_image_folder(root / "images")
    reference = str(root / "reference")
    run_cache(str(root / "images"), reference, CacheConfig(teacher=TEACHER, name="vit", **SETTINGS))
    return root / "images", reference


def kill_node(raylet_pid: int) -> None:
    """A node's failure: its raylet and every process it started (its workers, the teacher actor among them)
    die at once (SIGKILL), as when the machine goes away."""
    import psutil

    raylet = psutil.Process(raylet_pid)
    for p in [*raylet.children(recursive=True), raylet]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def _nodes_of(store: FeatureStore, log) -> set[str]:
    return {log.info(u).get("node") for u in log.committed()}


CURATE = {"min_tokens": 16, "max_tokens": 64, "unit_images": 2, "workers": 3, "threads": 1, "plots": False}


def _curate_on(images, out, cluster) -> None:
    """curate with its three jobs on the cluster: embedding actors, a level-1 fit over three shard actors and
    the pool's assignment units; each ran on every node, and the result equals the same curation run here."""
    from curation.hierarchy import Hierarchy
    from stages.assign_job import ASSIGN_COMMITS
    from stages.config import CurateConfig
    from stages.curate import run_curate
    from stages.embed import EMBED_COMMITS
    from stages.manifest import read_manifest
    from storage.commits import CommitLog
    import zarr

    args = ["curate", images, "--out", out / "cluster", "--embedder", TINY_VIT, "--random-init", "--levels", "4,2",
            "--target", "5", "--fit-workers", "3", *sum((["--set", f"{k}={v}"] for k, v in CURATE.items()), [])]
    assert_ok(run_pipeline(*args, "--set", f"ray_address={cluster['address']}", env=LOOPBACK_ENV))
    every = {n["node_id"] for n in cluster["nodes"]}
    for prefix in (EMBED_COMMITS, ASSIGN_COMMITS):
        log = CommitLog(str(out / "cluster"), prefix)
        assert {log.info(u)["node"] for u in log.committed()} == every, f"{prefix} did not run on every node"
    metrics = json.loads((out / "cluster" / "metrics.json").read_text())
    assert set(metrics["level1_fit"]["worker_nodes"]) == every, "the level-1 fit's shards did not span the nodes"

    run_curate(str(images), str(out / "here"), CurateConfig(embedder=TINY_VIT, random_init=True, levels=[4, 2],
                                                           target=5, fit_workers=3, **{**CURATE, "workers": 1}))
    a, b = read_manifest(out / "here"), read_manifest(out / "cluster")
    for key in ("ids", "index", "clusters"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    here, there = zarr.open_group(str(out / "here"), mode="r"), zarr.open_group(str(out / "cluster"), mode="r")
    for key in ("embeddings", "clusters/level1", "clusters/sqdist"):
        np.testing.assert_array_equal(here[key][:], there[key][:], err_msg=key)
    tree = Hierarchy.load(out / "cluster" / "hierarchy.npz", there["clusters/level1"], there["clusters/sqdist"])
    assert tree.cluster_sizes(1).sum() == int(there["pool/ok"][:].sum())


def test_curate_and_cache_teachers_run_on_every_node_and_a_node_killed_mid_job_costs_nothing(images_and_reference, tmp_path):
    images, reference = images_and_reference
    store_url = str(tmp_path / "store")
    args = ["cache-teachers", images, "--store", store_url, "--teacher", TEACHER, "--name", "vit",
            "--random-init", *sum((["--set", f"{k}={v}"] for k, v in SETTINGS.items() if k != "random_init"), [])]
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}  # Ray's own node-death settings
    with ray_nodes([{"num_cpus": 2}, {"num_cpus": 2}, {"num_cpus": 2}], system_config=health) as cluster:
        _curate_on(images, tmp_path / "curate", cluster)
        killed: dict = {}

        def kill_a_teacher_node() -> None:
            """Once the teacher has committed a unit, kill a node that holds a teacher actor."""
            deadline = time.time() + 240
            while time.time() < deadline and not killed:
                try:
                    store = FeatureStore.open(store_url)
                    nodes = _nodes_of(store, store.teacher_commits("vit")) if store.has_teacher("vit") else set()
                except Exception:
                    nodes = set()
                for node in cluster["nodes"]:
                    if node["node_id"] in nodes:
                        kill_node(node["raylet_pid"])
                        killed.update(node=node["node_id"], at=len(store.teacher_commits("vit").committed()),
                                      time=time.time())
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_teacher_node, daemon=True)
        killer.start()
        # the job ends only if Ray restarts the lost actor and retries its call (without it: RayActorError)
        assert_ok(run_pipeline(*args, "--set", f"ray_address={cluster['address']}", env=LOOPBACK_ENV))
        killer.join(timeout=5)
        assert killed, "no teacher unit was committed before the job ended: nothing was killed"
        store = FeatureStore.open(store_url)
        plan = store.plan()
        assert killed["at"] < plan.num_units, "the node was killed after the last unit: not mid-job"
        every = {n["node_id"] for n in cluster["nodes"]}
        assert _nodes_of(store, store.image_commits()) == every, "image units did not run on every node"
        teacher_nodes = _nodes_of(store, store.teacher_commits("vit"))
        assert killed["node"] in teacher_nodes and len(teacher_nodes) >= 2
        assert store.teacher_attrs("vit")["complete"]
        # a command without --ray-address starts a cluster of its own while this one runs on the machine (Ray's
        # default would join the latest cluster started here, and refuse the embedded cluster's CPU count)
        again = run_pipeline(*args, alone=True)
        assert_ok(again)
        assert "0 already committed" not in again.stdout and "resumed" in again.stdout
    a, b = store_arrays(reference), store_arrays(store_url)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    markers = [json.loads(p.read_text()) for p in (Path(store_url) / "teachers/vit/_commits").glob("unit-*.json")]
    assert len(markers) == plan.num_units and all(m["node"] in every for m in markers)
    after = [m for m in markers if m["time"] > killed["time"]]
    assert after, "no teacher unit was written after the kill: the job did not go on without the node"
    assert all(m["node"] != killed["node"] for m in after), "the killed node still wrote units"
