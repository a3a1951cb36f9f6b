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

__all__ = ["arkd_errors", "arkd_loss", "tas_loss", "cosine_distance", "smooth_l1", "feature_distance", "per_image_mean", "distillation_terms",
           "relational_terms", "relational_error"]


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


# ----------------------------------------------------------------------------- ARKD (AMoE Eq. 7)
def _normalized_pdist(x: torch.Tensor) -> torch.Tensor:
    """Pairwise distances ‖x_i − x_j‖₂ over i < j (``torch.pdist``'s order), divided by their mean.

    From the Gram matrix in float64: O(B²) memory forward and backward (``torch.pdist``'s CUDA backward
    allocates B²·D floats: gigabytes for a global batch of hundreds of images), and float64 keeps
    |x_i|² + |x_j|² − 2·x_i·x_j accurate for close pairs. A zero distance gets a zero gradient."""
    x = x.double()
    sq = (x * x).sum(-1)
    i, j = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    d2 = sq[i] + sq[j] - 2.0 * (x @ x.T)[i, j]
    d = torch.sqrt(d2.clamp_min(1e-30))
    return (d / d.mean().clamp_min(1e-12)).float()


def arkd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Asymmetric relational KD over the B images of a batch (AMoE §3.2, Eq. 7), in float32.

    The extracted text lost Eq. 7's symbols; the project's reading (issue 13; change it only with an
    argument in the README):

        D^T_ij = ‖t_i − t_j‖₂, D^S_ij = ‖s_i − s_j‖₂ for i < j;  d = D / mean_{i<j}(D)   (each space its own scale)
        m = median_{i<j} d^T_ij  (for an even count the lower middle value, as torch.median)
        e_ij = max(0, d^S_ij − d^T_ij)   if d^T_ij ≤ m   (near: only pull together what the teacher holds close)
        e_ij = max(0, d^T_ij − d^S_ij)   otherwise        (far: only push apart what the teacher holds apart)
        L_ARKD = mean_{i<j} smoothL1_β=1(e_ij)   (0.5·e² for e < 1, e − 0.5 otherwise)

    Scale-free in both spaces, so isotropic PHI-S (a scaled rotation plus a shift) leaves it unchanged
    (a legacy PCA-whitened space would not). The teacher side carries no gradient. Fewer than two images: 0 (still connected to ``student``).
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"arkd_loss needs [B, D] student and teacher of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[0] < 2:
        return student.float().sum() * 0.0
    with torch.no_grad():
        d_t = _normalized_pdist(teacher.float())
    error = arkd_errors(_normalized_pdist(student.float()), d_t)
    return F.smooth_l1_loss(error, torch.zeros_like(error), beta=1.0)


def arkd_errors(d_s: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """One-sided errors e_ij of normalized pair distances (Eq. 7): near pairs (d^T ≤ median) count only
    when the student holds them further apart, far pairs only when it holds them closer."""
    near = d_t <= d_t.median()
    return torch.where(near, (d_s - d_t).clamp_min(0), (d_t - d_s).clamp_min(0))


def relational_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean |d^S − d^T| over the pairs (the two-sided relational error the README reports, no gradient)."""
    with torch.no_grad():
        return float((_normalized_pdist(student.float()) - _normalized_pdist(teacher.float())).abs().mean())


def relational_terms(preds: dict[str, dict[str, torch.Tensor]], targets: dict[str, dict[str, torch.Tensor]],
                     cfg: LossConfig, share: float, gather=None) -> dict[str, torch.Tensor]:
    """``"<teacher>/arkd"``: w_t · λ_arkd · L_ARKD over the summaries of the images of every rank.

    ``gather(rows)`` returns every rank's rows in rank order with this rank's rows still attached to the
    graph (``train.distributed.gather_rows``; None: one process). Each rank then computes the same
    loss and back-propagates it through its own rows only, so the summed gradients are the gradient of
    L_ARKD over the whole batch; the value carried is 1/world of it (``share`` also splits it over
    accumulation), so summing the logged terms over ranks gives it once. With gradient accumulation
    the pairs are those of one microbatch slot over all ranks (the global batch when accumulation is 1):
    pairs across microbatches would keep every microbatch's activations alive until the step ends.
    """
    weights = {t: cfg.arkd_weight(t) * cfg.teacher_weights.get(t, 1.0) for t in preds}
    active = [t for t, w in weights.items() if w]
    if not active:
        return {}
    live = torch.cat([preds[t]["summary"].float() for t in active] + [targets[t]["summary"].float() for t in active], 1)
    every, world = (live, 1) if gather is None else gather(live)
    terms, col = {}, 0
    width = sum(preds[t]["summary"].shape[1] for t in active)
    for t in active:
        dim = preds[t]["summary"].shape[1]
        loss = arkd_loss(every[:, col:col + dim], every[:, width + col:width + col + dim])
        col += dim
        # value loss/world, gradient of the whole loss: see the docstring
        terms[f"{t}/arkd"] = weights[t] * share * (loss.detach() / world + (loss - loss.detach()))
    return terms


# ----------------------------------------------------------------------------- TAS (M²oT Eq. 8)
def tas_loss(expert_out: torch.Tensor, router_logits: torch.Tensor, topk_idx: torch.Tensor, pi: torch.Tensor,
             targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Teacher-Aware Specialization loss of one MoE layer (M²oT §4.2, Eq. 8) over tokens that have targets.

        L_tas = E_x[ Σ_{e ∈ top-k(x)} softmax(r(x))_e · ‖φ(x, e) − T̄(x, e)‖₁ ],  T̄(x, e) = Σ_i π(x, e, T_i) · T_i(x)

    expert_out [T, k, d]: φ(x, e) of each chosen expert; router_logits [T, E]: r(x); topk_idx [T, k];
    pi [T, E, N]: the teacher-aware router's distribution over teachers per expert (``train.moe.tas``);
    targets [N, T, d]: each teacher's target of the token in the experts' width; weights [T]: the
    token's share of E_x. Reconstruction: ‖·‖₁ is taken as the mean over the d channels (the sum would
    grow with the width and change what λ1 = 0.5 means), and E_x as each image's mean over its patch
    tokens averaged over the global batch (AMoE's per-image normalization: ``weights`` = 1 / (N_i · B)).
    The softmax is Eq. 8's, whatever score the router gates with; gradients reach the experts, the
    router and π.
    """
    probs = router_logits.float().softmax(-1).gather(1, topk_idx)  # [T, k]
    mix = pi.gather(1, topk_idx.unsqueeze(-1).expand(-1, -1, pi.shape[-1]))  # [T, k, N]
    target = torch.einsum("tkn,ntd->tkd", mix, targets.float())
    error = (expert_out.float() - target).abs().mean(-1)  # [T, k]
    return ((probs * error).sum(-1) * weights).sum()
