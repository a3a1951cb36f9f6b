"""Bytes on disk and fidelity of each feature codec, per teacher, without training (dense vs sparse features).

    .venv/bin/python benchmarks/codec_bytes.py [--images 300] [--teachers lite0,vit_small]

Each teacher caches the same images (the bundled photos and digits) once per codec through the real job
(`run_cache`); reported per codec: target bytes on disk per token (as `pipeline inspect` counts them), the
ratio to float16, and the cosine of the stored patch and summary vectors to the float32 job's, raw and in
the float32 store's PHI-S space (which the distillation loss compares). EfficientNet-Lite's ReLU6 features
are mostly exact zeros, which float16 + Blosc compress well; a ViT's (the DINOv3 ViT-S/16 architecture,
random init) are dense, as real ViT teachers' are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cache_teachers import TEACHERS, bench_images  # noqa: E402
from benchmarks.codecs import CODECS, _fidelity  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--teachers", default="lite0,vit_small")
    args = ap.parse_args()

    import zarr

    from config import load_config
    from stages.cache import run_cache
    from stages.config import CacheConfig
    from storage.inspect import describe_store

    work = Path(tempfile.mkdtemp(prefix="codec-bytes-"))
    listing = bench_images(work, args.images)
    rows, results = [], {}
    for teacher in args.teachers.split(","):
        spec, random_init = TEACHERS[teacher]
        out = results[teacher] = {}
        for codec in CODECS:
            store = work / f"{teacher}_{codec}"
            cfg = load_config(CacheConfig, None, {"teacher": spec, "name": teacher, "random_init": random_init,
                                                  "codec": codec})
            run_cache(str(listing), str(store), cfg)
            facts = describe_store(str(store))["teachers"][teacher]
            zeros = float((zarr.open_group(str(store), mode="r")[f"teachers/{teacher}/patches"][:] == 0).mean())
            out[codec] = {"bytes_per_token": facts["bytes_per_token"], "patch_zero_share": zeros,
                          **_fidelity(store, work / f"{teacher}_float32", teacher)}
        for codec in CODECS:
            r = out[codec]
            rows.append([teacher, codec, round(r["bytes_per_token"]),
                         f"{r['bytes_per_token'] / out['float16']['bytes_per_token']:.2f}",
                         f"{r['patch_zero_share']:.2f}", f"{r['patches']['cosine_mean']:.5f}",
                         f"{r['patches']['phis_cosine_mean']:.5f}", f"{r['patches']['phis_cosine_min']:.4f}",
                         f"{r['summary']['phis_cosine_min']:.4f}"])
    table = md_table(["teacher", "codec", "bytes/token", "vs float16", "patch zeros", "patch cos mean",
                      "patch cos (PHI-S) mean", "patch cos (PHI-S) min", "summary cos (PHI-S) min"], rows)
    write_results("codec_bytes", {"images": args.images, "results": results}, table)
    print(table)


if __name__ == "__main__":
    main()
