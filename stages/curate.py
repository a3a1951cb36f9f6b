"""`pipeline curate`: embed a pool, cluster it hierarchically, sample it balanced, write the manifest.

embed (``stages.embed``, Ray, resumable) -> hierarchical k-means on ``fit_sample`` rows (level 1 in
this process, or with ``fit_workers`` > 1 by Ray actors: ``stages.kmeans_job``) -> the whole pool
assigned to the final level-1 centroids as units on the Ray pool, labels written to
``DIR/clusters`` (``stages.assign_job``, resumable) -> hierarchical balanced sampling reading those
labels a unit at a time (``curation.sampling``) -> ``DIR/manifest`` (``stages.manifest``),
``DIR/metrics.json``, ``DIR/hierarchy.npz`` (the tree) and ``DIR/plots/*.png``. Images that failed
to decode are left out of the clustering (label -1; they are listed in ``DIR/pool/failures``); neither
the embedding matrix nor the pool's labels are ever loaded whole. One Ray cluster serves every job.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from storage.fsutil import atomic_write, filesystem, join, local_or_url, zarr_options

from .assign_job import PoolAssignment
from .embed import EMBEDDINGS, POOL, EmbedReport, run_embed
from .manifest import MANIFEST, write_manifest
from .ok_rows import OkRowMap, OkRows
from .placement import place_job
from .ray_cluster import ray_cluster
from .sources import list_images, read_source_table

if TYPE_CHECKING:
    from .config import CurateConfig

__all__ = ["CurateReport", "read_concepts", "run_curate"]


def read_concepts(path: str | Path, sources: list[str]) -> tuple[np.ndarray, list[str]]:
    """A CSV with ``path`` and ``concept`` (or ``label``) columns -> (code per source, -1 where the
    CSV does not list it; concept names). Paths are relative to the CSV's folder."""
    values = read_source_table(path, sources, ("concept", "label"), "concepts")
    names = sorted({v for v in values if v is not None})
    code = {c: i for i, c in enumerate(names)}
    return np.array([code.get(v, -1) if v is not None else -1 for v in values], np.int64), names


@dataclass
class CurateReport:
    out: str
    embed: EmbedReport
    num_ok: int = 0
    num_selected: int = 0
    levels: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _check_sizes(cfg: CurateConfig, n: int, what: str) -> None:
    if cfg.target > n:
        raise ValueError(f"--target {cfg.target} exceeds the pool: {n} {what}")
    n_fit = n if cfg.fit_sample is None else min(cfg.fit_sample, n)
    if cfg.levels[0] > n_fit:
        raise ValueError(f"level 1 asks for {cfg.levels[0]} clusters but only {n_fit} {what} are fitted "
                         "(--fit-sample / pool size): lower K1")


def _concept_metrics(codes: np.ndarray, names: list[str], ok_rows: np.ndarray, selected_rows: np.ndarray,
                     seed: int) -> dict[str, Any]:
    """Entropy and coverage of concepts: curated vs a random subset of equal size, over the ok images
    whose concept is known."""
    from curation.metrics import compare_to_random, random_subset

    known = ok_rows[codes[ok_rows] >= 0]
    if known.size == 0:
        raise ValueError("no image of the pool is listed in the concepts file (paths must match)")
    labels = codes[known]
    sel = np.flatnonzero(np.isin(known, selected_rows))
    present = np.unique(codes[ok_rows][codes[ok_rows] >= 0])
    num = len(names)
    cmp = compare_to_random(labels, sel, seed=seed, num_labels=num)
    rand = random_subset(labels.size, sel.size, seed)  # as in compare_to_random
    per = {names[c]: {"pool": int((labels == c).sum()), "curated": int((labels[sel] == c).sum()),
                      "random": int((labels[rand] == c).sum())} for c in range(num)}
    return {**cmp, "num_known": int(known.size), "num_concepts_in_pool": int(present.size),
            "per_concept": per}


def run_curate(images: str, out: str, cfg: CurateConfig, *,
               on_progress: Callable[[str, int, int], None] | None = None) -> CurateReport:
    progress = on_progress or (lambda *a: None)
    refs = list_images(images)
    _check_sizes(cfg, len(refs), "images")  # before any work
    concepts = read_concepts(cfg.concepts, [r.source for r in refs]) if cfg.concepts else None
    place_job(cfg)  # a device or replica request the machine cannot serve is refused before a cluster starts
    with ray_cluster(cfg.ray_address, cfg.num_cpus):  # one cluster for the embedding, fit and assignment jobs
        return _curate(refs, local_or_url(out), cfg, concepts, progress)


def _write_files(out: str, files: dict[str, bytes]) -> None:
    """Small result files of the run folder (a path or fsspec URL), each written whole (``atomic_write``)."""
    fs, root = filesystem(out)
    for name, data in files.items():
        atomic_write(fs, join(root, name), data)


def _plots(result: Any, concepts: dict | None, out: str) -> list[str]:
    """The figures, drawn in a local scratch folder (matplotlib writes files) and copied into ``out/plots``."""
    from curation.plots import plot_curation, plot_entropy

    with tempfile.TemporaryDirectory() as tmp:
        paths = plot_curation(result, tmp)
        if concepts is not None:
            paths.append(plot_entropy([{"set": "concepts", **concepts}], Path(tmp) / "concept_entropy.png",
                                      key="set"))
        _write_files(out, {f"plots/{p.name}": p.read_bytes() for p in paths})
    return [join(out, "plots", p.name) for p in paths]


def _curate(refs: list, out: str, cfg: CurateConfig, concepts: tuple | None,
            progress: Callable[[str, int, int], None]) -> CurateReport:
    import zarr

    from curation.sampling import curate_embeddings

    embed = run_embed(refs, out, cfg, on_progress=progress)
    report = CurateReport(out, embed, levels=list(cfg.levels))
    group = zarr.open_group(out, mode="r+", **zarr_options(out))
    ok = group[f"{POOL}/ok"]
    ok_rows = OkRowMap(ok)  # rank among the decodable images -> pool row, 8 B per million pool rows
    num_pool, report.num_ok = int(ok.shape[0]), len(ok_rows)
    _check_sizes(cfg, report.num_ok, "decodable images")
    emb = group[EMBEDDINGS]
    data = emb if ok_rows.all_ok else OkRows(emb, ok_rows)

    progress("cluster + sample", 0, 1)
    t = time.perf_counter()
    level1_fit = None
    if cfg.fit_workers > 1:  # level 1 fitted by Ray actors that read their shards from DIR/embeddings
        from .kmeans_job import DistributedLevel1Fit

        level1_fit = DistributedLevel1Fit(join(out, EMBEDDINGS), cfg.fit_workers,
                                          row_map=None if ok_rows.all_ok else ok_rows,
                                          ray_address=cfg.ray_address, num_cpus=cfg.num_cpus)
    # the pool's labels are written to DIR/clusters by pool rows: the selection comes back as pool rows
    pool_assign = PoolAssignment(out, cfg.unit_images, on_progress=progress)
    result = curate_embeddings(
        data, list(cfg.levels), cfg.target, fit_sample=cfg.fit_sample, refine_steps=cfg.refine_steps,
        points_per_cluster=cfg.points_per_cluster, selection=cfg.selection, n_iter=cfg.n_iter, init=cfg.init,
        spherical=cfg.spherical, seed=cfg.seed, chunk_rows=cfg.chunk_rows, gpu=cfg.gpu, level1_fit=level1_fit,
        pool_assign=pool_assign)
    if level1_fit is not None:
        result.metrics["level1_fit"] = level1_fit.report
    result.metrics["pool_assignment"] = pool_assign.report
    report.seconds["curate"] = time.perf_counter() - t
    progress("cluster + sample", 1, 1)
    h, rows = result.hierarchy, result.selected_indices  # pool rows of the selected images, ascending
    report.num_selected = int(rows.size)

    t = time.perf_counter()
    tree = io.BytesIO()
    h.save(tree)  # the tree; the pool's labels stay in DIR/clusters
    _write_files(out, {"hierarchy.npz": tree.getvalue()})
    clusters = np.stack([h.cluster_map(lvl)[result.selected_labels] for lvl in range(1, h.n_levels + 1)], axis=1)
    pool = group[POOL]
    write_manifest(join(out, MANIFEST), ids=pool["ids"].get_orthogonal_selection(rows),
                   sources=pool["source"].get_orthogonal_selection(rows), index=rows, clusters=clusters,
                   attrs={"levels": h.levels, "target": cfg.target, "selection": cfg.selection, "seed": cfg.seed,
                          "embedder": cfg.embedder, "num_pool": num_pool, "num_pool_ok": report.num_ok})
    metrics: dict[str, Any] = {
        "pool": {"num_images": num_pool, "num_ok": report.num_ok, "num_failed": embed.num_failed,
                 "failure_reasons": embed.failure_reasons},
        **result.metrics,
    }
    if concepts is not None:
        metrics["concepts"] = _concept_metrics(concepts[0], concepts[1], np.flatnonzero(ok[:]), rows, cfg.seed)
    files = {"manifest": join(out, MANIFEST), "hierarchy": join(out, "hierarchy.npz"),
             "metrics": join(out, "metrics.json")}
    if cfg.plots:
        files["plots"] = ", ".join(_plots(result, metrics.get("concepts"), out))
    report.seconds["write"] = time.perf_counter() - t
    metrics["timings_s"] = {**embed.seconds, **metrics.get("timings_s", {}), **report.seconds}
    metrics["config"] = cfg.model_dump(mode="json")
    _write_files(out, {"metrics.json": json.dumps(metrics, indent=2, default=float).encode()})
    report.metrics, report.files = metrics, files
    return report
