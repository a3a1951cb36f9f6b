"""Distillation losses with per-image token normalization (AMoE Eq. 1–6, M²oT Eq. 2).

Reconstruction of AMoE Eq. 1–6 (the extracted text lost the symbols), for teacher t and image i of the
global batch (all ranks r, sequences s, images j; B = total images in the step):

    (1) L_sum(i)   = d(ŝ_i, s_i)                                  summary (CLS head or frozen pool)
    (2) L_patch(i) = 1/N_i · Σ_{p=1..N_i} d(ẑ_{i,p}, z_{i,p})      N_i = patch tokens of image i
    (3) L_reg(i)   = 1/R   · Σ_{k=1..R}   d(r̂_{i,k}, r_{i,k})      R = teacher registers (DINOv3: 4)
    (4) L_t(i)     = L_sum(i) + L_patch(i) + L_reg(i)
    (5) L_t        = 1/B · Σ_r Σ_s Σ_j L_t(i_{r,s,j})             whatever the packing
    (6) L          = Σ_t w_t · L_t

with d = w_cos·(1 − cos) + w_sl1·smooth-L1 (M²oT Eq. 2, both metrics as in AM-RADIO; smooth-L1 is the
mean over channels). Summary and patches are compared in PHI-S space, registers in the raw space
(AMoE suppl. §6). Each microbatch returns its share Σ_{i in microbatch} L_t(i) / B, so summing the
microbatches of a step over accumulation and ranks gives exactly Eq. 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig

__all__ = ["cosine_distance", "smooth_l1", "feature_distance", "per_image_mean", "distillation_terms"]


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − cos per row (float32)."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 per row, averaged over channels (float32)."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(-1)


def feature_distance(pred, target, w_cos: float, w_sl1: float, beta: float) -> torch.Tensor:
    out = pred.new_zeros(pred.shape[:-1], dtype=torch.float32)
    if w_cos:
        out = out + w_cos * cosine_distance(pred, target)
    if w_sl1:
        out = out + w_sl1 * smooth_l1(pred, target, beta)
    return out


def per_image_mean(values: torch.Tensor, image: torch.Tensor, num_images: int) -> torch.Tensor:
    """Mean of token values per image, ``[T] -> [B]`` (the 1/N_i of Eq. 2)."""
    sums = torch.zeros(num_images, dtype=values.dtype, device=values.device).index_add_(0, image, values)
    counts = torch.bincount(image, minlength=num_images).clamp_min(1).to(values.dtype)
    return sums / counts


def distillation_terms(preds: dict[str, dict[str, torch.Tensor]], targets: dict[str, dict[str, torch.Tensor]],
                       patch_image: torch.Tensor, num_images: int, global_images: int, cfg: LossConfig
                       ) -> dict[str, torch.Tensor]:
    """Weighted loss terms ``"<teacher>/<feature>"``: this microbatch's share of Eq. 5 (sum over images / B)."""
    if global_images <= 0:
        raise ValueError("the global batch has no image")
    terms = {}
    for teacher, pred in preds.items():
        tgt = targets[teacher]
        w = cfg.teacher_weights.get(teacher, 1.0) / global_images
        per_image = {
            "summary": feature_distance(pred["summary"], tgt["summary"], cfg.summary_cos, cfg.summary_smooth_l1,
                                        cfg.smooth_l1_beta),
            "patches": per_image_mean(
                feature_distance(pred["patches"], tgt["patches"], cfg.patches_cos, cfg.patches_smooth_l1,
                                 cfg.smooth_l1_beta), patch_image, num_images),
        }
        if "registers" in pred:
            per_image["registers"] = feature_distance(pred["registers"], tgt["registers"], cfg.registers_cos,
                                                      cfg.registers_smooth_l1, cfg.smooth_l1_beta).mean(-1)
        for feature, values in per_image.items():
            terms[f"{teacher}/{feature}"] = w * values.sum()
    return terms
