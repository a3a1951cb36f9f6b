"""Feature codecs on the demo's real data: bytes per token, fidelity to float32 targets, student kNN.

    .venv/bin/python benchmarks/codecs.py [--steps 300] [--work DIR]

The demo's training images (21 photos + the training digits) are cached with both real teachers
(EfficientNet-Lite0 and Lite2) once per codec through `pipeline cache-teachers --codec`. For each
codec and teacher: targets on disk per token (compressed, what `inspect` reports), the cosine of the
stored summary and patch vectors to the float32 job's (raw, and after the float32 store's PHI-S, which
is what the distillation loss compares), and the kNN top-1 on the held-out digits of a demo student
trained from that store for the same steps with the same seed (`pipeline train`, `pipeline eval`).
The float16 student is also trained with ``--noise-seeds`` other seeds: how far kNN moves between seeds on
the same targets is the yardstick for the codecs' differences (one 300-step run per codec cannot resolve
less).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402

CODECS = ("float32", "float16", "bfloat16", "int8")
TEACHERS = {"lite0": "timm:efficientnet_lite0", "lite2": "timm:efficientnet_lite2"}
# the demo student's training settings (pipeline/commands/demo.py DEMO_TRAIN), fewer steps
TRAIN_TOML = """[model]
preset = "demo"
[data]
seq_len = 512
seqs_per_batch = 2
max_images_per_seq = 24
workers = 1
[optim]
lr = 1e-3
warmup_steps = 30
min_lr_ratio = 0.05
[run]
log_every = 50
checkpoint_every = 1000
threads = 2
seed = 0
"""
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def _run(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([PIPELINE, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _lists(images: Path, work: Path) -> tuple[Path, Path, Path]:
    """Training list (photos + training digits), held-out digits, labels CSV with absolute paths."""
    rows = list(csv.DictReader(open(images / "digits" / "labels.csv")))
    labels, train, heldout = work / "labels.csv", [], []
    with open(labels, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label"])
        for row in rows:
            path = (images / row["path"]).resolve()
            out.writerow([str(path), row["label"]])
            (train if row["split"] == "train" else heldout).append(str(path))
    photos = sorted(str(p.resolve()) for p in (images / "photos").iterdir() if p.is_file())
    (work / "train.txt").write_text("\n".join(photos + train) + "\n")
    (work / "heldout.txt").write_text("\n".join(heldout) + "\n")
    return work / "train.txt", work / "heldout.txt", labels


def _cache(listing: Path, store: Path, labels: Path, codec: str) -> float:
    seconds = 0.0
    for name, spec in TEACHERS.items():
        seconds += _run("cache-teachers", str(listing), "--store", str(store), "--teacher", spec, "--name", name,
                        "--labels", str(labels), "--min-tokens", "16", "--codec", codec)
    return seconds


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got, want = got.astype(np.float64), want.astype(np.float64)
    keep = np.linalg.norm(want, axis=1) > 0
    return ((got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)).clip(1e-300))[keep]


def _fidelity(store: Path, reference: Path, teacher: str) -> dict:
    import zarr

    got = zarr.open_group(str(store), mode="r")[f"teachers/{teacher}"]
    want = zarr.open_group(str(reference), mode="r")[f"teachers/{teacher}"]
    out = {}
    for feature in ("summary", "patches"):
        a, b = got[feature][:], want[feature][:]
        with np.load(reference / "teachers" / teacher / "phis" / f"{feature}.npz") as phis:
            mean, whiten = phis["mean"], phis["whiten"]
        raw, phis_space = _cosines(a, b), _cosines((a - mean) @ whiten.T, (b - mean) @ whiten.T)
        out[feature] = {"cosine_mean": float(raw.mean()), "cosine_min": float(raw.min()),
                        "phis_cosine_mean": float(phis_space.mean()), "phis_cosine_min": float(phis_space.min())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="student training steps per codec")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--noise-seeds", default="1,2", help="other training seeds of the float16 student")
    args = ap.parse_args()
    from storage.inspect import describe_store

    work = args.work or Path(tempfile.mkdtemp(prefix="codecs-"))
    work.mkdir(parents=True, exist_ok=True)
    _run("data", "demo", str(work / "images"))
    train_list, heldout_list, labels = _lists(work / "images", work)
    eval_store = work / "eval_store"
    _cache(heldout_list, eval_store, labels, "float16")
    (work / "train.toml").write_text(TRAIN_TOML)
    rows, results = [], {}
    for codec in CODECS:
        store = work / f"store_{codec}"
        cache_s = _cache(train_list, store, labels, codec)
        facts = describe_store(str(store))["teachers"]
        run = work / f"run_{codec}"
        train_s = _run("train", "--store", str(store), "--out", str(run), "--config", str(work / "train.toml"),
                       "--steps", str(args.steps))
        _run("eval", str(run), "--store", str(eval_store), "--tasks", "knn", "--device", "cpu")
        knn = json.loads((run / "eval.json").read_text())["knn"]["top1"]
        results[codec] = {"cache_s": cache_s, "train_s": train_s, "knn_top1": knn, "teachers": {}}
        for teacher in TEACHERS:
            fid = _fidelity(store, work / "store_float32", teacher)
            results[codec]["teachers"][teacher] = {"bytes_per_token": facts[teacher]["bytes_per_token"],
                                                   "recorded_fidelity": facts[teacher]["codec_fidelity"], **fid}
        print(codec, json.dumps(results[codec], default=float)[:400], flush=True)
    seeds = {0: results["float16"]["knn_top1"]}
    for seed in (int(x) for x in args.noise_seeds.split(",") if x.strip()):
        run = work / f"run_float16_seed{seed}"
        _run("train", "--store", str(work / "store_float16"), "--out", str(run), "--config", str(work / "train.toml"),
             "--steps", str(args.steps), "--set", f"run.seed={seed}")
        _run("eval", str(run), "--store", str(eval_store), "--tasks", "knn", "--device", "cpu")
        seeds[seed] = json.loads((run / "eval.json").read_text())["knn"]["top1"]
    spread = {key: max(v[key] for v in seeds.values()) - min(v[key] for v in seeds.values())
              for key in seeds[0] if key.startswith("student/")}
    print("float16 student kNN by seed:", json.dumps(seeds), "spread:", json.dumps(spread), flush=True)
    f16 = {t: results["float16"]["teachers"][t]["bytes_per_token"] for t in TEACHERS}
    for codec in CODECS:
        r = results[codec]
        for teacher in TEACHERS:
            t = r["teachers"][teacher]
            rows.append([codec, teacher, round(t["bytes_per_token"]), f"{t['bytes_per_token'] / f16[teacher]:.2f}",
                         f"{t['patches']['cosine_mean']:.5f}", f"{t['patches']['cosine_min']:.4f}",
                         f"{t['patches']['phis_cosine_mean']:.4f}", f"{t['summary']['cosine_min']:.4f}",
                         f"{r['knn_top1']['student/cls']:.3f}", f"{r['knn_top1'].get(f'student/{teacher}', float('nan')):.3f}"])
    table = md_table(["codec", "teacher", "bytes/token", "vs float16", "patch cos mean", "patch cos min",
                      "patch cos (PHI-S) mean", "summary cos min", "student kNN CLS", "student kNN head"], rows)
    table += (f"\n\nfloat16 student kNN over training seeds {sorted(seeds)}: CLS "
              + ", ".join(f"{seeds[k]['student/cls']:.3f}" for k in sorted(seeds))
              + f" (spread {spread['student/cls']:.3f})\n")
    write_results("codecs", {"steps": args.steps, "work": str(work), "results": results, "float16_seeds": seeds,
                             "seed_spread": spread}, table)
    print(table)


if __name__ == "__main__":
    main()
