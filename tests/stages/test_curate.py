"""`pipeline curate` end to end: manifest, metrics, plots, and cache-teachers reading the manifest."""

from __future__ import annotations

import json

import numpy as np
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from stages.manifest import is_manifest, read_manifest
from stages.sources import list_images
from storage import layout as L
from storage.store import FeatureStore

from cache_helpers import TINY_VIT

CACHE_SMALL = {"min_tokens": 16, "max_tokens": 64, "shard_images": 4, "shard_rows": 96, "chunk_rows": 32,
               "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12, "batch_size": 4, "phis_max_rows": 5000}


def _sets(settings: dict) -> list[str]:
    return sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])


def test_curate_cli_writes_a_manifest_that_cache_teachers_accepts(image_folder, tmp_path, ray_local):
    folder, bad = image_folder
    pool = list_images(folder)
    concepts = tmp_path / "concepts.csv"  # concept = photo index (gray/rgba/... are their own)
    names = [p.source.rsplit("/", 1)[-1] for p in pool]
    concepts.write_text("path,concept\n" + "".join(f"{folder / n},{n.split('_')[0]}\n" for n in names))
    out = tmp_path / "run"
    args = ["curate", str(folder), "--out", str(out), "--embedder", TINY_VIT, "--random-init",
            "--levels", "5,2", "--target", "6", "--selection", "closest", "--concepts", str(concepts),
            *_sets({"min_tokens": 16, "max_tokens": 64, "unit_images": 4})]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "selected" in result.output and "6 of" in result.output and "concepts" in result.output

    # manifest: 6 decodable images of the pool, with their pool row, id and cluster per level
    m = read_manifest(out / "manifest")
    assert m["attrs"]["kind"] == "amoe-curation-manifest" and m["attrs"]["levels"] == [5, 2]
    assert len(m["index"]) == 6 and np.all(np.diff(m["index"]) > 0)
    assert m["clusters"].shape == (6, 2) and m["clusters"].dtype == np.int32
    g = zarr.open_group(str(out), mode="r")
    ok = g["pool/ok"][:]
    assert ok[m["index"]].all()
    assert [str(s) for s in m["source"]] == [str(g["pool/source"][i]) for i in m["index"]]
    assert [str(s) for s in m["ids"]] == [str(g["pool/ids"][i]) for i in m["index"]]
    assert (m["clusters"][:, 0] < 5).all() and (m["clusters"][:, 1] < 2).all()
    hierarchy_parents = np.load(out / "hierarchy.npz")["parents_1"]
    np.testing.assert_array_equal(hierarchy_parents[m["clusters"][:, 0]], m["clusters"][:, 1])

    # metrics.json and plots
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pool"]["num_failed"] == len(bad) + 1 and metrics["n_selected"] == 6
    assert [r["level"] for r in metrics["per_level"]] == [1, 2]
    for row in metrics["per_level"]:
        assert {"sizes", "inertia", "entropy_curated", "entropy_random", "coverage_curated"} <= set(row)
    c = metrics["concepts"]
    assert c["n_selected"] == 6 and 0 <= c["entropy_curated"] <= 1 and c["num_known"] == int(ok.sum())
    for name in ("cluster_sizes", "inertia", "entropy", "concept_entropy"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0

    # the manifest (and the run folder itself) is IMAGES for every stage
    assert is_manifest(out / "manifest") and is_manifest(out) and not is_manifest(folder)
    refs = list_images(out / "manifest")
    assert [r.source for r in refs] == [str(s) for s in m["source"]] == [r.source for r in list_images(out)]
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["cache-teachers", str(out / "manifest"), "--store", str(store),
                                      "--teacher", TINY_VIT, "--random-init", *_sets(CACHE_SMALL)])
    assert result.exit_code == 0, result.output
    s = FeatureStore.open(str(store))
    assert s.image_strings(L.SOURCE) == [str(x) for x in m["source"]]
    assert s.image_strings(L.IDS) == [str(x) for x in m["ids"]]
    assert s.image_array(L.OK)[:].all()

    # rerun with other levels/target: embeddings reused, a new manifest
    result = CliRunner().invoke(app, [*args[:6], "--random-init", "--levels", "4", "--target", "3",
                                      *_sets({"min_tokens": 16, "max_tokens": 64, "unit_images": 4})])
    assert result.exit_code == 0, result.output
    assert "already committed" in result.output
    assert len(read_manifest(out)["index"]) == 3


def test_curate_fit_workers_fits_level_1_with_ray_actors(image_folder, tmp_path, ray_local):
    """``--fit-workers 2``: level 1 is fitted by two actors reading the decodable rows of DIR/embeddings (the
    folder has failed images) and equals the same two-shard fit run in this process on those rows, bit for bit.
    (Not compared with the faiss path here: the random-init embedder puts these images almost on one point, so
    clusters empty out and the split draws, which differ from faiss', decide the result.)"""
    from curation.kmeans import take_rows
    from curation.sharded_kmeans import LocalShards, shard_bounds, sharded_kmeans_with_resampling

    folder, _ = image_folder
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "curate", str(folder), "--out", str(out), "--embedder", TINY_VIT, "--random-init", "--levels", "4,2",
        "--target", "5", "--fit-workers", "2", "--set", "plots=false",
        *_sets({"min_tokens": 16, "max_tokens": 64, "unit_images": 4})])
    assert result.exit_code == 0, result.output
    g = zarr.open_group(str(out), mode="r")
    ok_rows = np.flatnonzero(g["pool/ok"][:])
    assert ok_rows.size < g["pool/ok"].shape[0]  # the actors read through the row map
    x = take_rows(g["embeddings"], ok_rows)
    ref = sharded_kmeans_with_resampling(LocalShards(x, 2), np.diff(shard_bounds(x.shape[0], 2)), 4, refine_steps=0,
                                         points_per_cluster=1, n_iter=50, seed=0, init="kmeans++")
    with np.load(out / "hierarchy.npz") as z:
        np.testing.assert_array_equal(z["centroids_1"], ref.centroids)
        assert "assignments" not in z  # the pool's labels stay in DIR/clusters
    np.testing.assert_array_equal(g["clusters/level1"][:][ok_rows], ref.labels)
    assert (g["clusters/level1"][:][~g["pool/ok"][:]] == -1).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["level1_fit"]["workers"] == 2 and metrics["config"]["fit_workers"] == 2
    assert metrics["level1_fit"]["shard_rows"] == np.diff(shard_bounds(x.shape[0], 2)).tolist()
