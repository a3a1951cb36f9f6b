"""Hierarchical k-means + balanced sampling on synthetic embeddings stored in a zarr array.

Default: 1M x 384 float32 (a long-tailed mixture of unit-norm Gaussian "concepts", written
chunkwise to disk so the pool is never in memory), 3 levels, level 1 fitted on a uniform
subsample and the pool assigned in chunks (AMoE supp. §12 steps ii-iv). Reports seconds per phase
and peak RSS (ru_maxrss: faiss allocates outside Python, so tracemalloc would miss it).

    .venv/bin/python benchmarks/curation_kmeans.py                 # full size, 2 threads
    .venv/bin/python benchmarks/curation_kmeans.py --n 50000 --dim 64 --levels 500,50,5 --fit-sample 20000 --target 5000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import zarr  # noqa: E402

from benchmarks.common import md_table, write_results  # noqa: E402
from curation.hierarchy import fit_hierarchy  # noqa: E402
from curation.metrics import compare_to_random, curation_metrics  # noqa: E402
from curation.sampling import hierarchical_sample  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def concept_probs(n_concepts: int, zipf_a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n_concepts + 1) ** zipf_a
    return p / p.sum()


def write_synthetic(path: Path, n: int, dim: int, n_concepts: int, zipf_a: float, sigma: float,
                    chunk_rows: int, seed: int, rank: int = 8, eps: float = 0.05) -> None:
    """Unit-norm long-tailed mixture: Zipf(a) concept frequencies; concept c is its centre on the
    sphere plus noise of relative size ``sigma`` in its own random ``rank``-dim subspace plus a
    little isotropic noise ``eps`` (low intrinsic dimension, like real embeddings, so finer
    clusters inside a concept mean something). Written ``chunk_rows`` at a time; concept labels
    go to ``<path>.labels.npy``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_concepts, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = (rng.normal(size=(n_concepts, rank, dim)) / np.sqrt(dim * rank)).astype(np.float32)
    probs = concept_probs(n_concepts, zipf_a)
    z = zarr.create_array(store=str(path), shape=(n, dim), dtype="float32",
                          chunks=(chunk_rows, dim), compressors=None, overwrite=True)
    labels = np.empty(n, dtype=np.int32)
    for i, start in enumerate(range(0, n, chunk_rows)):
        r = np.random.default_rng([seed, i])
        m = min(chunk_rows, n - start)
        lab = r.choice(n_concepts, size=m, p=probs)
        x = centres[lab] + (eps / np.sqrt(dim)) * r.standard_normal((m, dim), dtype=np.float32)
        order = np.argsort(lab, kind="stable")
        cuts = np.flatnonzero(np.diff(lab[order])) + 1
        for rows in np.split(order, cuts):
            coef = r.standard_normal((rows.size, rank), dtype=np.float32)
            x[rows] += sigma * (coef @ bases[lab[rows[0]]])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        z[start : start + m] = x
        labels[start : start + m] = lab
    np.save(f"{path}.labels.npy", labels)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--levels", default="10000,1000,100", help="K per level, finest first")
    ap.add_argument("--fit-sample", type=int, default=100_000, help="rows used to fit level 1")
    ap.add_argument("--target", type=int, default=100_000)
    ap.add_argument("--n-iter", type=int, default=10)
    ap.add_argument("--refine-steps", default="0,10,10", help="resampling steps per level")
    ap.add_argument("--points-per-cluster", default="1,5,5", help="resampled points per cluster")
    ap.add_argument("--init", default="random", choices=["random", "kmeans++"])
    ap.add_argument("--concepts", type=int, default=2000)
    ap.add_argument("--zipf-a", type=float, default=1.1)
    ap.add_argument("--sigma", type=float, default=0.6)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the zarr array goes (default: a temp dir)")
    ap.add_argument("--name", default="curation_kmeans", help="results file stem")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    levels = [int(v) for v in a.levels.split(",")]
    steps = [int(v) for v in a.refine_steps.split(",")]
    ppc = [int(v) for v in a.points_per_cluster.split(",")]
    faiss.omp_set_num_threads(a.threads)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="curation_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    rss: dict[str, float] = {"imports": peak_rss_mb()}
    t: dict[str, float] = {}
    try:
        # generation runs in a child process so that ru_maxrss below measures curation only
        t0 = time.perf_counter()
        child = mp.get_context("spawn").Process(target=write_synthetic, args=(
            work / "emb.zarr", a.n, a.dim, a.concepts, a.zipf_a, a.sigma, a.chunk_rows, a.seed))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"data generation failed with exit code {child.exitcode}")
        t["generate_to_zarr"] = time.perf_counter() - t0
        rss["generate_to_zarr (child process)"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0)
        labels = np.load(f"{work / 'emb.zarr'}.labels.npy")
        emb = zarr.open_array(str(work / "emb.zarr"), mode="r")

        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        h = fit_hierarchy(emb, levels, fit_sample=a.fit_sample, refine_steps=steps,
                          points_per_cluster=ppc, n_iter=a.n_iter, init=a.init, spherical=True,
                          seed=a.seed, chunk_rows=a.chunk_rows, timings=phases)
        t["hierarchy_total"] = time.perf_counter() - t0
        t.update(phases)
        rss["hierarchy"] = peak_rss_mb()

        t0 = time.perf_counter()
        sel = hierarchical_sample(h, a.target, selection="random", seed=a.seed)
        t["sampling"] = time.perf_counter() - t0
        rss["sampling"] = peak_rss_mb()

        t0 = time.perf_counter()
        metrics = curation_metrics(h, sel, seed=a.seed)
        concepts = compare_to_random(labels, sel, seed=a.seed, num_labels=a.concepts)
        t["metrics"] = time.perf_counter() - t0
        rss["peak"] = peak_rss_mb()
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    pool_bytes = a.n * a.dim * 4
    payload = {
        "config": {**vars(a), "levels": levels, "refine_steps": steps, "points_per_cluster": ppc,
                   "spherical": True, "faiss": faiss.__version__},
        "seconds": t, "peak_rss_mb": rss, "pool_float32_mb": pool_bytes / 2**20,
        "concepts": concepts, "per_level": metrics["per_level"],
    }
    phase_rows = [[k, round(v, 2)] for k, v in t.items()]
    rss_rows = [[k, round(v, 1)] for k, v in rss.items()]
    lvl_rows = [[r["level"], r["sizes"]["k"], r["sizes"]["min"], r["sizes"]["median"],
                 r["sizes"]["max"], r["inertia"], r["entropy_pool"], r["entropy_random"],
                 r["entropy_curated"]] for r in metrics["per_level"]]
    table = "\n\n".join([
        f"### Hierarchical k-means, {a.n:,} x {a.dim} float32 in zarr ({pool_bytes / 2**30:.2f} GiB), "
        f"levels {levels}, level 1 fitted on {a.fit_sample:,} rows, {a.n_iter} Lloyd iterations, "
        f"init {a.init}, resampling steps {steps} with {ppc} points/cluster, {a.threads} threads",
        md_table(["phase", "seconds"], phase_rows),
        "Peak RSS (ru_maxrss, MB) of the curation process after each step (monotone); "
        f"the pool itself would be {pool_bytes / 2**20:.0f} MB, the fit rows "
        f"{a.fit_sample * a.dim * 4 / 2**20:.0f} MB:",
        md_table(["after", "peak RSS (MB)"], rss_rows),
        "### Per level (entropy = H/log K over that level's clusters; random = same-size uniform subset)",
        md_table(["level", "K", "min size", "median", "max", "inertia", "H pool", "H random",
                  "H curated"], lvl_rows),
        f"### Ground-truth concepts ({a.concepts}, Zipf a={a.zipf_a}), target {a.target:,}",
        md_table(["", "normalized entropy", "coverage"],
                 [["pool", concepts["entropy_pool"], 1.0],
                  ["random", concepts["entropy_random"], concepts["coverage_random"]],
                  ["curated", concepts["entropy_curated"], concepts["coverage_curated"]]]),
    ])
    js, md = write_results(a.name, payload, table)
    print(table)
    print(f"wrote {js} and {md}")
    return payload


if __name__ == "__main__":
    main()
