"""Measure the teacher-aware MoE pieces on the demo's real data: dense vs MoE at equal active parameters,
MoE with and without M²oT's TAS, plain routing vs TGR-MoE, and what the routing analysis sees.

    .venv/bin/python benchmarks/teacher_aware.py [--work DIR] [--steps 300]

Uses the low-resolution stores of ``benchmarks/amoe_recipe.py`` (same ``--work``; built when missing)
and caches the two real teachers' last two feature stages (``--layers 4,5``: EfficientNet-Lite reductions
16 and 32) into them, which computes only the layers. Same student width and depth, packing,
optimizer and seed in every run:

- dense: the ``demo`` student (4 blocks, width 192, MLP 768);
- MoE: M²oT's layout on it (MoE on every other block, 4 experts, top-2, fine-grained so the active
  parameters equal the dense student's);
- MoE + TAS: the same with ``loss.tas = 0.5`` (M²oT Eq. 10);
- MoE + TGR: the same with ``model.moe.guide = "tgr"`` (TGR-MoE's defaults: teacher routers on lite0's
  cached stages 4 and 5 for MoE blocks 1 and 3, λ_distill 5, λ_load and λ_ent 0.005, teacher-router
  noise 1.0), and its upper bound (``model.moe.tgr.routes = "teacher"``; evaluated, as any run, with
  the student router routing).

Reported: the distillation loss (mean of the first 50 steps' logged records, and of the last 10; the
TAS, router and guide terms left out), kNN on held-out digits, the routing entropies logged in the
last 10 records, and the routing analysis on the held-out digits (tokens per expert, the share that
changed expert between consecutive checkpoints 50 steps apart, best-predicted teacher per expert,
mean per-expert CKA against the teachers' stage 4 and 5).
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


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def distill_loss(run: Path, last: int = 10, before: int | None = None) -> float:
    """Mean distillation loss (the teachers' terms only) of the last ``last`` records, or of those before step ``before``."""
    records = _records(run)
    records = [r for r in records if r["step"] < before] if before is not None else records[-last:]
    terms = [sum(v for k, v in r.items() if k.startswith("loss/") and k.count("/") == 2) for r in records]
    return sum(terms) / len(terms)


def logged_means(run: Path, keys: tuple[str, ...], last: int = 10) -> dict[str, float]:
    """Per MoE block, the mean of each logged ``moe/<i>/<key>`` over the last ``last`` records."""
    records = _records(run)[-last:]
    names = sorted({k for r in records for k in r if k.startswith("moe/") and k.split("/")[2] in keys})
    return {k: sum(r[k] for r in records) / len(records) for k in names}


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
    every = {"run": {"checkpoint_every": 50, "keep_checkpoints": max(2, args.steps // 50)}}
    out: dict = {"steps": args.steps, "layers_seconds": cache_s, "runs": {}}
    configs = {"dense": {}, "moe": {"model": {"moe": MOE}},
               "moe_tas": {"model": {"moe": MOE}, "loss": {"tas": 0.5}},
               "moe_tgr": {"model": {"moe": {**MOE, "guide": "tgr"}}},
               "moe_tgr_upper": {"model": {"moe": {**MOE, "guide": "tgr", "tgr": {"routes": "teacher"}}}}}
    from eval.evaluate import evaluate_run

    for name, sections in configs.items():
        info = train_run(runs / name, lo, args.steps, **{**every, **sections})
        tasks = ["knn"] + (["routing"] if name != "dense" else [])
        ev = evaluate_run(runs / name, stores["heldout_lo"], tasks, bank=stores["train_lo"], device="cpu")
        out["runs"][name] = {**info, "distill_loss": distill_loss(runs / name),
                             "early_distill_loss": distill_loss(runs / name, before=50), "knn": ev["knn"]["top1"],
                             "routing": ev.get("routing"),
                             "logged": logged_means(runs / name, ("expert_usage_entropy", "token_routing_entropy",
                                                                  "guide_agreement"))}
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
                       "best-predicted teacher per expert", "mean CKA per teacher layer"], routing_rows), ""]
    tgr = [n for n in ("moe", "moe_tgr", "moe_tgr_upper") if n in runs]
    rows = [[n, runs[n]["early_distill_loss"], runs[n]["distill_loss"], runs[n]["knn"]["student/cls"]] for n in tgr]
    text += [f"### Plain routing vs TGR-MoE ({out['steps']} steps)", "",
             md_table(["run", "distillation loss (steps 0-49)", "distillation loss (last 10 steps)", "kNN CLS"], rows), ""]
    rows = []
    for n in tgr:
        blocks = sorted(runs[n]["routing"]["layers"], key=int)
        for j, block in enumerate(blocks):  # metrics.jsonl names MoE layers by position (moe/0 = first MoE block)
            entry, logged = runs[n]["routing"]["layers"][block], runs[n]["logged"]
            changed = " ".join(f"{100 * h['changed']:.0f}%" for h in entry.get("stability_history", []))
            rows.append([n, block, logged.get(f"moe/{j}/expert_usage_entropy"),
                         logged.get(f"moe/{j}/token_routing_entropy"), changed,
                         logged.get(f"moe/{j}/guide_agreement", "-"), " ".join(map(str, entry["tokens"]))])
    text += ["#### Routing per MoE block", "",
             md_table(["run", "MoE block", "expert-usage entropy (training, last 10)", "token entropy (training, last 10)",
                       "changed expert between checkpoints (50-100, ..., 250-300)", "top-1 agreement with the teacher "
                       "router (training)", "held-out tokens per expert"], rows)]
    return "\n".join(text)


if __name__ == "__main__":
    main()
