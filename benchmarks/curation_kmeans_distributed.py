"""Level-1 k-means fit: Ray actors (stages.kmeans_job) vs one process, on the curation_kmeans data.

The pool of ``benchmarks/curation_kmeans.py`` (default 1M x 384 float32 unit rows in zarr, long-tailed
concepts), level 1 only: K centroids fitted on a uniform ``--fit-sample`` (AMoE supp. §12 step ii), spherical,
``--n-iter`` Lloyd iterations from the same random init (k fit rows drawn with the seed), then the fit rows
assigned. Three fits, each in its own fresh process so that peak RSS (ru_maxrss) is its own:

* ``faiss, 1 process``: today's path (faiss ``Kmeans`` from those initial centroids), ``--threads`` threads
  (only with ``--refine-steps 0``: its resampling steps draw their own initial centroids);
* ``Lloyd, 1 process``: the sharded algorithm (curation.sharded_kmeans) with one shard in this process;
* ``Ray, W workers``: the same algorithm, one actor per shard reading its rows from zarr; the driver only
  reduces. Actors get ``threads // W`` faiss threads each. Ray is started (loopback, ``--threads`` CPUs)
  before the clock starts; actor start and shard reads are inside the fit time.

Agreement is measured against ``Lloyd, 1 process`` (the single-process reference): centroids matched by
index (same init), distance relative to the mean centroid norm; share of fit rows with the same label;
relative inertia difference.

    .venv/bin/python benchmarks/curation_kmeans_distributed.py            # full size, 2 workers on 2 cores
    .venv/bin/python benchmarks/curation_kmeans_distributed.py --n 50000 --dim 64 --k 500 --fit-sample 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fit(kind: str, a: argparse.Namespace, work: Path) -> None:
    """One fit in this (fresh) process; writes work/<kind>.npz and work/<kind>.json."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback, before Ray is imported
    import faiss
    import zarr

    from curation.hierarchy import sample_fit_rows
    from curation.kmeans import assign, fit_centroids, take_rows
    from curation.sharded_kmeans import LocalShards, sharded_kmeans_with_resampling

    faiss.omp_set_num_threads(a.threads)
    emb = zarr.open_array(str(work / "emb.zarr"), mode="r")
    rows = sample_fit_rows(emb.shape[0], a.fit_sample, a.seed)
    rows = np.arange(emb.shape[0]) if rows is None else rows
    kw = dict(refine_steps=a.refine_steps, points_per_cluster=a.points_per_cluster, n_iter=a.n_iter,
              spherical=True, seed=a.seed, init="random")
    info: dict = {"rss_after_imports_mb": _rss_mb()}
    cpu0 = _cpu_s()
    t: dict[str, float] = {}
    if kind == "ray":
        import ray

        from stages.kmeans_job import DistributedLevel1Fit

        t0 = time.perf_counter()
        ray.init(num_cpus=a.threads, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
        t["ray_start (not in fit)"] = time.perf_counter() - t0
        job = DistributedLevel1Fit(str(work / "emb.zarr"), a.workers)
        t0 = time.perf_counter()
        res = job(rows, a.k, chunk_rows=a.chunk_rows, gpu=False, strategy="closest", refine_init="fresh", **kw)
        t["read + fit"] = time.perf_counter() - t0
        info["report"] = job.report
        ray.shutdown()
        labels, centroids, inertia = res.labels, res.centroids, res.inertia
    else:
        t0 = time.perf_counter()
        x = take_rows(emb, rows, a.chunk_rows, spherical=True)
        t["read_fit_rows"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if kind == "lloyd":
            res = sharded_kmeans_with_resampling(LocalShards(x, 1, spherical=True, chunk_rows=a.chunk_rows,
                                                             gpu=False), [x.shape[0]], a.k, **kw)
            labels, centroids, inertia = res.labels, res.centroids, res.inertia
        else:  # faiss from the same initial centroids the sharded fit draws (curation.sharded_kmeans)
            init = x[np.random.default_rng([a.seed, 5]).choice(x.shape[0], size=a.k, replace=False)]
            centroids = fit_centroids(x, a.k, n_iter=a.n_iter, spherical=True, seed=a.seed, init_centroids=init,
                                      gpu=False)
            labels, sqdist = assign(x, centroids, spherical=True, chunk_rows=a.chunk_rows, gpu=False)
            inertia = float(sqdist.astype(np.float64).sum())
        t["fit"] = time.perf_counter() - t0
        t["read + fit"] = t["read_fit_rows"] + t["fit"]
    info.update(seconds=t, peak_rss_mb=_rss_mb(), cpu_s=_cpu_s() - cpu0, inertia=inertia)
    np.savez(work / f"{kind}.npz", centroids=centroids, labels=labels)
    (work / f"{kind}.json").write_text(json.dumps(info, default=float))


def _run(kind: str, a: argparse.Namespace, work: Path) -> dict:
    child = mp.get_context("spawn").Process(target=_fit, args=(kind, a, work))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the {kind} fit failed with exit code {child.exitcode}")
    with np.load(work / f"{kind}.npz") as z:
        return {**json.loads((work / f"{kind}.json").read_text()), "centroids": z["centroids"], "labels": z["labels"]}


def agreement(got: dict, ref: dict) -> dict:
    d = np.linalg.norm(got["centroids"].astype(np.float64) - ref["centroids"], axis=1)
    scale = float(np.linalg.norm(ref["centroids"].astype(np.float64), axis=1).mean())
    return {"max_centroid_dist_rel": float(d.max() / scale), "mean_centroid_dist_rel": float(d.mean() / scale),
            "centroids_within_1e-4": float((d / scale < 1e-4).mean()),
            "label_agreement": float((got["labels"] == ref["labels"]).mean()),
            "inertia_rel_diff": float(abs(got["inertia"] - ref["inertia"]) / ref["inertia"])}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.curation_kmeans import write_synthetic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10_000, help="level-1 clusters")
    ap.add_argument("--fit-sample", type=int, default=100_000, help="rows level 1 is fitted on")
    ap.add_argument("--n-iter", type=int, default=10)
    ap.add_argument("--refine-steps", type=int, default=0, help="resampling steps at level 1 (default 0, as Vo et al.)")
    ap.add_argument("--points-per-cluster", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPUs: faiss threads of a single process, Ray's CPUs")
    ap.add_argument("--concepts", type=int, default=2000)
    ap.add_argument("--zipf-a", type=float, default=1.1)
    ap.add_argument("--sigma", type=float, default=0.6)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--workdir", default=None, help="where the zarr array goes (default: a temp dir)")
    ap.add_argument("--name", default="curation_kmeans_distributed", help="results file stem")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="curation_dist_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    load = {"before": os.getloadavg()}
    try:
        t0 = time.perf_counter()
        if not (work / "emb.zarr").exists():
            child = mp.get_context("spawn").Process(target=write_synthetic, args=(
                work / "emb.zarr", a.n, a.dim, a.concepts, a.zipf_a, a.sigma, a.chunk_rows, a.seed))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"data generation failed with exit code {child.exitcode}")
        generate = time.perf_counter() - t0
        # faiss' path has no shared init for the resampling steps' fresh k-means: compared without them only
        runs = {"faiss": _run("faiss", a, work)} if a.refine_steps == 0 else {}
        runs.update(lloyd=_run("lloyd", a, work), ray=_run("ray", a, work))
    finally:
        load["after"] = os.getloadavg()
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    ref = runs["lloyd"]
    names = {"faiss": "faiss, 1 process", "lloyd": "Lloyd, 1 process (reference)", "ray": f"Ray, {a.workers} workers"}
    shard_mb = a.fit_sample * a.dim * 4 / 2**20
    results = {}
    rows = []
    for kind, r in runs.items():
        agree = agreement(r, ref)
        cpu = r["cpu_s"] + sum(r.get("report", {}).get("worker_cpu_s", []))
        results[kind] = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "cpu_s_all_processes": cpu,
                         "rss_after_imports_mb": r["rss_after_imports_mb"], "inertia": r["inertia"],
                         "agreement_vs_lloyd_1_process": agree, **({"workers": r["report"]} if "report" in r else {})}
        workers_rss = r.get("report", {}).get("worker_peak_rss_mb")
        rows.append([names[kind], round(r["seconds"]["read + fit"], 1), round(cpu, 1),
                     f"{r['peak_rss_mb']:.0f}" + (" (driver)" if workers_rss else ""),
                     " / ".join(f"{v:.0f}" for v in workers_rss) if workers_rss else "-",
                     f"{agree['max_centroid_dist_rel']:.1e}", f"{agree['mean_centroid_dist_rel']:.1e}",
                     f"{agree['centroids_within_1e-4']:.4f}", f"{agree['label_agreement']:.5f}", f"{agree['inertia_rel_diff']:.1e}"])
    payload = {"config": vars(a), "seconds_generate": generate, "load_average": load, "fits": results}
    table = "\n\n".join([
        f"### Level-1 k-means fit: {a.k:,} centroids on {a.fit_sample:,} of {a.n:,} x {a.dim} float32 rows in "
        f"zarr ({shard_mb:.0f} MB of fit rows), spherical, {a.n_iter} Lloyd iterations from the same random init, "
        f"{a.refine_steps} resampling steps, {a.threads} CPUs",
        md_table(["fit", "seconds", "CPU seconds", "peak RSS MB", "worker peak RSS MB", "max centroid dist / mean norm",
                  "mean centroid dist / mean norm", "centroids within 1e-4", "same label", "inertia rel. diff"], rows),
        "Seconds: reading the fit rows from zarr + fitting + assigning the fit rows (Ray: actor start and each "
        f"actor's shard read included; Ray's own start, {runs['ray']['seconds']['ray_start (not in fit)']:.1f} s, "
        "not). CPU seconds: user + system of the process from its imports on, plus the workers' (Ray's own "
        "processes not counted); less sensitive than wall time to the other load on the shared cores. Agreement against the Lloyd reference (centroids matched by index: same init). "
        f"Load average before / after: {load['before'][0]:.2f} / {load['after'][0]:.2f} (the 2 cores are shared).",
    ])
    js, md = write_results(a.name, payload, table)
    print(table)
    print(f"wrote {js} and {md}")
    return payload


if __name__ == "__main__":
    main()
