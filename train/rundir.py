"""Run directories: the resolved config and the store fingerprint a run trained on, checked on every start.

Written and, on resume, checked by ``pipeline train`` before the trainer starts; read by the
evaluation (``eval``), which is why it lives in ``train/`` and not in the CLI (the design card gives run
directories to ``pipeline/``, but ``eval`` must read them and may not import the CLI).

A run directory is the unit researchers compare: ``config.toml`` (resolved, with the preset expanded),
``store.json`` (the store it read and that store's fingerprint restricted to the run's teachers, so
adding another teacher to a shared store does not invalidate older runs), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` and, after ``pipeline eval``, ``eval.json``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config import dump_toml
from storage.fingerprint import diff
from storage.fsutil import filesystem
from storage.locks import WriterLock
from storage.store import FeatureStore

from .config import TrainConfig

__all__ = ["RunDir", "RunError", "prepare_run", "run_fingerprint", "read_run", "run_lock"]


@dataclass(frozen=True)
class RunDir:
    """The files of a run directory, named in one place (the trainer, evaluation and reports use these)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def store(self) -> Path:
        return self.path / "store.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """The run directory's writer lock: a second ``pipeline train`` into the same ``--out`` is refused.

    A directory created only to hold the lock is removed again if the run wrote nothing into it (a
    refused store or config leaves no empty run behind)."""
    run = Path(run)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    fs, _ = filesystem(str(run))
    try:
        with WriterLock(fs, str(RunDir(run).lock.resolve()), f"run directory {run}"):
            yield
    finally:
        if created and run.is_dir() and not any(run.iterdir()):
            run.rmdir()

# fields a resumed run may change: how long and how often, not what is trained
RESUMABLE_CHANGES = {"run.steps", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.threads",
                     "run.device", "run.max_loss_ratio", "run.compile", "run.compile_backend", "data.workers",
                     "data.prefetch"}


class RunError(ValueError):
    pass


def _recorded_config(path: Path) -> dict:
    """A run's recorded config read through today's schema: fields added since it was written take
    their defaults (what the run was trained with), so a newer version resumes an older run."""
    try:
        return tomllib.loads(dump_toml(TrainConfig.model_validate(tomllib.loads(path.read_text()))))
    except ValueError as exc:  # pydantic's ValidationError and TOML errors are ValueErrors
        raise RunError(f"{path}: the recorded config no longer validates ({str(exc).splitlines()[0]})") from None


def run_fingerprint(store: FeatureStore, teachers: list[str]) -> dict:
    fp = store.fingerprint()
    missing = [t for t in teachers if t not in fp["teachers"]]
    if missing:
        raise RunError(f"teacher(s) {', '.join(missing)} not complete in {store.url} "
                       f"(complete: {', '.join(fp['teachers']) or 'none'})")
    return {**fp, "teachers": {t: fp["teachers"][t] for t in teachers}}


def prepare_run(run: Path, cfg: TrainConfig, store_url: str, *, write: bool = True) -> dict:
    """Create or check ``run``: refuse another store fingerprint, or a config that changes what is trained."""
    files = RunDir(run)
    if run.exists() and not files.store.exists() and any(p.name != files.lock.name for p in run.iterdir()):
        raise RunError(f"{run} is a non-empty folder and not a run directory: refusing to write into it "
                       "(use a new --out)")
    store = FeatureStore.open(store_url)
    teachers = cfg.data.teachers or store.teacher_names
    fingerprint = run_fingerprint(store, teachers)
    cfg_text = dump_toml(cfg)
    if files.store.exists():
        recorded = json.loads(files.store.read_text())
        changes = diff(recorded["fingerprint"], fingerprint)
        if changes:
            raise RunError(f"run {run} was trained on a store with another fingerprint ({recorded['url']}); "
                           f"{store_url} differs in: " + "; ".join(changes) + ". Use a new --out for this store.")
        old, new = _recorded_config(files.config), tomllib.loads(cfg_text)
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
        files.config.write_text(cfg_text)
        files.store.write_text(json.dumps({"url": store_url, "teachers": teachers, "fingerprint": fingerprint}, indent=1))
    return {"teachers": teachers, "fingerprint": fingerprint}


def read_run(run: Path) -> tuple[TrainConfig, dict]:
    """(resolved config, store record) of an existing run directory."""
    files = RunDir(run)
    if not files.config.exists() or not files.store.exists():
        raise RunError(f"{run} is not a run directory (no {files.config.name} / {files.store.name}); train one with "
                       "`pipeline train`")
    return TrainConfig.model_validate(tomllib.loads(files.config.read_text())), json.loads(files.store.read_text())
