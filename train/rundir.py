"""Run directories: the resolved config and the store fingerprint a run trained on, checked on every start.

Written and, on resume, checked by ``pipeline train`` before the trainer starts; read by the
evaluation (``eval``), which is why it lives in ``train/`` and not in the CLI (the design card gives run
directories to ``pipeline/``, but ``eval`` must read them and may not import the CLI).

A run directory is the unit researchers compare: ``config.toml`` (resolved, with the preset expanded),
``store.json`` (the stores it read, each with its fingerprint restricted to the run's teachers, so
adding another teacher to a shared store does not invalidate older runs; the teachers' full
fingerprints; and, for a run started from another, where it started), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` and, after ``pipeline eval``, ``eval.json``.

``store.json`` keeps ``url`` and ``fingerprint`` (the first store's) for readers of one-store runs;
``stores`` lists every store with its weight and fingerprint.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config import dump_toml
from storage.fingerprint import diff, diff_but_policy, with_added_fields
from storage.fsutil import filesystem
from storage.locks import WriterLock
from storage.store import FeatureStore, StoreError

from .checkpoint import CHECKPOINTS, latest_checkpoint
from .config import TrainConfig
from .model.distill import guide_plan

__all__ = ["RunDir", "RunError", "init_source", "prepare_run", "run_fingerprint", "read_run", "run_lock",
           "teacher_fingerprints"]


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
        return self.path / CHECKPOINTS

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


def teacher_fingerprints(store: FeatureStore, teachers: list[str]) -> dict[str, dict]:
    """The full fingerprint of each teacher (what ``store.json`` records, so later checks need no store)."""
    return {t: with_added_fields(store.teacher_attrs(t)["fingerprint"]) for t in teachers}


# model and head fields that do not change the weights' shapes or meaning: a run started from another
# may set them anew (training-only router settings, the compute backend, where weights come from)
INIT_FREE = {"preset", "init_from", "moe.backend", "moe.noise_std", "moe.load_balance_weight", "moe.z_loss_weight",
             "moe.capacity_factor", "moe.upcycle_from", "moe.upcycle_noise", "moe.guide", "moe.tgr"}


def _architecture(cfg: TrainConfig) -> dict:
    out = {"model": cfg.model.model_dump(mode="json"), "heads": cfg.heads.model_dump(mode="json")}
    for key in INIT_FREE:
        node = out["model"]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return out


def init_source(cfg: TrainConfig, teachers: list[str], fingerprints: dict[str, dict]) -> dict:
    """Check that ``model.init_from`` names a run this one may start from; returns what to record.

    Allowed when both distil the same teachers with fingerprints equal but for the image policy (AMoE
    stage 2 caches stage 1's teachers at a larger size) and the student and heads have the same shape;
    anything else is refused, naming what differs.
    """
    source = Path(cfg.model.init_from)
    what = f"--init-from / model.init_from {source}"
    try:
        src_cfg, src_record = read_run(source)
    except RunError as exc:
        raise RunError(f"{what}: {exc}") from None
    ckpt = latest_checkpoint(RunDir(source).checkpoints)
    if ckpt is None:
        raise RunError(f"{what}: the run has no checkpoint yet")
    if sorted(src_record["teachers"]) != sorted(teachers):
        raise RunError(f"{what}: it distils teachers {src_record['teachers']}, this run {teachers}")
    src_fps = src_record.get("teacher_fingerprints")
    if src_fps is None:  # recorded before store.json kept full fingerprints: read them from its store
        try:
            src_fps = teacher_fingerprints(FeatureStore.open(src_record["url"]), teachers)
        except (StoreError, KeyError, OSError) as exc:
            raise RunError(f"{what}: cannot read its store {src_record['url']} to compare the teachers ({exc})") from None
    for t in teachers:
        changes = diff_but_policy(src_fps[t], fingerprints[t])
        if changes:
            raise RunError(f"{what}: teacher '{t}' is not the same teacher in this run's store (beyond the image "
                           "policy and codec): " + "; ".join(changes))
    changes = diff(_architecture(src_cfg), _architecture(cfg))
    if changes:
        raise RunError(f"{what}: the student or heads differ: " + "; ".join(changes))
    step = json.loads((ckpt / "state.json").read_text())["step"]
    return {"run": str(source.resolve()), "checkpoint": str(ckpt.resolve()), "step": int(step)}


def pin_guide(cfg: TrainConfig, record: dict) -> TrainConfig:
    """``cfg`` with the teacher-router map (TGR-MoE) that the run's ``store.json`` ``record`` holds, if any: the
    default map follows the store's cached layers, which may change while a run is resumed."""
    guide = record.get("guide")
    if not guide or cfg.model.moe.guide != "tgr":
        return cfg
    moe = cfg.model.moe
    tgr = moe.tgr.model_copy(update={"teacher": guide["teacher"],
                                     "layers": {int(b): int(k) for b, k in guide["layers"].items()}})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"moe": moe.model_copy(update={"tgr": tgr})})})


def _without_store_urls(config: dict) -> dict:
    """A config as compared on resume: store URLs may change (a moved store), weights may not; a run
    recorded before ``data.stores`` read its one store with weight 1."""
    data = config.setdefault("data", {})
    data["stores"] = [{k: v for k, v in s.items() if k != "url"} for s in data.get("stores") or [{"weight": 1.0}]]
    return config


def prepare_run(run: Path, cfg: TrainConfig, *, write: bool = True) -> dict:
    """Create or check ``run`` for ``cfg`` (its ``data.stores`` set): refuse stores that do not hold the
    same teachers, another store fingerprint, or a config that changes what is trained."""
    files = RunDir(run)
    if run.exists() and not files.store.exists() and any(p.name != files.lock.name for p in run.iterdir()):
        raise RunError(f"{run} is a non-empty folder and not a run directory: refusing to write into it "
                       "(use a new --out)")
    stores = [FeatureStore.open(s.url) for s in cfg.data.stores]
    teachers = cfg.data.teachers or stores[0].teacher_names
    fingerprints = [run_fingerprint(store, teachers) for store in stores]
    for field, table in (("loss.arkd", cfg.loss.arkd), ("loss.teacher_weights", cfg.loss.teacher_weights)):
        unknown = sorted(set(table) - set(teachers)) if isinstance(table, dict) else []
        if unknown:
            raise RunError(f"{field} names teacher(s) {', '.join(unknown)} that the run does not distil "
                           f"(teachers: {', '.join(teachers)})")
    full = teacher_fingerprints(stores[0], teachers)
    for store in stores[1:]:
        other = teacher_fingerprints(store, teachers)
        for t in teachers:
            changes = diff_but_policy(full[t], other[t])
            if changes:
                raise RunError(f"{store.url}: teacher '{t}' is not the one of {stores[0].url} (the stores of a run "
                               "must cache the same teachers; only the image policy and codec may differ): " + "; ".join(changes))
    record = {"url": stores[0].url, "teachers": teachers, "fingerprint": fingerprints[0],
              "stores": [{"url": s.url, "weight": s.weight, "fingerprint": fp}
                         for s, fp in zip(cfg.data.stores, fingerprints)],
              "teacher_fingerprints": full}
    recorded = json.loads(files.store.read_text()) if files.store.exists() else {}
    if cfg.model.moe.guide == "tgr":  # refused here, before the run directory is written, if a store cannot serve it
        try:  # a resumed run keeps the map it started with, whatever layers its store has gained since
            plan = guide_plan(pin_guide(cfg, recorded).model, stores[0], teachers)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        for store in stores[1:]:
            missing = sorted(set(plan.layers.values()) - set(store.teacher_attrs(plan.teacher).get("layers", [])))
            if missing:
                raise RunError(f"{store.url}: teacher '{plan.teacher}' has no cached layers {missing}, which "
                               "model.moe.guide = 'tgr' reads from every store of the run; cache them with `pipeline "
                               f"cache-teachers ... --name {plan.teacher} --layers {','.join(map(str, missing))}`")
        record["guide"] = {"teacher": plan.teacher, "layers": {str(b): k for b, k in plan.layers.items()},
                           "routes": "teacher" if plan.teacher_routes else "student"}
    cfg_text = dump_toml(cfg)
    if files.store.exists():
        before = recorded.get("stores") or [{"url": recorded["url"], "fingerprint": recorded["fingerprint"]}]
        if len(before) != len(stores):
            raise RunError(f"run {run} was trained on {len(before)} store(s), this command gives {len(stores)}. "
                           "Use a new --out for another mixture.")
        for old, store, fp in zip(before, stores, fingerprints):
            changes = diff(old["fingerprint"], fp)
            if changes:
                raise RunError(f"run {run} was trained on a store with another fingerprint ({old['url']}); "
                               f"{store.url} differs in: " + "; ".join(changes) + ". Use a new --out for this store.")
        old, new = _without_store_urls(_recorded_config(files.config)), _without_store_urls(tomllib.loads(cfg_text))
        for key in RESUMABLE_CHANGES:
            section, name = key.split(".")
            old.get(section, {}).pop(name, None)
            new.get(section, {}).pop(name, None)
        changed = diff(old, new)
        if changed:
            raise RunError(f"run {run} exists with another config: " + "; ".join(changed)
                           + ". Use a new --out to train another config.")
        if "init_from" in recorded:  # where it started stays what it was, whatever the source run did since
            record["init_from"] = recorded["init_from"]
    elif cfg.model.init_from:
        record["init_from"] = init_source(cfg, teachers, full)
    if write:
        run.mkdir(parents=True, exist_ok=True)
        files.config.write_text(cfg_text)
        files.store.write_text(json.dumps(record, indent=1))
    return record


def read_run(run: Path) -> tuple[TrainConfig, dict]:
    """(resolved config, store record) of an existing run directory."""
    files = RunDir(run)
    if not files.config.exists() or not files.store.exists():
        raise RunError(f"{run} is not a run directory (no {files.config.name} / {files.store.name}); train one with "
                       "`pipeline train`")
    return TrainConfig.model_validate(tomllib.loads(files.config.read_text())), json.loads(files.store.read_text())
