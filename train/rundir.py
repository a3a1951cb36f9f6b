"""Run directories: the resolved config and the store fingerprint a run trained on, checked on every start.

Written and, on resume, checked by ``pipeline train`` before the trainer starts; read by the
evaluation (``eval``), which is why it lives in ``train/`` and not in the CLI.

A run directory is the unit researchers compare: ``config.toml`` (resolved, with the preset expanded),
``store.json`` (the store it read and that store's fingerprint restricted to the run's teachers, so
adding another teacher to a shared store does not invalidate older runs), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` and, after ``pipeline eval``, ``eval.json``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from config import dump_toml
from storage.fingerprint import diff
from storage.store import FeatureStore

from .config import TrainConfig

__all__ = ["RunError", "prepare_run", "run_fingerprint", "read_run"]

CONFIG = "config.toml"
STORE = "store.json"
# fields a resumed run may change: how long and how often, not what is trained
RESUMABLE_CHANGES = {"run.steps", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.threads",
                     "run.device", "data.workers", "data.prefetch"}


class RunError(ValueError):
    pass


def run_fingerprint(store: FeatureStore, teachers: list[str]) -> dict:
    fp = store.fingerprint()
    missing = [t for t in teachers if t not in fp["teachers"]]
    if missing:
        raise RunError(f"teacher(s) {', '.join(missing)} not complete in {store.url} "
                       f"(complete: {', '.join(fp['teachers']) or 'none'})")
    return {**fp, "teachers": {t: fp["teachers"][t] for t in teachers}}


def prepare_run(run: Path, cfg: TrainConfig, store_url: str, *, write: bool = True) -> dict:
    """Create or check ``run``: refuse another store fingerprint, or a config that changes what is trained."""
    store = FeatureStore.open(store_url)
    teachers = cfg.data.teachers or store.teacher_names
    fingerprint = run_fingerprint(store, teachers)
    cfg_text = dump_toml(cfg)
    if (run / STORE).exists():
        recorded = json.loads((run / STORE).read_text())
        changes = diff(recorded["fingerprint"], fingerprint)
        if changes:
            raise RunError(f"run {run} was trained on a store with another fingerprint ({recorded['url']}); "
                           f"{store_url} differs in: " + "; ".join(changes) + ". Use a new --out for this store.")
        old, new = tomllib.loads((run / CONFIG).read_text()), tomllib.loads(cfg_text)
        for key in RESUMABLE_CHANGES:
            section, name = key.split(".")
            old.get(section, {}).pop(name, None)
            new.get(section, {}).pop(name, None)
        changed = diff(old, new)
        if changed:
            raise RunError(f"run {run} exists with another config: " + "; ".join(changed)
                           + ". Use a new --out to train another config.")
    if write:
        run.mkdir(parents=True, exist_ok=True)
        (run / CONFIG).write_text(cfg_text)
        (run / STORE).write_text(json.dumps({"url": store_url, "teachers": teachers, "fingerprint": fingerprint}, indent=1))
    return {"teachers": teachers, "fingerprint": fingerprint}


def read_run(run: Path) -> tuple[TrainConfig, dict]:
    """(resolved config, store record) of an existing run directory."""
    if not (run / CONFIG).exists() or not (run / STORE).exists():
        raise RunError(f"{run} is not a run directory (no {CONFIG} / {STORE}); train one with `pipeline train`")
    return TrainConfig.model_validate(tomllib.loads((run / CONFIG).read_text())), json.loads((run / STORE).read_text())
