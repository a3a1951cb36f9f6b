"""The training loop: store -> packed microbatches -> student + heads -> per-image normalized losses.

nanoGPT-style and deliberately flat: one function owns the loop; data order, model init and
augmentation are pure functions of the config and seed, so a run killed at any point and resumed from
its last checkpoint continues with bit-identical losses on CPU.

Data parallel: every rank replays the same plan stream and takes every ``world``-th microbatch;
gradients are summed with all-reduce (each rank's loss is already its share of the global mean,
AMoE Eq. 5). Explicit all-reduce instead of DDP's hooks because experts that receive no token in a
step have no gradient, which DDP only tolerates with ``find_unused_parameters``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from storage.store import FeatureStore

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import OptimConfig, TrainConfig
from .data import PlanStream, StoreBatches, make_loader
from .losses import distillation_terms
from .model.distill import DistillModel
from .targets import load_teacher_targets

__all__ = ["TrainingDiverged", "TrainResult", "batch_to_device", "build_model", "compute_terms", "lr_at", "train"]


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


def build_model(cfg: TrainConfig, store: FeatureStore, teachers: list[str]) -> DistillModel:
    targets = [load_teacher_targets(store, t, phis=cfg.loss.phis) for t in teachers]
    return DistillModel(cfg.model, cfg.heads, targets)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and learned tokens (1-D parameters), as timm and nanoGPT."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _allreduce_grads(model: torch.nn.Module) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def batch_to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["pixels"] = batch["pixels"].to(device, non_blocking=True)
    out["layout"] = batch["layout"].to(device)
    out["targets"] = {t: {k: v.to(device, non_blocking=True) for k, v in f.items()} for t, f in batch["targets"].items()}
    return out


def _router_term(aux: list[dict], share: float) -> torch.Tensor | None:
    losses = [a["router_loss"] for a in aux if "router_loss" in a]
    if not losses:
        return None
    return torch.stack(losses).mean() * share


def _routing_metrics(aux: list[dict]) -> dict[str, float]:
    """Per-layer routing losses and entropies, read back in one transfer."""
    names, values = [], []
    for i, a in enumerate(aux):
        for key in ("load_balance_loss", "z_loss", "expert_usage_entropy", "token_routing_entropy"):
            if key in a:
                names.append(f"moe/{i}/{key}")
                values.append(a[key].detach().float().reshape(()))
    return dict(zip(names, torch.stack(values).tolist())) if values else {}


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


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
        preds, out = model(batch["pixels"], layout, cfg.run.attention)
        terms = distillation_terms(preds, targets, layout.patch_image, layout.num_images, batch["global_images"],
                                   cfg.loss)
        router = _router_term(out.aux, layout.num_images / batch["global_images"])
        if router is not None:
            terms["router"] = cfg.loss.router * router
    return terms, out


class _MetricsLog:
    """metrics.jsonl + TensorBoard; on resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.path = run / "metrics.jsonl"
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def train(cfg: TrainConfig, store_url: str, run: Path, *, fingerprint_meta: dict | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) the run in ``run`` on ``store_url``; the caller has checked the fingerprint."""
    rank, world = _dist()
    device = torch.device(cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    store = FeatureStore.open(store_url)
    teachers = cfg.data.teachers or store.teacher_names
    if not teachers:
        raise ValueError(f"{store_url} has no teacher: run cache-teachers first")

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, store, teachers).to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, fused=device.type == "cuda")
    ckpt_root = run / "checkpoints"
    start = 0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        start = int(load_checkpoint(latest, model, opt)["step"])
    elif cfg.model.moe.upcycle_from:
        _upcycle(model, Path(cfg.model.moe.upcycle_from), cfg)
    log = _MetricsLog(run, start, enabled=rank == 0)

    dataset = StoreBatches(store_url, teachers, cfg.data, patch=cfg.model.patch_size,
                           registers=cfg.model.registers, seed=cfg.run.seed)
    reader = dataset.reader
    plans = PlanStream(reader.ok, reader.grid, int(store.attrs["shard_images"]), cfg.data,
                       registers=cfg.model.registers, seed=cfg.run.seed, accumulation=cfg.optim.accumulation,
                       world=world, rank=rank)
    dataset.drop_reader()
    loader = make_loader(dataset, plans.steps(start), cfg.data)
    batches = iter(loader)

    history, last_loss = [], float("nan")
    wait_total = step_total = 0.0
    tokens_total = 0
    t_begin = time.perf_counter()
    try:
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.run.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            wait = 0.0
            real_tokens = 0
            aux_last: list[dict] = []
            for _ in range(cfg.optim.accumulation):
                tw = time.perf_counter()
                batch = batch_to_device(next(batches), device)
                wait += time.perf_counter() - tw
                if batch["step"] != step:
                    raise RuntimeError(f"data plan out of sync: got step {batch['step']}, training step {step}")
                real_tokens += batch["real_tokens"]
                terms, out = compute_terms(model, batch, cfg)
                torch.stack(list(terms.values())).sum().backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                aux_last = out.aux
            names = list(sums)
            values = torch.stack([sums[k] for k in names])
            tokens = torch.tensor(float(real_tokens), dtype=torch.float64, device=device)
            if world > 1:  # a NaN on any rank makes the sum NaN on every rank: all stop together
                dist.all_reduce(values)
                dist.all_reduce(tokens)
            sums = dict(zip(names, values.tolist()))  # the step's one host sync for the losses
            _check_finite(sums, step)  # before the optimizer: the weights never see a bad gradient
            real_tokens = int(tokens.item())
            if world > 1:
                _allreduce_grads(model)
            grad_norm = float("nan")
            if cfg.optim.clip_grad:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad))
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            last_loss = sum(sums.values())
            wait_total += wait
            step_total += dt
            tokens_total += real_tokens
            record = {"step": step, "loss": last_loss, **{f"loss/{k}": v for k, v in sums.items()}, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": real_tokens / dt, "data_wait": wait / dt,
                      "step_time": dt, **_routing_metrics(aux_last)}
            history.append(record)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps - 1:
                log.write(record)
            if on_step is not None:
                on_step(record)
            done = step + 1
            if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
                if rank == 0:
                    # the data position is the step: plans replay from metadata (train/data.py)
                    position = {"step": done, "microbatches": done * cfg.optim.accumulation * world, "world": world}
                    save_checkpoint(ckpt_root, done, model, opt,
                                    {"teachers": teachers, "data_position": position, **(fingerprint_meta or {})},
                                    cfg.run.keep_checkpoints)
                if world > 1:
                    dist.barrier()
    finally:
        log.close()
        del batches
    return TrainResult(
        steps=cfg.run.steps, resumed_from=start, last_loss=last_loss, seconds=time.perf_counter() - t_begin,
        tokens_per_s=tokens_total / step_total if step_total else 0.0,
        data_wait=wait_total / step_total if step_total else 0.0, history=history,
    )


def _upcycle(model: DistillModel, source: Path, cfg: TrainConfig) -> None:
    """Start an MoE run from a dense run: experts are copies of its MLPs, heads and the rest are loaded."""
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(source / "checkpoints") or latest_checkpoint(source) or source
    if not (ckpt / "model.safetensors").exists():
        raise ValueError(f"model.moe.upcycle_from={source}: no checkpoint found (a run directory or checkpoint dir)")
    state = load_file(str(ckpt / "model.safetensors"))
    model.student.upcycle_from({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")},
                               cfg.model.moe.upcycle_noise, cfg.run.seed)
    rest = {k: v for k, v in state.items() if not k.startswith("student.")}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith("student.")]
    if missing or unexpected:
        raise ValueError(f"upcycling from {ckpt}: heads do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _check_finite(terms: dict[str, float], step: int) -> None:
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f"step {step}: non-finite loss in term(s) {', '.join(bad)} "
                               f"({', '.join(f'{k}={v}' for k, v in bad.items())}); the run stopped before the "
                               "optimizer step, the last checkpoint is left as it was")
