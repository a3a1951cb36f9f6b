"""Frozen features of a trained run on a store: student CLS, each head's summary, and the teacher's own.

The model's structure (heads, target spaces, frozen pools) is rebuilt from the store being read and
the checkpoint then restores the trained weights and the training run's PHI-S buffers, so evaluation
reads only the store and the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storage.store import FeatureStore
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.config import TrainConfig
from train.data import StoreBatches, make_loader, ordered_plans
from train.losses import per_image_mean
from train.model import TRAINING_ONLY, build_model
from train.rundir import RunDir

__all__ = ["PatchFeatures", "StoreFeatures", "extract_features", "extract_patch_features", "load_trained",
           "ordered_batches"]


@dataclass
class StoreFeatures:
    rows: np.ndarray  # store row of each feature row
    labels: np.ndarray  # -1 where unlabelled
    features: dict[str, np.ndarray]  # "student/cls", "student/<teacher>", "teacher/<teacher>"
    cosine: dict[str, float]  # mean student-teacher cosine per head and feature (raw teacher space)


@dataclass
class PatchFeatures:
    rows: np.ndarray  # store row of each image
    grids: list[tuple[int, int]]  # (gh, gw) per image
    features: dict[str, list[np.ndarray]]  # "student/patches", "student/<teacher>", "teacher/<teacher>": [gh*gw, D]


def load_trained(run: Path, store_url: str, cfg: TrainConfig, teachers: list[str], device: torch.device):
    ckpt = latest_checkpoint(RunDir(run).checkpoints)
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet")
    model = build_model(cfg, FeatureStore.open(store_url), teachers)
    meta = load_checkpoint(ckpt, model, ignore=TRAINING_ONLY)
    return model.to(device).eval(), meta


def ordered_batches(store_url: str, cfg: TrainConfig, teachers: list[str], max_images: int | None = None,
                    keep: np.ndarray | None = None):
    """The store's usable images (those ``keep`` marks; the first ``max_images``) once, in store order, packed
    as the run packs them (no augmentation; sequences lengthened for a store cached larger than the run's
    ``seq_len``)."""
    data_cfg = cfg.data.model_copy(update={"flip": False, "crop": False, "mode": "packed"})
    ds = StoreBatches(store_url, teachers, data_cfg, patch=cfg.model.patch_size, registers=cfg.model.registers,
                      seed=0, train=False)
    reader = ds.reader
    ok = reader.ok.copy() if keep is None else reader.ok & keep
    if max_images is not None:
        ok[np.flatnonzero(ok)[max_images:]] = False
    longest = int((reader.grid[:, 0] * reader.grid[:, 1])[ok].max(initial=0)) + 1 + cfg.model.registers
    if longest > data_cfg.seq_len:  # a store cached larger than the run trained on (stage-2 size): longer sequences
        data_cfg = data_cfg.model_copy(update={"seq_len": longest})
        ds.cfg = data_cfg
    plans = list(ordered_plans(ok, reader.grid, data_cfg, cfg.model.registers))
    ds.drop_reader()
    return make_loader(ds, plans, data_cfg)


@torch.no_grad()
def extract_features(model, store_url: str, cfg: TrainConfig, teachers: list[str], device: torch.device,
                     *, with_student: bool = True) -> StoreFeatures:
    feats: dict[str, list[np.ndarray]] = {}
    rows, labels = [], []
    cos_sum: dict[str, float] = {}
    for batch in ordered_batches(store_url, cfg, teachers):
        rows.append(batch["rows"].numpy())
        labels.append(batch["labels"].numpy())
        for t in teachers:
            feats.setdefault(f"teacher/{t}", []).append(batch["targets"][t]["summary"].float().numpy())
        if not with_student:
            continue
        layout = batch["layout"].to(device)
        preds, out = model(batch["pixels"].to(device), layout, cfg.run.attention)
        feats.setdefault("student/cls", []).append(out.cls.float().cpu().numpy())
        raw = model.raw_summaries(preds)
        for t in teachers:
            feats.setdefault(f"student/{t}", []).append(raw[t].float().cpu().numpy())
            tgt = batch["targets"][t]
            cs = F.cosine_similarity(raw[t].float().cpu(), tgt["summary"].float(), dim=-1)
            raw_patches = model.spaces[t]["patches"].denormalize(preds[t]["patches"]).cpu()
            cp = per_image_mean(F.cosine_similarity(raw_patches, tgt["patches"].float(), dim=-1),
                                layout.patch_image.cpu(), layout.num_images)
            cos_sum[f"{t}/summary"] = cos_sum.get(f"{t}/summary", 0.0) + float(cs.sum())
            cos_sum[f"{t}/patches"] = cos_sum.get(f"{t}/patches", 0.0) + float(cp.sum())
            if "registers" in preds[t]:
                cr = F.cosine_similarity(preds[t]["registers"].float().cpu(), tgt["registers"].float(), dim=-1).mean(-1)
                cos_sum[f"{t}/registers"] = cos_sum.get(f"{t}/registers", 0.0) + float(cr.sum())
    n = sum(len(r) for r in rows)
    return StoreFeatures(
        rows=np.concatenate(rows), labels=np.concatenate(labels),
        features={k: np.concatenate(v) for k, v in feats.items()},
        cosine={k: v / n for k, v in cos_sum.items()},
    )


@torch.no_grad()
def extract_patch_features(model, store_url: str, cfg: TrainConfig, teachers: list[str], device: torch.device,
                           keep: np.ndarray | None = None) -> PatchFeatures:
    """Frozen patch features of the images ``keep`` marks, per image in row-major grid order: the student
    backbone's final tokens, each head's patch prediction in its teacher's raw space, and the cached
    teacher patches (dense probes)."""
    feats: dict[str, list[np.ndarray]] = {}
    rows, grids = [], []
    for batch in ordered_batches(store_url, cfg, teachers, keep=keep):
        layout = batch["layout"]
        preds, out = model(batch["pixels"].to(device), layout.to(device), cfg.run.attention)
        bounds = np.concatenate([[0], np.cumsum((layout.grids[:, 0] * layout.grids[:, 1]).numpy())])
        per = {"student/patches": out.patches.float().cpu().numpy()}
        for t in teachers:
            per[f"student/{t}"] = model.spaces[t]["patches"].denormalize(preds[t]["patches"]).float().cpu().numpy()
            per[f"teacher/{t}"] = batch["targets"][t]["patches"].float().numpy()
        for name, values in per.items():
            feats.setdefault(name, []).extend(values[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        rows.append(batch["rows"].numpy())
        grids += [(int(g[0]), int(g[1])) for g in layout.grids.numpy()]
    return PatchFeatures(np.concatenate(rows) if rows else np.zeros(0, np.int64), grids, feats)
