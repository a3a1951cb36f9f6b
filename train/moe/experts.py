"""Sparse MoE MLP: router -> dropless dispatch -> grouped GEMM (W1, act, W2) -> weighted combine.

A drop-in replacement for a transformer's dense MLP: ``[..., d] -> [..., d]``, plus an aux dict with
the router's losses and metrics. Output (M2oT Eq. 4): ``y_t = sum_{j in topk(t)} g_tj * e_j(x_t)``.

Expert weights are stored stacked in ``x @ W`` layout: ``w1 [E, d, h]`` (``[E, d, 2h]`` for the
gated SwiGLU experts of the AMoE release, gate columns first) and ``w2 [E, h, d]``, which is what
the grouped GEMM takes without a transpose.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.dispatch import gather_rows, make_plan, scatter_combine
from .ops.grouped_gemm import Backend, grouped_gemm, resolve_backend
from .router import Router, ScoreFunc, routing_aux

Activation = Literal["gelu", "swiglu"]


def fine_grained_hidden(dim: int, mlp_ratio: float, top_k: int, multiple_of: int = 1) -> int:
    """Expert hidden size so that ``k`` active experts cost the FLOPs of one dense MLP of ``mlp_ratio*dim``.

    Fine-grained MoE (as M2oT does following Ludziejewski et al.): hidden shrinks as k grows.
    """
    h = int(round(mlp_ratio * dim / top_k))
    return max(multiple_of, (h + multiple_of - 1) // multiple_of * multiple_of)


def expert_activation(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """GELU (exact erf form, as timm's Mlp) or SwiGLU ``silu(gate) * up`` on ``[gate | up]`` columns."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def batched_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: Activation,
) -> torch.Tensor:
    """Experts on equal-size slot batches ``x [E, C, d] -> [E, C, d]`` (Soft MoE, expert choice): plain bmm."""
    h = torch.bmm(x, w1) if b1 is None else torch.baddbmm(b1.unsqueeze(1), x, w1)
    h = expert_activation(h, activation)
    return torch.bmm(h, w2) if b2 is None else torch.baddbmm(b2.unsqueeze(1), h, w2)


class ExpertBank(nn.Module):
    """Stacked expert MLP weights ``w1 [E, d, h|2h]``, ``b1``, ``w2 [E, h, d]``, ``b2`` (``x @ W`` layout)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, activation: Activation = "gelu",
                 bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.activation = activation
        fc1_out = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, fc1_out))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, fc1_out)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        nn.init.trunc_normal_(self.w1, std=init_std)
        nn.init.trunc_normal_(self.w2, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batched_experts(x, self.w1, self.b1, self.w2, self.b2, self.activation)


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

    def experts_forward(self, x_sorted: torch.Tensor, expert_idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """All experts' MLPs on rows already sorted by expert: two grouped GEMMs around the activation."""
        backend = resolve_backend(self.backend, x_sorted.device)
        ex = self.experts
        h = grouped_gemm(x_sorted, ex.w1, offsets, backend)
        if ex.b1 is not None:
            h = h + ex.b1.index_select(0, expert_idx)
        h = expert_activation(h, self.activation)
        y = grouped_gemm(h, ex.w2, offsets, backend)
        if ex.b2 is not None:
            y = y + ex.b2.index_select(0, expert_idx)
        return y

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x [..., d] -> (y [..., d], aux)``; ``token_mask [...]`` (True = real token) only affects aux.

        aux: ``router_loss`` (= lb_weight * load_balance_loss + z_weight * z_loss), the two raw losses,
        ``router_logits`` [T, E] (with grad, for routing distillation), and detached metrics
        ``expert_usage_entropy``, ``token_routing_entropy``, ``expert_fraction`` [E], ``expert_idx`` [T, k].
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        mask = token_mask.reshape(-1) if token_mask is not None else None
        route = self.router(tokens)
        plan = make_plan(route.topk_idx, self.num_experts)
        y_sorted = self.experts_forward(gather_rows(tokens, plan), plan.expert_idx, plan.offsets)
        gates_sorted = route.topk_weights.reshape(-1).index_select(0, plan.order)
        out = scatter_combine(y_sorted, gates_sorted, plan, tokens.shape[0])

        aux = routing_aux(route, mask)
        aux["router_loss"] = self.load_balance_weight * aux["load_balance_loss"] + self.z_loss_weight * aux["z_loss"]
        aux["router_logits"] = route.logits
        aux["expert_idx"] = route.topk_idx.detach()
        return out.reshape(shape), aux

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden_dim}, experts={self.num_experts}, top_k={self.top_k}, "
            f"act={self.activation}, backend={self.backend}"
        )
