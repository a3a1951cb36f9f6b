"""Memory of the training data path against the store's size, and the cost of replaying plans on resume.

Builds synthetic stores (``tests/synthetic_store.py``: 1x1-token images, one failed in 97, a 4-wide
teacher) of ``--sizes`` images in units of ``--shard-images``, then for each:

* the tracemalloc peak (numpy's buffers included) of opening the store, building the plan stream as the
  trainer does and loading ``--batches`` microbatches through ``StoreBatches``, and the same with the whole
  index read as well (what every training process held before the index was read per unit);
* the replay cost a resumed run pays per image: ``PlanStream.microbatches`` over ``--replay`` images, reading
  the index unit by unit from the store, and from whole arrays in memory (``PlanStream.from_arrays``).

    python benchmarks/index_memory.py [--sizes 10000 1000000] [--shard-images 256 4096] [--work DIR]

Writes ``benchmarks/results/index_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import md_table, write_results  # noqa: E402
from synthetic_store import TEACHER, write_synthetic_store  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.data import PlanStream, StoreBatches  # noqa: E402

CFG = DataConfig(seq_len=64, seqs_per_batch=4, max_images_per_seq=16, workers=0)


def peak(url: str, batches: int, whole: bool) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        dataset = StoreBatches(url, [TEACHER], CFG, patch=16, registers=0, seed=0)
        if whole:
            for r in dataset.reader.readers:
                r.ok, r.grid, r.pixel_offsets, r.token_offsets, r.labels  # noqa: B018 (read on first use)
        plans = PlanStream(dataset.reader.indexes, CFG, registers=0, seed=0).steps(0)
        for _ in range(batches):
            dataset[next(plans)]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def replay_us(plans: PlanStream, images: int) -> float:
    t, n = time.perf_counter(), 0
    for mb in plans.microbatches():
        n += mb.num_images
        if n >= images:
            break
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--shard-images", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--replay", type=int, default=300_000, help="images replayed for the per-image cost")
    ap.add_argument("--work", default=None, help="folder for the stores (kept; reused when there)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="index_memory_"))
    urls = {}
    for s in args.shard_images:
        for n in args.sizes:
            url = work / f"n{n}_s{s}"
            if not (url / "zarr.json").exists():
                t = time.perf_counter()
                write_synthetic_store(str(url), n, shard_images=s, failed_every=97)
                print(f"wrote {url} in {time.perf_counter() - t:.1f} s", flush=True)
            urls[n, s] = str(url)
    peak(next(iter(urls.values())), 2, False)  # imports and first-use caches, outside the measurements
    rows = []
    for (n, s), url in urls.items():
        per_unit, whole = peak(url, args.batches, False), peak(url, args.batches, True)
        ds = StoreBatches(url, [TEACHER], CFG, patch=16, registers=0, seed=0)
        images = min(args.replay, n)
        unit = replay_us(PlanStream(ds.reader.indexes, CFG, registers=0, seed=0), images)
        arrays = replay_us(PlanStream.from_arrays(ds.reader.ok, ds.reader.grid, s, CFG, registers=0, seed=0), images)
        rows.append({"images": n, "shard_images": s, "batches": args.batches,
                     "peak_mb": per_unit / 1e6, "peak_whole_index_mb": whole / 1e6, "replayed": images,
                     "replay_us_per_image": unit, "replay_us_per_image_arrays": arrays})
        print(rows[-1], flush=True)
    table = md_table(["images", "shard_images", "peak MB (per unit)", "peak MB (whole index)", "replay µs/image (per unit)",
                      "replay µs/image (arrays)"],
                     [[r["images"], r["shard_images"], r["peak_mb"], r["peak_whole_index_mb"], r["replay_us_per_image"],
                       r["replay_us_per_image_arrays"]] for r in rows])
    js, md = write_results("index_memory", {"rows": rows, "config": CFG.model_dump()}, table)
    print(table)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
