"""Token-choice top-k router with its auxiliary losses and routing metrics.

M2oT Eq. 5: ``R(t) = TOP_k(softmax(r(t)))`` with ``r`` a linear map ``[d] -> [E]``, the k gates
not renormalized. Options: ``score_func="sigmoid"`` (independent expert scores: the AMoE public
release, ``tiiuae/siglino``'s ``MoEArgs``, which also does not renormalize), renormalized top-k gates,
and Gaussian noise on the logits while training (TGR-MoE Tab. S1: std 1.0). Which paper uses what is
set by the presets (``train/config.py``; README "Defaults vs the papers").

Auxiliary terms, all per layer:
- load balancing, M2oT Eq. 9: ``L_lb = E * sum_j F_j * P_j`` with ``F_j`` the fraction of the
  ``T*k`` top-k choices that went to expert j (no gradient) and ``P_j`` the mean routing probability
  of expert j (gradient). Uniform routing gives 1. (The text calls the expert count M.)
- router z-loss (ST-MoE; TGR-MoE Tab. S1 uses 1e-3 in a comparison only): ``mean_t (logsumexp_j logits_tj)^2``.
- normalized routing entropies, two distinct common forms (TGR-MoE Tab. S2 reports "normalized
  routing entropy"), both in [0, 1]:
  ``expert_usage_entropy  = H(F) / log E``           (how evenly the experts are used),
  ``token_routing_entropy = mean_t H(p_t) / log E``  (how undecided each token's router is).

Noise choice: top-k selection, gates and ``P_j`` use the noisy logits (what was actually routed);
the z-loss uses the clean logits (the quantity the router's weights control).
For ``sigmoid`` scores, ``P_j`` and the token entropy use scores normalized to sum 1 per token.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn as nn

ScoreFunc = Literal["softmax", "sigmoid"]


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # [T, E] clean router logits (with grad)
    probs: torch.Tensor  # [T, E] routing distribution (noisy logits in training; sums to 1 per token)
    topk_weights: torch.Tensor  # [T, k] gates multiplying the expert outputs
    topk_idx: torch.Tensor  # [T, k] int64 chosen experts
    scores: torch.Tensor | None = None  # [T, E] what the gates are read from (softmax or sigmoid of the routed logits)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Router math in at least float32 (bf16 softmax/logsumexp are too coarse), float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _masked_mean(v: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the leading (token) dim, ignoring masked-out tokens (sequence-packing padding)."""
    if token_mask is None:
        return v.mean(0)
    w = token_mask.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
    return (v * w).sum(0) / w.sum().clamp_min(1.0)


def expert_fractions(topk_idx: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F_j``: share of all top-k choices (T*k of them) that picked expert j; float32, no grad."""
    flat = topk_idx.reshape(-1).long()
    w = torch.ones(flat.shape, device=flat.device, dtype=torch.float32)
    if token_mask is not None:
        w = token_mask.to(torch.float32).repeat_interleave(topk_idx.shape[1])
    counts = torch.zeros(num_experts, device=flat.device, dtype=torch.float32).scatter_add_(0, flat, w)
    return counts / counts.sum().clamp_min(1.0)


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """M2oT Eq. 9: ``E * sum_j F_j P_j``; gradient flows through ``P_j`` only."""
    num_experts = probs.shape[-1]
    f = expert_fractions(topk_idx, num_experts, token_mask)
    p = _masked_mean(_upcast(probs), token_mask)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: ``mean_t logsumexp(logits_t)^2`` (keeps router logits small and softmax stable)."""
    lse = torch.logsumexp(_upcast(logits), dim=-1)
    return _masked_mean(lse.square(), token_mask)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def expert_usage_entropy(fractions: torch.Tensor) -> torch.Tensor:
    """``H(F) / log E`` of the per-expert assignment fractions; 1 = perfectly even use, 0 = one expert.

    With a single expert nothing can be unbalanced, so E = 1 returns 1.
    """
    e = fractions.shape[-1]
    if e == 1:
        return torch.ones((), device=fractions.device)
    return _entropy(_upcast(fractions)) / math.log(e)


def token_routing_entropy(probs: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_t H(p_t) / log E``; 1 = every token undecided (uniform), 0 = every token certain. E = 1 -> 1."""
    e = probs.shape[-1]
    if e == 1:
        return torch.ones((), device=probs.device)
    return _masked_mean(_entropy(_upcast(probs)), token_mask) / math.log(e)


class Router(nn.Module):
    """Linear router ``[T, d] -> [T, E]`` with top-k selection (M2oT Eq. 5)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: ScoreFunc = "softmax",
        renormalize: bool = True,
        noise_std: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize, self.noise_std = score_func, renormalize, noise_std
        self.proj = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.proj.weight, std=init_std)
        self.generator: torch.Generator | None = None  # optional private RNG for the noise

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.proj(x)
        routed = logits
        if self.training and self.noise_std > 0:  # TGR-MoE: Gaussian noise on the logits, training only
            noise = torch.randn(logits.shape, device=logits.device, dtype=logits.dtype, generator=self.generator)
            routed = logits + self.noise_std * noise
        routed = _upcast(routed)
        if self.score_func == "softmax":
            scores = probs = routed.softmax(-1)
        else:
            scores = routed.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        gates, idx = scores.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return RouterOutput(logits, probs, gates, idx, scores)

    def gates_at(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The gates this router would give the experts ``idx`` [T, k] (chosen by another router) from its ``scores``."""
        gates = scores.gather(1, idx)
        return gates / gates.sum(-1, keepdim=True) if self.renormalize else gates

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, score={self.score_func}, "
            f"renormalize={self.renormalize}, noise_std={self.noise_std}"
        )


def routing_distribution(logits: torch.Tensor, score_func: ScoreFunc) -> torch.Tensor:
    """A router's distribution over experts per token: softmax, or sigmoid scores normalized to sum 1."""
    logits = _upcast(logits)
    if score_func == "softmax":
        return logits.softmax(-1)
    scores = logits.sigmoid()
    return scores / scores.sum(-1, keepdim=True)


def router_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, score_func: ScoreFunc
                        ) -> torch.Tensor:
    """TGR-MoE's L_distill of one layer (Eq. S2; the form is our reconstruction, ``train/moe/tgr.py``):
    ``mean_t KL(p_T(t) ‖ p_S(t))`` over the routing distributions of the clean logits, the teacher's
    detached (the student follows; the teacher is not pulled toward it)."""
    target = routing_distribution(teacher_logits, score_func).detach()
    log_student = torch.log(routing_distribution(student_logits, score_func).clamp_min(1e-30))
    kl = (target * (torch.log(target.clamp_min(1e-30)) - log_student)).sum(-1)
    return kl.mean() if kl.numel() else kl.sum()


def routing_aux(out: RouterOutput, token_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-layer losses (with grad) and metrics (detached) for one routing decision."""
    e = out.probs.shape[-1]
    with torch.no_grad():
        frac = expert_fractions(out.topk_idx, e, token_mask)
        metrics = {
            "expert_fraction": frac,
            "expert_usage_entropy": expert_usage_entropy(frac),
            "token_routing_entropy": token_routing_entropy(out.probs, token_mask),
        }
    return {
        "load_balance_loss": load_balance_loss(out.probs, out.topk_idx, token_mask),
        "z_loss": router_z_loss(out.logits, token_mask),
        **metrics,
    }
