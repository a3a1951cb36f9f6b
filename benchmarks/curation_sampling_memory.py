"""Memory and time of balanced sampling over a pool whose level-1 labels are in zarr, against the pool's size.

For each ``--sizes`` N: level-1 labels (Zipf-distributed over ``--k1`` clusters, as a long-tailed pool) and
squared distances written to zarr in chunks of ``--unit`` rows (as ``DIR/clusters`` of a curation folder),
a two-level tree over them, then the tracemalloc peak (numpy's buffers included) and seconds of

* ``hierarchical_sample_with_labels`` on the zarr-backed tree (cluster sizes in one pass, then the pick in
  another: what ``pipeline curate`` does), and ``curation_metrics`` on it (one more pass);
* the same pick on the same labels loaded whole into memory (what one process needed before), for scale.

    python benchmarks/curation_sampling_memory.py [--sizes 100000 1000000 4000000] [--units 1024 65536]

Writes ``benchmarks/results/curation_sampling_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402
from curation.hierarchy import Hierarchy  # noqa: E402
from curation.metrics import curation_metrics  # noqa: E402
from curation.sampling import hierarchical_sample_with_labels  # noqa: E402


def write_labels(root: Path, n: int, k1: int, unit: int, seed: int):
    import zarr

    g = zarr.open_group(str(root), mode="w")
    lab = g.create_array("level1", shape=(n,), dtype="int32", chunks=(unit,))
    sq = g.create_array("sqdist", shape=(n,), dtype="float32", chunks=(unit,))
    rng = np.random.default_rng(seed)
    step = 1 << 20
    for s in range(0, n, step):
        m = min(step, n - s)
        lab[s:s + m] = np.minimum(rng.zipf(1.3, m) - 1, k1 - 1)
        sq[s:s + m] = rng.random(m, dtype=np.float32)
    return lab, sq


def measure(fn):
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    ap.add_argument("--k1", type=int, default=10_000)
    ap.add_argument("--k2", type=int, default=100)
    ap.add_argument("--target", type=int, default=20_000)
    ap.add_argument("--units", type=int, nargs="+", default=[1024, 65536],
                    help="zarr chunk rows (curate's unit_images): the per-chunk cost of a pass")
    ap.add_argument("--selection", default="random", choices=["random", "closest"])
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    centroids = [rng.normal(size=(a.k1, 4)).astype(np.float32), rng.normal(size=(a.k2, 4)).astype(np.float32)]
    parents = [rng.integers(0, a.k2, a.k1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, unit in [(n, u) for u in a.units for n in a.sizes]:
            lab, sq = write_labels(Path(tmp) / f"labels-{n}-{unit}", n, a.k1, unit, seed=n)
            tree = Hierarchy(centroids, lab, sq, parents, [0.0, 0.0])
            (sel, _), peak_zarr, s_zarr = measure(
                lambda: hierarchical_sample_with_labels(tree, a.target, selection=a.selection, seed=0))
            _, peak_metrics, s_metrics = measure(lambda: curation_metrics(tree, sel, seed=0))

            def whole():
                t = Hierarchy(centroids, lab[:].astype(np.int64), sq[:], parents, [0.0, 0.0])
                return hierarchical_sample_with_labels(t, a.target, selection=a.selection, seed=0)

            (sel_whole, _), peak_whole, s_whole = measure(whole)
            assert np.array_equal(sel, sel_whole), "the unit-by-unit pick differs from the whole-array one"
            rows.append({"n": n, "target": a.target, "k1": a.k1, "unit": unit, "selected": int(sel.size),
                         "peak_mb_sample": peak_zarr / 1e6, "seconds_sample": s_zarr,
                         "peak_mb_metrics": peak_metrics / 1e6, "seconds_metrics": s_metrics,
                         "peak_mb_whole_in_memory": peak_whole / 1e6, "seconds_whole_in_memory": s_whole,
                         "same_selection": True})
            print(rows[-1], flush=True)
    header = ["pool rows", "chunk rows", "K1", "target", "peak MB (per unit)", "s", "metrics peak MB", "metrics s",
              "peak MB (labels in memory)", "s (in memory)", "same pick"]
    table = md_table(header, [[r["n"], r["unit"], r["k1"], r["target"], r["peak_mb_sample"], r["seconds_sample"],
                               r["peak_mb_metrics"], r["seconds_metrics"], r["peak_mb_whole_in_memory"],
                               r["seconds_whole_in_memory"], "yes"] for r in rows])
    js, md = write_results("curation_sampling_memory", {"args": vars(a), "rows": rows}, table)
    print(table)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
