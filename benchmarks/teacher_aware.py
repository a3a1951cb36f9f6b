"""Measure the teacher-aware MoE pieces on the demo's real data: dense vs MoE at equal active parameters,
MoE with and without M²oT's TAS, and what the routing analysis sees.

    .venv/bin/python benchmarks/teacher_aware.py [--work DIR] [--steps 300]

Uses the low-resolution stores of ``benchmarks/amoe_recipe.py`` (same ``--work``; built when missing)
and caches the two real teachers' last two feature stages (``--layers 4,5``: EfficientNet-Lite reductions
16 and 32) into them, which computes only the layers. Same student width and depth, packing,
optimizer and seed in every run:

- dense: the ``demo`` student (4 blocks, width 192, MLP 768);
- MoE: M²oT's layout on it (MoE on every other block, 4 experts, top-2, fine-grained so the active
  parameters equal the dense student's);
- MoE + TAS: the same with ``loss.tas = 0.5`` (M²oT Eq. 10).

Reported: the distillation loss (mean of the last 10 logged steps, the TAS and router terms left
out), kNN on held-out digits, and the routing analysis on them (tokens per expert, share that
changed expert over the last 50 steps, best-predicted teacher per expert, mean per-expert CKA
against the teachers' stage 4 and 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.amoe_recipe import TEACHERS, cache_stores, train_run  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402

LAYERS = [4, 5]
MOE = {"layers": "odd", "experts": 4, "top_k": 2, "fine_grained": True}


def add_layers(stores: dict[str, str], work: Path) -> None:
    from config import load_config
    from stages.cache import run_cache
    from stages.config import CacheConfig
    from stages.ray_cluster import ray_cluster

    with ray_cluster(num_cpus=2):
        for split in ("train_lo", "heldout_lo"):
            listing = str(work / ("train.txt" if split.startswith("train") else "heldout.txt"))
            for name, spec in TEACHERS.items():
                cfg = load_config(CacheConfig, None, {"teacher": spec, "name": name, "labels": str(work / "labels.csv"),
                                                      "workers": 1,
                                                      "min_tokens": 16, "max_tokens": 64, "layers": LAYERS})
                run_cache(listing, stores[split], cfg)


def distill_loss(run: Path, last: int = 10) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-last:]
    terms = [sum(v for k, v in r.items() if k.startswith("loss/") and k.count("/") == 2) for r in records]
    return sum(terms) / len(terms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/amoe_recipe"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    t0 = time.perf_counter()
    stores = cache_stores(args.work)
    add_layers(stores, args.work)
    cache_s = time.perf_counter() - t0
    runs = args.work / "teacher_aware"
    lo = [stores["train_lo"]]
    every = {"run": {"checkpoint_every": max(1, args.steps - 50), "keep_checkpoints": 2}}
    out: dict = {"steps": args.steps, "layers_seconds": cache_s, "runs": {}}
    configs = {"dense": {}, "moe": {"model": {"moe": MOE}},
               "moe_tas": {"model": {"moe": MOE}, "loss": {"tas": 0.5}}}
    from eval.evaluate import evaluate_run

    for name, sections in configs.items():
        info = train_run(runs / name, lo, args.steps, **{**every, **sections})
        tasks = ["knn"] + (["routing"] if name != "dense" else [])
        ev = evaluate_run(runs / name, stores["heldout_lo"], tasks, bank=stores["train_lo"], device="cpu")
        out["runs"][name] = {**info, "distill_loss": distill_loss(runs / name), "knn": ev["knn"]["top1"],
                             "routing": ev.get("routing")}
    out["seconds"] = time.perf_counter() - t0
    write_results("teacher_aware", out, tables(out))
    print(tables(out))


def tables(out: dict) -> str:
    from eval.routing import best_teachers

    runs = out["runs"]
    rows = [[name, r["distill_loss"], r["knn"]["student/cls"], *(r["knn"][f"student/{t}"] for t in TEACHERS)]
            for name, r in runs.items()]
    text = [f"### Dense vs MoE vs MoE + TAS ({out['steps']} steps, equal active parameters)", "",
            md_table(["run", "distillation loss (last 10 steps)", "kNN CLS", *(f"kNN {t}" for t in TEACHERS)], rows), ""]
    routing_rows = []
    for name in ("moe", "moe_tas"):
        for block, entry in runs[name]["routing"]["layers"].items():
            best = best_teachers(entry)
            cka = {k: sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v))
                   for k, v in entry["cka"].items()}
            routing_rows.append([name, block, " ".join(map(str, entry["tokens"])), entry.get("stability"),
                                 " ".join(best), ", ".join(f"{k} {v:.2f}" for k, v in sorted(cka.items()))])
    text += ["### Routing on the held-out digits (top-1 experts)", "",
             md_table(["run", "MoE block", "tokens per expert", "changed expert (last 50 steps)",
                       "best-predicted teacher per expert", "mean CKA per teacher layer"], routing_rows)]
    return "\n".join(text)


if __name__ == "__main__":
    main()
