"""`pipeline sweep`: many students from one store: a base config and a grid (or list) of overrides, each run
trained (resumed when it was killed, skipped when finished), evaluated, and all compared.

SWEEP.toml::

    base = "train.toml"            # optional TrainConfig file (relative to the sweep file)
    tasks = ["knn"]                # eval tasks run on each
    [base_set]                     # optional TrainConfig fields over the base (nested tables or dotted keys)
    "run.steps" = 200
    [grid]                         # the product of every key's values ...
    "model.moe.layers" = ["none", "odd"]
    "loss.arkd" = [0.0, 1.0]
    [[runs]]                       # ... and/or named runs with their own overrides
    name = "tas"
    set = {"loss.tas" = 0.5, "model.moe.layers" = "odd"}
    store = "other_store"          # optional: this run trains on another store

Runs are sequential on this machine, or Ray tasks on a cluster (``--ray-address ADDR``, or ``local`` for
an embedded one; one GPU each where the cluster has GPUs). Only the sweep's own files are written: DIR is
claimed with a marker, each run is a run directory (``train.rundir``), the comparison goes to DIR/compare.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from config import ConfigError, StrictConfig, load_cli_config, load_config

__all__ = ["SweepConfig", "SweepRun", "expand", "load_sweep", "run_sweep"]


class NamedRun(StrictConfig):
    name: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict, description="dotted TrainConfig key -> value")
    store: str | None = Field(None, description="another store for this run (default: --store), e.g. a random "
                              "pool of the same size as the curated one")


class SweepConfig(StrictConfig):
    base: str | None = Field(None, description="TrainConfig TOML file, relative to the sweep file")
    base_set: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields over the base")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; every combination")
    runs: list[NamedRun] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=lambda: ["knn"], description="pipeline eval tasks of each run")


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: dict[str, Any]  # dotted key -> value
    store: str | None = None  # None: the sweep's store


def _dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_dotted(v, key) if isinstance(v, dict) else {key: v})
    return out


def _slug(overrides: dict[str, Any]) -> str:
    text = ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:120]


def expand(cfg: SweepConfig) -> list[SweepRun]:
    """Every grid combination (named by its overrides) followed by the named runs; names are unique."""
    keys = list(cfg.grid)
    runs = [SweepRun(_slug(dict(zip(keys, combo))), dict(zip(keys, combo)))
            for combo in itertools.product(*(cfg.grid[k] for k in keys))] if keys else []
    runs += [SweepRun(r.name, _dotted(r.set), r.store) for r in cfg.runs]
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"the sweep names runs twice: {dupes}")
    bad = [n for n in names if not n or "/" in n or n.startswith(".") or n == "compare"]
    if bad:
        raise ConfigError(f"run names must be plain folder names (not 'compare'): {bad}")
    if not runs:
        raise ConfigError("the sweep has no runs: give a [grid] and/or [[runs]]")
    return runs


def load_sweep(path: Path) -> tuple[SweepConfig, Path | None]:
    """The sweep file and its base TrainConfig file (resolved next to it)."""
    path = Path(path)
    cfg = load_config(SweepConfig, path)
    base = (path.parent / cfg.base) if cfg.base else None
    if base is not None and not base.is_file():
        raise ConfigError(f"{path}: base config {base} not found")
    return cfg, base


def _train_config(cfg: SweepConfig, base: Path | None, run: SweepRun, store: str):
    from train.config import TrainConfig, with_stores

    try:  # the dotted keys fill the config as --set items would, already typed
        return with_stores(load_cli_config(TrainConfig, base, {**_dotted(cfg.base_set), **run.overrides}, None), store)
    except ConfigError as exc:
        raise ConfigError(f"sweep run {run.name!r}: {exc}") from None


def _finished(run_dir: Path, steps: int, eval_store: str, tasks: list[str]) -> bool:
    from train.checkpoint import latest_checkpoint
    from train.rundir import RunDir

    files = RunDir(run_dir)
    latest = latest_checkpoint(files.checkpoints)
    if latest is None or json.loads((latest / "state.json").read_text())["step"] < steps or not files.eval.exists():
        return False
    done = json.loads(files.eval.read_text())
    return done.get("store") == eval_store and all(t in done for t in tasks)


def train_and_evaluate(run_dir: str, config_text: str, eval_store: str, tasks: list[str], device: str) -> dict:
    """One run of the sweep (also the body of a Ray task): train or resume, then evaluate."""
    from eval.evaluate import evaluate_run
    from train.config import TrainConfig
    from train.rundir import prepare_run, run_lock
    from train.trainer import train

    cfg = TrainConfig.model_validate(tomllib.loads(config_text))
    out = Path(run_dir)
    with run_lock(out):
        meta = prepare_run(out, cfg)
        result = train(cfg, None, out, fingerprint_meta={"store_fingerprint": meta["fingerprint"]},
                       init_checkpoint=(meta.get("init_from") or {}).get("checkpoint"))
    evaluate_run(out, eval_store, tasks, device=device)
    return {"run": run_dir, "resumed_from": result.resumed_from, "last_loss": result.last_loss}


def run_sweep(sweep: Path, store: str, out: Path, *, eval_store: str | None = None, ray_address: str | None = None,
              device: str = "auto", on_run: Callable[[str, str], None] | None = None) -> dict:
    """Run every run of ``sweep`` on ``store`` into ``out``/<name>, evaluate each on ``eval_store`` (default:
    ``store``) and compare them into ``out``/compare; returns what was done per run."""
    from config import dump_toml
    from eval.compare import write_comparison
    from stages.datasets import claim_folder

    cfg, base = load_sweep(sweep)
    runs = expand(cfg)
    configs = {r.name: _train_config(cfg, base, r, r.store or store) for r in runs}  # all checked before any work
    eval_store = eval_store or store
    claim_folder(out, "sweep")
    (out / "sweep.json").write_text(json.dumps({"sweep": str(sweep), "store": store, "eval_store": eval_store,
                                                "runs": {r.name: {"set": r.overrides, "store": r.store or store}
                                                         for r in runs}}, indent=1, default=str))
    report = on_run or (lambda name, what: None)
    todo, done = [], {}
    for r in runs:
        if _finished(out / r.name, configs[r.name].run.steps, eval_store, cfg.tasks):
            done[r.name] = "skipped (finished)"
            report(r.name, done[r.name])
        else:
            todo.append(r)
    args = {r.name: (str(out / r.name), dump_toml(configs[r.name]), eval_store, cfg.tasks) for r in todo}
    if ray_address is None:
        for r in todo:
            report(r.name, "training")
            result = train_and_evaluate(*args[r.name], device)
            done[r.name] = f"trained from step {result['resumed_from']}, loss {result['last_loss']:.4f}"
            report(r.name, done[r.name])
    else:
        done.update(_on_ray(todo, args, ray_address, device, report))
    write_comparison([out / r.name for r in runs], out / "compare")
    return done


def _on_ray(todo: list[SweepRun], args: dict, address: str, device: str, report) -> dict:
    """The runs as Ray tasks: one GPU each where the cluster has GPUs, else one task per CPU the cluster offers."""
    import ray

    from stages.ray_cluster import ray_cluster

    out = {}
    with ray_cluster(None if address == "local" else address):
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(train_and_evaluate)
        futures = {task.remote(*args[r.name], "cuda" if gpus else device): r.name for r in todo}
        for r in todo:
            report(r.name, "submitted to the Ray cluster")
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = futures[ready[0]]
            result = ray.get(ready[0])
            out[name] = f"trained from step {result['resumed_from']}, loss {result['last_loss']:.4f}"
            report(name, out[name])
    return out
