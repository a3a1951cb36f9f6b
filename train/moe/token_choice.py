"""Token-choice top-k MoE MLP: router -> dropless dispatch -> the experts' grouped GEMM -> weighted combine.

A drop-in replacement for a block's dense MLP (the call every MLP of a block takes, see ``groups``),
plus an aux dict with the router's losses and metrics. Output (M2oT Eq. 4):
``y_t = sum_{j in topk(t)} g_tj * e_j(x_t)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .experts import Activation, ExpertBank
from .groups import TokenGroups
from .ops.dispatch import gather_rows, make_plan, scatter_combine
from .ops.grouped_gemm import Backend
from .router import Router, ScoreFunc, routing_aux
from .tgr import RouteGuide, guide_losses, guided_route

__all__ = ["MoEMLP"]


class MoEMLP(nn.Module):
    """Token-choice top-k MoE MLP with dropless dispatch; ``backend`` picks the grouped GEMM."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        activation: Activation = "gelu",
        bias: bool = True,
        backend: Backend = "auto",
        score_func: ScoreFunc = "softmax",
        renormalize: bool = True,
        noise_std: float = 0.0,
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.activation, self.backend = activation, backend
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.router = Router(
            dim, num_experts, top_k, score_func=score_func, renormalize=renormalize, noise_std=noise_std, init_std=init_std
        )
        self.experts = ExpertBank(dim, hidden_dim, num_experts, activation, bias, init_std)
        self.keep_expert_outputs = False  # set by a model trained with TAS (train.moe.tas)

    def forward(self, x: torch.Tensor, tokens: TokenGroups | None = None, guide: RouteGuide | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x [..., d] -> (y [..., d], aux)``; only the real rows named by ``tokens`` are routed (all when None).

        Groups do not matter to token choice: every token picks its experts alone.
        aux: ``router_loss`` (= lb_weight * load_balance_loss + z_weight * z_loss), the two raw losses,
        ``router_logits`` [T, E] (with grad, for routing distillation), and detached metrics
        ``expert_usage_entropy``, ``token_routing_entropy``, ``expert_fraction`` [E], ``expert_idx`` [T, k];
        with ``keep_expert_outputs``, also ``moe_input`` [T, d] and ``expert_out`` [T, k, d] (each choice's output).
        ``guide`` (TGR-MoE, ``tgr.py``; its rows index the routed tokens) adds the ``guide_losses`` to aux; when
        the teacher router routes, the metrics describe its routing and ``router_loss`` is 0 (Eq. S3).
        """
        if tokens is not None:
            y, aux = self.forward(tokens.gather(x), guide=guide)
            return tokens.scatter(y, like=x), aux
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.router(flat)
        guided = {}
        if guide is not None:
            guided = guide_losses(route, guide, self.router)
            route = guided_route(route, guide, self.router)
        plan = make_plan(route.topk_idx, self.num_experts)
        y_sorted = self.experts.grouped(gather_rows(flat, plan), plan.expert_idx, plan.offsets, self.backend)
        gates_sorted = route.topk_weights.reshape(-1).index_select(0, plan.order)
        out = scatter_combine(y_sorted, gates_sorted, plan, flat.shape[0])

        aux = routing_aux(route)
        aux["router_loss"] = self.load_balance_weight * aux["load_balance_loss"] + self.z_loss_weight * aux["z_loss"]
        if guide is not None and guide.teacher_routes:  # the student router learns only by distillation
            aux["router_loss"] = aux["router_loss"].detach() * 0
        aux.update(guided)
        aux["router_logits"] = route.logits
        aux["expert_idx"] = route.topk_idx.detach()
        if self.keep_expert_outputs:  # M²oT's TAS loss compares each chosen expert's own output with a target
            aux["moe_input"] = flat
            aux["expert_out"] = y_sorted.new_empty(y_sorted.shape).index_copy(0, plan.order, y_sorted).reshape(
                flat.shape[0], self.top_k, -1)
        return out.reshape(shape), aux

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden_dim}, experts={self.num_experts}, top_k={self.top_k}, "
            f"act={self.activation}, backend={self.backend}"
        )
