"""Memory of each teacher worker over a cache-teachers job: bounded by the unit it holds, not by the job.

    .venv/bin/python benchmarks/worker_memory.py [--images 1818] [--shard-images 64,256] [--workers 2]

The real EfficientNet-Lite0 caches the bundled photos and digits (mixed sizes, 64-256 tokens) into a
fresh store once per unit size, with ``--workers`` actors of one thread each on the embedded Ray
cluster. Per worker: RSS after its first unit, after the warm-up units, after its last, the peak, and the bytes of the largest
unit it held (decoded images + the teacher's float32 outputs), as `pipeline cache-teachers` prints them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cache_teachers import bench_images  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1818)
    ap.add_argument("--shard-images", default="64,256")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from config import load_config
    from stages.cache import run_cache
    from stages.config import CacheConfig

    work = Path(tempfile.mkdtemp(prefix="worker-memory-"))
    listing = bench_images(work, args.images)
    rows, runs = [], []
    for shard_images in (int(s) for s in args.shard_images.split(",")):
        cfg = load_config(CacheConfig, None, {"teacher": "timm:efficientnet_lite0", "name": "lite0",
                                              "shard_images": shard_images, "workers": args.workers, "threads": 1,
                                              "phis": False})
        report = run_cache(str(listing), str(work / f"store_{shard_images}"), cfg)
        for k, (worker, m) in enumerate(sorted(report.workers.items())):
            runs.append({"shard_images": shard_images, "worker": k, "units": m.units, "rss_per_unit": m.rss,
                         "settled_rss": m.settled_rss, "peak_rss": m.peak_rss, "growth": m.growth,
                         "max_unit_bytes": m.max_unit_bytes})
            rows.append([shard_images, k, m.units, f"{m.first_rss / 1e6:.0f}", f"{m.settled_rss / 1e6:.0f}",
                         f"{m.last_rss / 1e6:.0f}",
                         f"{m.growth / 1e6:+.0f}", f"{m.peak_rss / 1e6:.0f}", f"{m.max_unit_bytes / 1e6:.1f}"])
            print(shard_images, m.describe(), flush=True)
    table = md_table(["images per unit", "worker", "units", "RSS after first unit (MB)", "after warm-up (MB)",
                      "after last (MB)", "growth after warm-up (MB)", "peak RSS (MB)", "largest unit held (MB)"], rows)
    write_results("worker_memory", {"images": args.images, "workers": args.workers, "runs": runs}, table)
    print(table)


if __name__ == "__main__":
    main()
