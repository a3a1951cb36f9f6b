"""The pool's assignment to level-1 centroids as units on Ray actors (stages.assign_job): labels in zarr equal a
float64 nearest-centroid reference, -1 where an image failed; a rerun skips committed units, other centroids
start over, and a crash between a unit's labels and its marker is finished by the rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from cli_helpers import shared_ray
from stages.assign_job import ASSIGN_COMMITS, CLUSTERS, PoolAssignment, centroids_digest
from stages.embed import EMBEDDINGS, POOL, RUN_KIND
from storage.commits import CommitLog

N, D, UNIT = 53, 8, 8


def _run_folder(path, seed=0):
    """A curation run folder as the embedding job leaves it: embeddings chunked by unit, a few rows not ok."""
    rng = np.random.default_rng(seed)
    g = zarr.create_group(str(path), attributes={"kind": RUN_KIND})
    x = rng.normal(size=(N, D)).astype(np.float32)
    ok = np.ones(N, bool)
    ok[[3, 17, 18, 40]] = False
    x[~ok] = 0
    g.create_array(EMBEDDINGS, shape=(N, D), dtype="float32", chunks=(UNIT, D))[:] = x
    g.require_group(POOL).create_array("ok", shape=(N,), dtype=bool, chunks=(UNIT,))[:] = ok
    return x, ok


def nearest_float64(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: squared distances to every centroid in float64, the argmin."""
    d = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def _check(path, x, ok, centroids):
    g = zarr.open_group(str(path), mode="r")
    labels, sqdist = g[f"{CLUSTERS}/level1"][:], g[f"{CLUSTERS}/sqdist"][:]
    ref_l, ref_d = nearest_float64(x[ok], centroids)
    np.testing.assert_array_equal(labels[ok], ref_l)
    np.testing.assert_allclose(sqdist[ok], ref_d, rtol=1e-4, atol=1e-4)
    assert (labels[~ok] == -1).all() and (sqdist[~ok] == 0).all()
    assert labels.dtype == np.int32 and g.attrs[CLUSTERS] == centroids_digest(centroids, False)
    np.testing.assert_array_equal(g[f"{CLUSTERS}/centroids"][:], centroids)  # the labels' centroids, kept with them


def test_the_pool_is_labelled_unit_by_unit_by_actors_and_a_rerun_skips_or_starts_over(tmp_path):
    shared_ray()
    x, ok = _run_folder(tmp_path / "run")
    c = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
    seen = []
    job = PoolAssignment(str(tmp_path / "run"), UNIT, workers=2, on_progress=lambda *a: seen.append(a))
    labels, sqdist = job(c)
    assert isinstance(labels, zarr.Array) and labels.chunks == (UNIT,)
    _check(tmp_path / "run", x, ok, c)
    units = -(-N // UNIT)
    log = CommitLog(str(tmp_path / "run"), ASSIGN_COMMITS)
    assert log.committed() == set(range(units))
    assert sum(log.info(u)["points"] for u in range(units)) == ok.sum() and log.info(0)["node"]
    assert job.report["units_skipped"] == 0 and job.report["workers"] == 2 and seen[-1] == ("assign", units, units)

    again = PoolAssignment(str(tmp_path / "run"), UNIT)
    again(c)
    assert again.report["units_skipped"] == units and again.report["workers"] == 0

    other = c[::-1].copy()  # the same points, other numbering: every label changes
    fresh = PoolAssignment(str(tmp_path / "run"), UNIT)
    fresh(other)
    assert fresh.report["units_skipped"] == 0
    _check(tmp_path / "run", x, ok, other)

    # another run's centroids written over the folder's (attrs untouched): an actor refuses them, the labels
    # of the units left to do are never computed from centroids other than those the folder names
    g = zarr.open_group(str(tmp_path / "run"), mode="r+")
    g[f"{CLUSTERS}/centroids"][:] = c
    CommitLog(str(tmp_path / "run"), ASSIGN_COMMITS).uncommit(2)
    with pytest.raises(Exception, match="not the centroids this assignment was started with"):
        PoolAssignment(str(tmp_path / "run"), UNIT)(other)


def test_a_crash_between_a_units_labels_and_its_marker_is_finished_by_the_rerun(tmp_path):
    """AMOE_FAULT=commit.before@2 kills the command's whole process group when an actor is about to commit its
    second unit (a power cut: the Ray cluster and its actors die too); the rerun assigns only what is missing."""
    x, ok = _run_folder(tmp_path / "run")
    c = np.random.default_rng(2).normal(size=(6, D)).astype(np.float32)
    np.save(tmp_path / "c.npy", c)
    script = textwrap.dedent(f"""
        import json, numpy as np
        from stages.assign_job import PoolAssignment
        from stages.ray_cluster import ray_cluster
        with ray_cluster(None, 2):
            job = PoolAssignment({str(tmp_path / "run")!r}, {UNIT}, workers=2)
            job(np.load({str(tmp_path / "c.npy")!r}))
        print(json.dumps(job.report))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(fault=None):
        e = {**env, "AMOE_FAULT": fault} if fault else env
        return subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=300,
                              start_new_session=True)

    crashed = run("commit.before@2")
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr
    done = CommitLog(str(tmp_path / "run"), ASSIGN_COMMITS).committed()
    units = -(-N // UNIT)
    assert 0 < len(done) < units, done  # killed mid-job, some units committed
    finished = run()
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report["units_skipped"] == len(done)
    _check(tmp_path / "run", x, ok, c)


def test_a_folder_without_embeddings_is_refused(tmp_path):
    shared_ray()
    zarr.create_group(str(tmp_path / "run"), attributes={"kind": RUN_KIND})
    with pytest.raises(ValueError, match="no embeddings"):
        PoolAssignment(str(tmp_path / "run"), UNIT)(np.zeros((2, D), np.float32))


def test_a_crash_while_other_centroids_are_written_leaves_a_folder_any_rerun_finishes(tmp_path, monkeypatch):
    """Run A completes; run B (other centroids) dies right after writing its centroids, before naming them in
    the attrs (a named crash point: the write raises). Rerunning A must not find A's name over B's centroids
    (every actor would refuse them, forever): it starts over and equals its reference; so does B."""
    import stages.assign_job as job

    shared_ray()
    x, ok = _run_folder(tmp_path / "run")
    a = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
    b = np.random.default_rng(2).normal(size=(6, D)).astype(np.float32)
    PoolAssignment(str(tmp_path / "run"), UNIT)(a)
    written = job._write_centroids

    def dies_after_writing(clusters, centroids):
        written(clusters, centroids)
        raise KeyboardInterrupt("crash after the centroids, before the attrs")

    monkeypatch.setattr(job, "_write_centroids", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        PoolAssignment(str(tmp_path / "run"), UNIT)(b)
    monkeypatch.setattr(job, "_write_centroids", written)
    rerun = PoolAssignment(str(tmp_path / "run"), UNIT)
    rerun(a)
    assert rerun.report["units_skipped"] == 0
    _check(tmp_path / "run", x, ok, a)
    PoolAssignment(str(tmp_path / "run"), UNIT)(b)
    _check(tmp_path / "run", x, ok, b)
