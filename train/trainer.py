"""The training loop: store -> packed microbatches -> student + heads -> per-image normalized losses.

nanoGPT-style: ``train`` sets up and runs the loop, whose body fits on a screen; the pieces of a step
(accumulate the microbatches, reduce over ranks, step the optimizer, record, checkpoint) are the named
functions beside it. Data order, model init and augmentation are pure functions of the config and
seed, so a run killed at any point and resumed from its last checkpoint continues with bit-identical
losses on CPU.

Data parallel: every rank replays the same plan stream and takes every ``world``-th microbatch;
gradients are summed with an explicit all-reduce (``train.distributed``), each rank's loss already
being its share of the global mean (AMoE Eq. 5).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from storage.store import FeatureStore

from .checkpoint import (fall_back_to_trusted, latest_checkpoint, load_checkpoint, load_weights, mark_trusted,
                         save_checkpoint)
from .config import GuideConfig, OptimConfig, TrainConfig, with_stores
from .data import PlanStream, StoreBatches, make_loader
from .distributed import allreduce_grads, barrier, gather_rows, rank_and_world, use_device
from .losses import distillation_terms, relational_terms
from .metrics import MetricsLog
from .model.distill import SPARSE_ONLY, TRAINING_ONLY, DistillModel, build_model
from .moe import upcycle_model
from .rundir import RunDir, pin_guide

__all__ = ["TrainingDiverged", "TrainResult", "batch_to_device", "compute_terms", "lr_at", "train"]


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    last_loss: float
    seconds: float
    tokens_per_s: float
    data_wait: float  # share of step time spent waiting for data
    history: list[dict] = field(default_factory=list)


@dataclass
class StepTotals:
    """What one optimizer step summed over its microbatches (and, once reduced, over the ranks)."""

    losses: dict[str, torch.Tensor | float]
    real_tokens: int
    data_wait: float
    aux: list[dict]
    store_images: list[int] = field(default_factory=list)  # images drawn from each store of a mixture


def train(cfg: TrainConfig, store_url: str | list[str] | None, run: Path, *, fingerprint_meta: dict | None = None,
          on_step: Callable[[dict], None] | None = None, init_checkpoint: str | None = None) -> TrainResult:
    """Train (or resume) the run in ``run`` on ``store_url`` (one store, several, or None: the config's
    ``data.stores``); the caller has checked the fingerprints (``rundir.prepare_run``).

    The model's structure and target spaces come from the first store; a run started from another
    (``model.init_from``; ``init_checkpoint`` is the checkpoint ``prepare_run`` recorded) takes that
    run's weights and target spaces, so its heads keep predicting in the space they learned.
    """
    cfg = with_stores(cfg, store_url)
    rank, world = rank_and_world()
    device = use_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    store = FeatureStore.open(cfg.data.stores[0].url)
    teachers = cfg.data.teachers or store.teacher_names
    if not teachers:
        raise ValueError(f"{store.url} has no teacher: run cache-teachers first")
    torch.manual_seed(cfg.run.seed)
    record = json.loads(RunDir(run).store.read_text()) if RunDir(run).store.exists() else {}
    model = build_model(pin_guide(cfg, record), store, teachers, training=True).to(device)
    if cfg.run.compile:  # in place: the state dict (checkpoints, upcycling) keeps its names
        model.compile(backend=cfg.run.compile_backend)
    opt = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, fused=device.type == "cuda")
    start, best = _resume(model, opt, run, cfg, init_checkpoint)
    batches = _batches(cfg, teachers, start, rank, world, model.guide.reads if model.guide else None,
                       pin_memory=device.type == "cuda")
    log = MetricsLog(run, start, enabled=rank == 0)
    history: list[dict] = []
    t_begin = time.perf_counter()
    try:
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.run.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            totals = _reduce(_accumulate(model, batches, cfg, device, step), world, device)
            _check_finite(totals.losses, step)  # before the optimizer: the weights never see a bad gradient
            grad_norm = _optimizer_step(model, opt, cfg.optim, world, device, step)
            record = _record(step, lr, grad_norm, totals, time.perf_counter() - t0)
            history.append(record)
            best = min(best, record["loss"])
            if rank == 0:  # this step's loss is the first computed with the weights checkpointed at ``step``
                mark_trusted(RunDir(run).checkpoints, step, record["loss"] <= cfg.run.max_loss_ratio * best)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps - 1:
                log.write(record)
            if on_step is not None:
                on_step(record)
            _maybe_checkpoint(step + 1, run, model, opt, cfg, teachers, rank, world,
                              {**(fingerprint_meta or {}), "best_loss": best})
    except TrainingDiverged as exc:
        if rank == 0:
            trusted = fall_back_to_trusted(RunDir(run).checkpoints)
            exc.args = (f"{exc.args[0]}; LATEST now names " + (
                f"{trusted.name}, the last checkpoint whose weights gave a finite, sane loss" if trusted else
                "no checkpoint: none gave a sane loss, a resume starts over"),)
        raise
    finally:
        log.close()
        del batches  # stops the loader's workers now, also when the loop raised
    return _result(cfg, start, history, time.perf_counter() - t_begin)


# ------------------------------------------------------------------------------- set-up
def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    """Linear warmup to ``lr``, then cosine or linear decay to ``lr·min_lr_ratio`` at ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - t)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and learned tokens (1-D parameters), as timm and nanoGPT."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resume(model: DistillModel, opt: torch.optim.Optimizer, run: Path, cfg: TrainConfig,
            init_checkpoint: str | None) -> tuple[int, float]:
    """The step to start from and the lowest loss so far: the last checkpoint's, else 0 (from another
    run's weights, or upcycled from a dense run, when asked)."""
    latest = latest_checkpoint(RunDir(run).checkpoints)
    if latest is not None:
        meta = load_checkpoint(latest, model, opt)
        return int(meta["step"]), float(meta.get("best_loss", math.inf))
    if cfg.model.init_from:  # a new optimizer state: only the weights (and target spaces) carry over
        source = Path(init_checkpoint) if init_checkpoint else latest_checkpoint(RunDir(Path(cfg.model.init_from)).checkpoints)
        if source is None or not source.is_dir():
            raise ValueError(f"model.init_from: no checkpoint {source or ''} in {cfg.model.init_from}")
        try:
            load_checkpoint(source, model, ignore=TRAINING_ONLY)  # teacher routers (TGR) start anew
        except ValueError as exc:
            raise ValueError(f"model.init_from: {exc}") from None
        return 0, math.inf
    if cfg.model.moe.upcycle_from:
        try:
            dense = load_weights(Path(cfg.model.moe.upcycle_from))
        except ValueError as exc:
            raise ValueError(f"model.moe.upcycle_from: {exc}") from None
        upcycle_model(model, dense, cfg.model.moe.upcycle_noise, cfg.run.seed, fresh=SPARSE_ONLY)
    return 0, math.inf


def _batches(cfg: TrainConfig, teachers: list[str], start: int, rank: int, world: int,
             layers: dict[str, list[int]] | None = None, pin_memory: bool = False) -> Iterator[dict]:
    """This rank's microbatches from ``start`` on: plans made here (the stores mixed by weight), loaded
    by DataLoader workers; ``layers``: cached teacher layers read with each image (TGR-MoE)."""
    dataset = StoreBatches([s.url for s in cfg.data.stores], teachers, cfg.data, patch=cfg.model.patch_size,
                           registers=cfg.model.registers, seed=cfg.run.seed, layers=layers)
    plans = PlanStream(dataset.reader.indexes, cfg.data, registers=cfg.model.registers, seed=cfg.run.seed,
                       weights=[s.weight for s in cfg.data.stores], accumulation=cfg.optim.accumulation, world=world,
                       rank=rank)
    dataset.drop_reader()  # the plans keep their stores' indexes; each loader worker opens its own readers
    return iter(make_loader(dataset, plans.steps(start), cfg.data, pin_memory))


# ------------------------------------------------------------------------------- one step
def batch_to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["pixels"] = batch["pixels"].to(device, non_blocking=True)
    out["layout"] = batch["layout"].to(device)
    out["targets"] = {t: {k: v.to(device, non_blocking=True) for k, v in f.items()} for t, f in batch["targets"].items()}
    if "layers" in batch:
        out["layers"] = {t: {k: v.to(device, non_blocking=True) for k, v in f.items()} for t, f in batch["layers"].items()}
    return out


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _router_term(aux: list[dict], share: float) -> torch.Tensor | None:
    """The MoE layers' auxiliary losses, summed over layers (TGR-MoE Eq. S1: λ_load Σ_i L_load^(i)), as this
    microbatch's share of the step (each layer's loss is a mean over the microbatch's tokens)."""
    losses = [a["router_loss"] for a in aux if "router_loss" in a]
    if not losses:
        return None
    return torch.stack(losses).sum() * share


def _guide_terms(aux: list[dict], share: float, tgr: GuideConfig) -> dict[str, torch.Tensor]:
    """TGR-MoE's terms, each summed over the guided layers and weighted (``train/moe/tgr.py``): the student
    routers' distillation λ_distill Σ L_distill (Eq. S2), the teacher routers' λ_load Σ L_load (Eq. S1) and
    λ_ent Σ L_ent; this microbatch's share of the step."""
    guided = [a for a in aux if "router_distill" in a]
    total = lambda key: torch.stack([a[key] for a in guided]).sum() * share  # noqa: E731
    return {"router_distill": tgr.distill * total("router_distill"),
            "guide_load": tgr.load_balance * total("guide_load_balance_loss"),
            "guide_entropy": tgr.entropy * total("guide_entropy")}


def compute_terms(model: DistillModel, batch: dict, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], object]:
    """Weighted loss terms of one microbatch already on the device (its share of AMoE Eq. 5), and the
    student output (for routing metrics)."""
    # targets in float32 PHI-S space, outside autocast (bf16 would round the whitening)
    targets = {t: {"summary": model.spaces[t]["summary"].normalize(f["summary"]),
                   "patches": model.spaces[t]["patches"].normalize(f["patches"]),
                   **({"registers": f["registers"].float()} if "registers" in f else {})}
               for t, f in batch["targets"].items()}
    layout = batch["layout"]
    with _autocast(batch["pixels"].device):
        preds, out = model(batch["pixels"], layout, cfg.run.attention, batch.get("layers"))
        terms = distillation_terms(preds, targets, layout.patch_image, layout.num_images, batch["global_images"],
                                   cfg.loss)
        # ARKD over the summaries of every rank's microbatch in this accumulation slot (AMoE Eq. 7)
        terms.update(relational_terms(preds, targets, cfg.loss, 1.0 / cfg.optim.accumulation, gather_rows))
        if cfg.loss.tas:  # M²oT Eq. 10: L_dist + λ1·L_tas + λ2·L_lb
            terms["tas"] = cfg.loss.tas * model.tas_loss(out, layout, {t: f["patches"] for t, f in targets.items()},
                                                         batch["global_images"])
        share = layout.num_images / batch["global_images"]
        router = _router_term(out.aux, share)
        if router is not None:
            terms["router"] = cfg.loss.router * router
        if model.guides:
            terms.update(_guide_terms(out.aux, share, cfg.model.moe.tgr))
    return terms, out


def _accumulate(model: DistillModel, batches: Iterator[dict], cfg: TrainConfig, device: torch.device,
                step: int) -> StepTotals:
    """Forward and backward of this rank's ``optim.accumulation`` microbatches; loss terms summed on the device."""
    totals = StepTotals({}, 0, 0.0, [])
    for _ in range(cfg.optim.accumulation):
        t = time.perf_counter()
        batch = batch_to_device(next(batches), device)
        totals.data_wait += time.perf_counter() - t
        if batch["step"] != step:
            raise RuntimeError(f"data plan out of sync: got step {batch['step']}, training step {step}")
        totals.real_tokens += batch["real_tokens"]
        totals.store_images = [a + b for a, b in zip(totals.store_images or [0] * len(batch["store_images"]),
                                                     batch["store_images"])]
        terms, out = compute_terms(model, batch, cfg)
        torch.stack(list(terms.values())).sum().backward()
        for k, v in terms.items():
            totals.losses[k] = totals.losses.get(k, 0.0) + v.detach().float()
        totals.aux = out.aux
    return totals


def _reduce(totals: StepTotals, world: int, device: torch.device) -> StepTotals:
    """Loss terms and token count over all ranks, read back in the step's one host sync.

    A NaN on any rank makes the sum NaN on every rank, so all stop together.
    """
    names = list(totals.losses)
    values = torch.stack([totals.losses[k] for k in names])
    counts = torch.tensor([float(totals.real_tokens), *map(float, totals.store_images)], dtype=torch.float64,
                          device=device)
    if world > 1:  # the counts as a device tensor: NCCL cannot reduce CPU tensors
        dist.all_reduce(values)
        dist.all_reduce(counts)
    totals.losses = dict(zip(names, values.tolist()))
    totals.real_tokens, *totals.store_images = [int(c) for c in counts.tolist()]
    return totals


def _optimizer_step(model: DistillModel, opt: torch.optim.Optimizer, cfg: OptimConfig, world: int,
                    device: torch.device, step: int) -> float:
    """Gradients summed over ranks, clipped, applied; returns the gradient norm before clipping (NaN: no clipping)."""
    if world > 1:
        allreduce_grads(model)
    grad_norm = float("nan")
    if cfg.clip_grad:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
    try:
        opt.step()
    except RuntimeError as exc:  # e.g. an lr beyond float32: "value cannot be converted ... without overflow"
        if "overflow" not in str(exc):
            raise
        raise TrainingDiverged(f"step {step}: the optimizer step overflowed ({exc}); lower optim.lr") from None
    if device.type == "cuda":
        torch.cuda.synchronize()
    return grad_norm


def _check_finite(terms: dict[str, float], step: int) -> None:
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f"step {step}: non-finite loss in term(s) {', '.join(bad)} "
                               f"({', '.join(f'{k}={v}' for k, v in bad.items())}); the run stopped before the "
                               "optimizer step, the last checkpoint is left as it was")


# ------------------------------------------------------------------------------- records and checkpoints
def _routing_metrics(aux: list[dict]) -> dict[str, float]:
    """Per-layer routing losses and entropies, read back in one transfer."""
    names, values = [], []
    for i, a in enumerate(aux):
        for key in ("load_balance_loss", "z_loss", "expert_usage_entropy", "token_routing_entropy", "router_distill",
                    "guide_load_balance_loss", "guide_entropy", "guide_agreement", "guide_usage_entropy"):
            if key in a:
                names.append(f"moe/{i}/{key}")
                values.append(a[key].detach().float().reshape(()))
    return dict(zip(names, torch.stack(values).tolist())) if values else {}


def _record(step: int, lr: float, grad_norm: float, totals: StepTotals, seconds: float) -> dict:
    """One metrics.jsonl line: total and per-term losses, lr, throughput, data wait, routing metrics."""
    return {"step": step, "loss": sum(totals.losses.values()), **{f"loss/{k}": v for k, v in totals.losses.items()},
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": totals.real_tokens / seconds,
            "data_wait": totals.data_wait / seconds, "step_time": seconds, "real_tokens": totals.real_tokens,
            **({f"data/store{k}_images": n for k, n in enumerate(totals.store_images)}
               if len(totals.store_images) > 1 else {}),
            **_routing_metrics(totals.aux)}


def _maybe_checkpoint(done: int, run: Path, model: DistillModel, opt: torch.optim.Optimizer, cfg: TrainConfig,
                      teachers: list[str], rank: int, world: int, meta: dict) -> None:
    """Every ``run.checkpoint_every`` steps and at the end, rank 0 writes; every rank waits for it.

    Weights that are no longer finite stop the run instead of being saved; the next step's loss decides
    whether the checkpoint is trusted (``checkpoint.py``).
    """
    if done % cfg.run.checkpoint_every and done != cfg.run.steps:
        return
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDiverged(f"step {done - 1}: non-finite weights after the optimizer step ({', '.join(bad[:3])})")
    if rank == 0:
        # the data position is the step: plans replay from metadata (train/data.py)
        position = {"step": done, "microbatches": done * cfg.optim.accumulation * world, "world": world}
        save_checkpoint(RunDir(run).checkpoints, done, model, opt,
                        {"teachers": teachers, "data_position": position, **meta}, cfg.run.keep_checkpoints)
    barrier()


def _result(cfg: TrainConfig, start: int, history: list[dict], seconds: float) -> TrainResult:
    step_total = sum(r["step_time"] for r in history)
    return TrainResult(
        steps=cfg.run.steps, resumed_from=start, last_loss=history[-1]["loss"] if history else float("nan"),
        seconds=seconds,
        tokens_per_s=sum(r["real_tokens"] for r in history) / step_total if step_total else 0.0,
        data_wait=sum(r["data_wait"] * r["step_time"] for r in history) / step_total if step_total else 0.0,
        history=history,
    )
