"""Feature codecs on the demo's real data: bytes per token, fidelity to float32 targets, student kNN.

    .venv/bin/python benchmarks/codecs.py [--steps 300] [--codecs float32,float16,bfloat16,int8] [--seeds 0]
        [--noise-seeds 1,2] [--work DIR]

The demo's training images (21 photos + the training digits) are cached with both real teachers
(EfficientNet-Lite0 and Lite2) once per codec through `pipeline cache-teachers --codec`. For each
codec and teacher: targets on disk per token (compressed, what `inspect` reports), the cosine of the
stored summary and patch vectors to the float32 job's (raw, and after the float32 store's PHI-S, which
is what the distillation loss compares), and the kNN top-1 on the held-out digits of a demo student
trained from that store for the same steps with the same seed (`pipeline train`, `pipeline eval`).
Every codec's student is trained with each of ``--seeds``, and the float16 student also with ``--noise-seeds``:
how far kNN moves between seeds on the same targets is the yardstick for the codecs' differences, and the
codecs are compared by their mean over the same seeds. The float32 store is always cached (the fidelity
reference), trained only when ``--codecs`` names it.
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


def _train_eval(store: Path, run: Path, work: Path, eval_store: Path, steps: int, seed: int) -> tuple[dict, float]:
    train_s = _run("train", "--store", str(store), "--out", str(run), "--config", str(work / "train.toml"),
                   "--steps", str(steps), "--set", f"run.seed={seed}")
    _run("eval", str(run), "--store", str(eval_store), "--tasks", "knn", "--device", "cpu")
    return json.loads((run / "eval.json").read_text())["knn"]["top1"], train_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="student training steps per codec")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--codecs", default=",".join(CODECS), help="codecs to cache and train (float32 is always cached)")
    ap.add_argument("--seeds", default="0", help="training seeds of every codec's student")
    ap.add_argument("--noise-seeds", default="1,2", help="further training seeds of the float16 student only")
    args = ap.parse_args()
    from storage.inspect import describe_store

    codecs = [c for c in args.codecs.split(",") if c]
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        ap.error(f"unknown codecs {unknown}; choose from {', '.join(CODECS)}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="codecs-"))
    work.mkdir(parents=True, exist_ok=True)
    _run("data", "demo", str(work / "images"))
    train_list, heldout_list, labels = _lists(work / "images", work)
    eval_store = work / "eval_store"
    _cache(heldout_list, eval_store, labels, "float16")
    (work / "train.toml").write_text(TRAIN_TOML)
    rows, results = [], {}
    for codec in ["float32", *[c for c in codecs if c != "float32"]]:
        store = work / f"store_{codec}"
        cache_s = _cache(train_list, store, labels, codec)
        facts = describe_store(str(store))["teachers"]
        results[codec] = {"cache_s": cache_s, "knn_by_seed": {}, "train_s": {}, "teachers": {}}
        for teacher in TEACHERS:
            fid = _fidelity(store, work / "store_float32", teacher)
            results[codec]["teachers"][teacher] = {"bytes_per_token": facts[teacher]["bytes_per_token"],
                                                   "recorded_fidelity": facts[teacher]["codec_fidelity"], **fid}
        if codec not in codecs:
            continue
        extra = [int(x) for x in args.noise_seeds.split(",") if x.strip()] if codec == "float16" else []
        for seed in dict.fromkeys(seeds + extra):
            knn, train_s = _train_eval(store, work / f"run_{codec}_seed{seed}", work, eval_store, args.steps, seed)
            results[codec]["knn_by_seed"][seed], results[codec]["train_s"][seed] = knn, train_s
        print(codec, json.dumps(results[codec], default=float)[:400], flush=True)

    def mean_over(codec: str, key: str) -> float:  # over --seeds only: the same seeds for every codec
        return float(np.mean([results[codec]["knn_by_seed"][s].get(key, np.nan) for s in seeds]))

    f16_seeds = results["float16"]["knn_by_seed"] if "float16" in codecs else {}
    spread = (max(v["student/cls"] for v in f16_seeds.values()) - min(v["student/cls"] for v in f16_seeds.values())
              if f16_seeds else float("nan"))
    f16 = {t: results["float16"]["teachers"][t]["bytes_per_token"] for t in TEACHERS} if "float16" in results else None
    for codec in [c for c in CODECS if c in results]:
        r = results[codec]
        for teacher in TEACHERS:
            t = r["teachers"][teacher]
            trained = codec in codecs
            rows.append([codec, teacher, round(t["bytes_per_token"]),
                         f"{t['bytes_per_token'] / f16[teacher]:.2f}" if f16 else "",
                         f"{t['patches']['cosine_mean']:.5f}", f"{t['patches']['cosine_min']:.4f}",
                         f"{t['patches']['phis_cosine_mean']:.4f}", f"{t['summary']['cosine_min']:.4f}",
                         " / ".join(f"{r['knn_by_seed'][s]['student/cls']:.3f}" for s in seeds) if trained else "",
                         f"{mean_over(codec, 'student/cls'):.3f}" if trained else "",
                         f"{mean_over(codec, f'student/{teacher}'):.3f}" if trained else ""])
    table = md_table(["codec", "teacher", "bytes/token", "vs float16", "patch cos mean", "patch cos min",
                      "patch cos (PHI-S) mean", "summary cos min", f"student kNN CLS, seeds {seeds}",
                      "mean", "student kNN head (mean)"], rows)
    if f16_seeds:
        table += (f"\n\nfloat16 student kNN (CLS) over training seeds {sorted(f16_seeds)}: "
                  + ", ".join(f"{f16_seeds[k]['student/cls']:.3f}" for k in sorted(f16_seeds))
                  + f" (spread {spread:.3f})\n")
    write_results("codecs", {"steps": args.steps, "work": str(work), "codecs": codecs, "seeds": seeds,
                             "results": results, "float16_seed_spread_cls": spread}, table)
    print(table)


if __name__ == "__main__":
    main()
