"""Read throughput of the training reader from an S3-compatible server vs the local disk.

    .venv/bin/python benchmarks/store_read.py [--images N] [--teacher vit_small] [--batch 32]

One store is cached per chunk layout (`chunk_rows` of the patch arrays, `pixel_chunk_bytes` of the pixels),
then uploaded object for object to a moto S3 server on 127.0.0.1. The training reader (`read_batch`, one
zarr selection per array per batch, in the training stream's shard-then-buffer shuffled order) then
reads every image once from each copy, the two copies alternating batch by batch so that both see the
same machine load; images/s and the bucket/local ratio are reported.

moto is a Python server on loopback: it has neither S3's per-request latency (tens of ms) nor its
bandwidth, so the figures measure the request pattern's cost through s3fs and zarr (one HTTP range
request per chunk a batch touches), not a real bucket.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.cache_teachers import TEACHERS, bench_images  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402

LAYOUTS = {  # name: (patch chunk rows, patch shard rows, pixel chunk bytes, pixel shard bytes)
    "small chunks": (64, 4096, 1 << 14, 1 << 22),
    "default": (256, 4096, 1 << 18, 1 << 22),
    "large chunks": (1024, 4096, 1 << 20, 1 << 22),
}


def _batches(reader, batch: int, seed: int = 0) -> list[list[int]]:
    from storage.streaming import epoch_stream

    index = reader.index
    stream = epoch_stream(lambda u: np.where(index.unit(u).ok, 0, -1), len(index), index.unit_rows, seed=seed,
                          buffer=4 * batch)
    rows = [next(stream)[1] for _ in range(int(reader.ok.sum()))]
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--teacher", default="vit_small", choices=sorted(TEACHERS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the images per copy (best is kept)")
    args = ap.parse_args()

    from s3_server import patched_environ, s3_server

    from stages.cache import run_cache
    from stages.config import CacheConfig
    from stages.ray_cluster import ray_cluster
    from storage.reader import StoreReader, read_batch

    spec, random_init = TEACHERS[args.teacher]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, s3_server("bench") as env, ray_cluster(num_cpus=os.cpu_count()):
        listing = bench_images(Path(tmp), args.images)
        for layout, (chunk_rows, shard_rows, pix_chunk, pix_shard) in LAYOUTS.items():
            local = str(Path(tmp) / layout.replace(" ", "_"))
            cfg = CacheConfig(teacher=spec, name="t", random_init=random_init, max_tokens=args.max_tokens,
                              shard_images=64, chunk_rows=chunk_rows, shard_rows=shard_rows,
                              pixel_chunk_bytes=pix_chunk, pixel_shard_bytes=pix_shard)
            run_cache(str(listing), local, cfg)
            with patched_environ(env):
                import fsspec

                s3 = fsspec.filesystem("s3", skip_instance_cache=True)
                bucket = f"bench/{layout.replace(' ', '_')}"
                s3.put(local, bucket, recursive=True)
                readers = {"local": StoreReader(local), "bucket": StoreReader(f"s3://{bucket}")}
                batches = _batches(readers["local"], args.batch)
                seconds = {k: [] for k in readers}
                for _ in range(args.repeats):
                    spent = {k: 0.0 for k in readers}
                    for b in batches:  # alternating: both copies see the same machine load
                        for k, reader in readers.items():
                            t0 = time.perf_counter()
                            got = read_batch(reader, b)
                            spent[k] += time.perf_counter() - t0
                            assert len(got) == len(b)
                    for k in readers:
                        seconds[k].append(spent[k])
                a, b_ = readers["local"].read(batches[0][0]), readers["bucket"].read(batches[0][0])
                assert np.array_equal(a.patches["t"], b_.patches["t"])  # the same bytes from both
            n = sum(len(b) for b in batches)
            best = {k: min(v) for k, v in seconds.items()}
            tokens = int(readers["local"].store.token_offsets()[-1])
            dim = int(readers["local"].store.teacher_group("t")["patches"].shape[1])
            from storage.fsutil import du, filesystem

            fs, root = filesystem(local)
            mb = du(fs, root) / 1e6
            rows.append({"layout": layout, "patch_chunk_rows": chunk_rows, "pixel_chunk_bytes": pix_chunk,
                         "images": n, "tokens": tokens, "dim": dim, "store_MB": mb,
                         "local_images_per_s": n / best["local"], "bucket_images_per_s": n / best["bucket"],
                         "bucket_over_local_time": best["bucket"] / best["local"]})
            print(rows[-1], flush=True)
    table = md_table(["layout", "patch chunk rows", "pixel chunk KiB", "local images/s", "bucket images/s",
                      "bucket time / local"],
                     [[r["layout"], r["patch_chunk_rows"], r["pixel_chunk_bytes"] // 1024, r["local_images_per_s"],
                       r["bucket_images_per_s"], r["bucket_over_local_time"]] for r in rows])
    js, md = write_results("store_read", {"args": vars(args), "teacher": spec, "rows": rows}, table)
    print(table)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
