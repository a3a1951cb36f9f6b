"""Many students from one store, side by side: a row per run with the config keys that differ between
the runs, every scalar of its ``eval.json`` and its final losses (``pipeline compare``).

Runs evaluated on different eval stores are refused, naming them: their numbers do not compare.
The output folder holds ``compare.json``, ``compare.md`` and ``compare.png`` (bar charts of the
headline metrics); a folder with other files in it is refused rather than written into.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from train.rundir import RunDir, read_run

__all__ = ["COMPARE_FILES", "compare_runs", "write_comparison"]

COMPARE_FILES = ("compare.json", "compare.md", "compare.png")
_SKIP = ("routing", "teachers", "store", "checkpoint_step")  # not scalar metrics of the run (routing: per expert)


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _scalars(eval_json: dict) -> dict[str, float]:
    """Every numeric leaf of ``eval.json`` but the routing analysis, by dotted path."""
    flat = _flatten({k: v for k, v in eval_json.items() if k not in _SKIP})
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _final_losses(run: Path) -> dict[str, float]:
    path = RunDir(run).metrics
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    if not lines:
        return {}
    last = json.loads(lines[-1])
    return {"step": float(last["step"]), **{k: float(v) for k, v in last.items() if k == "loss" or k.startswith("loss/")}}


def compare_runs(runs: list[Path]) -> dict:
    """The comparison of ``runs`` (see the module docstring); raises ValueError naming what does not compare."""
    if len(runs) < 2:
        raise ValueError("compare needs two or more run directories")
    names = [str(r) for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"a run is named twice: {names}")
    configs, evals, stores = {}, {}, {}
    for run in runs:
        cfg, _ = read_run(run)  # RunError (a ValueError) when it is not a run directory
        configs[str(run)] = _flatten(json.loads(json.dumps(cfg.model_dump(mode="json"))))
        path = RunDir(run).eval
        evals[str(run)] = json.loads(path.read_text()) if path.exists() else {}
        stores[str(run)] = evals[str(run)].get("store") or (evals[str(run)].get("knn") or {}).get("queries")
    evaluated = {r: s for r, s in stores.items() if s}
    if len(set(evaluated.values())) > 1:
        raise ValueError("the runs were evaluated on different eval stores: " + "; ".join(
            f"{r} on {s}" for r, s in evaluated.items()) + " (evaluate them on one store with `pipeline eval`)")
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    rows = []
    for run in runs:
        r = str(run)
        rows.append({"run": r, "config": {k: configs[r].get(k) for k in differ}, "eval": _scalars(evals[r]),
                     "final": _final_losses(run)})
    metrics = sorted({k for row in rows for k in row["eval"]})
    finals = sorted({k for row in rows for k in row["final"]}, key=lambda k: (k != "step", k != "loss", k))
    return {"eval_store": next(iter(evaluated.values()), None), "config_keys": differ, "eval_metrics": metrics,
            "final_metrics": finals, "runs": rows}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/")


def markdown(result: dict) -> str:
    head = ["run", *result["config_keys"], *(f"final {k}" for k in result["final_metrics"]), *result["eval_metrics"]]
    lines = [f"# Comparison of {len(result['runs'])} runs", "",
             f"Evaluated on {result['eval_store'] or 'no eval store (no run has eval.json)'}; config columns: the "
             "keys that differ between the runs.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["runs"]:
        cells = [Path(row["run"]).name, *(_fmt(row["config"][k]) for k in result["config_keys"]),
                 *(_fmt(row["final"].get(k)) for k in result["final_metrics"]),
                 *(_fmt(row["eval"].get(k)) for k in result["eval_metrics"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path, most: int = 12) -> None:
    """Bar charts: the final loss, then the eval metrics whose names say top-1 or agreement (up to ``most``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [("final", "loss")] * ("loss" in result["final_metrics"]) + [
        ("eval", k) for k in result["eval_metrics"] if "top1" in k or "agreement" in k or "ensemble" in k]
    chosen = chosen[:most] or [("final", k) for k in result["final_metrics"][1:most + 1]]
    cols = min(3, max(1, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=100, squeeze=False)
    labels = [Path(r["run"]).name for r in result["runs"]]
    for ax, (part, key) in zip(axes.flat, chosen):
        values = [r[part].get(key, float("nan")) for r in result["runs"]]
        ax.bar(range(len(values)), values, color="#4878a8")
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(("final " if part == "final" else "") + key, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(runs: list[Path], out: Path) -> dict:
    """Compare ``runs`` into ``out`` (created; a folder holding anything but an earlier comparison is refused)."""
    if out.exists() and (not out.is_dir() or any(p.name not in COMPARE_FILES for p in out.iterdir())):
        raise ValueError(f"{out} holds files that are not a comparison's: refusing to write into it (use a new --out)")
    result = compare_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown(result))
    _plot(result, out / "compare.png")
    return result
