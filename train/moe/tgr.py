"""TGR-MoE: a router on frozen teacher features guides the student's router (supplement Eq. S1–S3, Table S1).

The teacher's features come from the store (``teachers/<name>/layers/<k>``), never from a teacher
loaded here. The supplement writes the losses out only for its upper bound (§B) and gives neither the
form of L_distill nor the sign of the entropy term; what we chose:

- **Teacher router**: a parameter-free LayerNorm of the cached block output, then a router of the
  student's own type (linear D_T → E, same score function, top-k and gate renormalization) with its
  own logit noise (Table S1: std 1.0). The norm stands in for the pre-MLP norm a router placed inside
  the teacher would read: a ViT's residual stream has channels of very uneven scale, which a linear
  router initialized at std 0.02 would not see past.
- **Tokens**: layers are cached per patch token, so only patch tokens are guided; CLS and register
  tokens are always routed by the student router and get no routing distillation (in the upper bound
  with detached gates and, as S3 has no load balancing for the student router, none for them either).
- Like the load balancing, L_distill reaches the student's backbone through the router's input, not
  only the router.
- **L_distill^(i)** = mean over patch tokens of KL(p_T ‖ p_S) between the two routers' distributions
  of their clean logits (``router.router_distill_loss``), the teacher's detached.
- **L_ent^(i)** = the teacher router's mean normalized token entropy (``router.token_routing_entropy``
  of its clean distribution), *minimized* (+λ_ent): with its load balancing keeping expert use even
  over the batch, it asks for confident teacher routing, a prior worth distilling. Maximizing it would
  push the teacher toward uniform routing, which guides nothing.
- **Upper bound** (``routes = "teacher"``, §5.3 and Eq. S1–S3): the teacher router picks and gates the
  patch tokens' experts, so L_task reaches it through the gates; the student router is not used in the
  forward, its gates are detached and its own load balancing is off, so it learns only from
  λ_distill Σ L_distill (S2, S3) and routes for the first time at inference.
- **TGR-MoE** (``routes = "student"``): the student router picks and gates. S1 trains the teacher
  router with the task loss too, which needs a path from L_task to it; we use the straight-through
  gates g_S + (g_T − sg(g_T)), with g_T the teacher router's gates for the experts the *student*
  picked: the forward value is exactly the student's (the same routing in training and at inference)
  and the gates' task gradient reaches both routers. The student router also keeps its own load
  balancing (the V-MoE objective plus S2).

With top-1 routing and renormalized gates every gate is 1, so no router, guided or not, gets a task
gradient; the teacher router then learns from its load balancing and entropy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .router import (Router, RouterOutput, expert_fractions, expert_usage_entropy, load_balance_loss,
                     router_distill_loss, routing_distribution, token_routing_entropy)

__all__ = ["RouteGuide", "TeacherRouter", "guide_losses", "guided_route"]


class TeacherRouter(nn.Module):
    """The router of one guided MoE layer on a teacher layer's features ``[P, D_T]`` (see the module docstring)."""

    def __init__(self, teacher_dim: int, like: Router, noise_std: float):
        super().__init__()
        self.router = Router(teacher_dim, like.num_experts, like.top_k, score_func=like.score_func,
                             renormalize=like.renormalize, noise_std=noise_std)

    def forward(self, features: torch.Tensor) -> RouterOutput:
        x = features.float()
        return self.router(F.layer_norm(x, x.shape[-1:]))


@dataclass(frozen=True)
class RouteGuide:
    """The teacher router's decision for the tokens of one MoE layer that have teacher features."""

    rows: torch.Tensor  # [P] int64: positions of those tokens among the layer's routed tokens
    route: RouterOutput  # the teacher router's output for them, in ``rows`` order
    teacher_routes: bool  # the upper bound: the teacher router routes them (else the student does, TGR-MoE)


def guided_route(student: RouterOutput, guide: RouteGuide, router: Router) -> RouterOutput:
    """The routing the layer uses: the teacher's for guided tokens (upper bound) or the student's with
    straight-through teacher gates (TGR-MoE); see the module docstring."""
    rows, teacher = guide.rows, guide.route
    if guide.teacher_routes:
        detached = [t.detach() for t in (student.logits, student.probs, student.topk_weights)]
        return RouterOutput(detached[0], detached[1].index_copy(0, rows, teacher.probs.detach()),
                            detached[2].index_copy(0, rows, teacher.topk_weights),
                            student.topk_idx.index_copy(0, rows, teacher.topk_idx))
    g_teacher = router.gates_at(teacher.scores, student.topk_idx.index_select(0, rows))
    delta = torch.zeros_like(student.topk_weights).index_copy(0, rows, g_teacher - g_teacher.detach())
    return student._replace(topk_weights=student.topk_weights + delta)


def guide_losses(student: RouterOutput, guide: RouteGuide, router: Router) -> dict[str, torch.Tensor]:
    """One guided layer's losses (with grad) and metrics (detached), before the weights of ``model.moe.tgr``:
    ``router_distill`` (L_distill, S2), ``guide_load_balance_loss`` (the teacher router's L_load, S1),
    ``guide_entropy`` (L_ent), ``guide_agreement`` (share of guided tokens whose clean top-1 expert is the
    same for both routers: what the student router has learned), ``guide_usage_entropy``."""
    teacher, logits = guide.route, student.logits.index_select(0, guide.rows)
    out = {"router_distill": router_distill_loss(logits, teacher.logits, router.score_func),
           "guide_load_balance_loss": load_balance_loss(teacher.probs, teacher.topk_idx),
           "guide_entropy": token_routing_entropy(routing_distribution(teacher.logits, router.score_func))}
    with torch.no_grad():
        same = (logits.argmax(-1) == teacher.logits.argmax(-1)).float()
        out["guide_agreement"] = same.mean() if same.numel() else same.sum()
        out["guide_usage_entropy"] = expert_usage_entropy(expert_fractions(teacher.topk_idx, router.num_experts))
    return out
