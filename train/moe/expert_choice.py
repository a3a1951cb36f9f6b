"""Expert-choice routing (Zhou et al. 2022), a baseline in TGR-MoE.

Experts pick tokens instead of tokens picking experts. For one sequence ``X [N, d]``:

    S = softmax(X W_r) over experts            [N, E]
    each expert j takes its top-c tokens by S[:, j], gate g = S[n, j]
    y_n = sum over experts that took n of  g * expert_j(x_n)

Every expert processes exactly ``c`` tokens (perfect balance, static shapes, plain bmm); a token may
be taken by several experts or by none (it then passes through as zero, the residual carries it).
TGR-MoE sets the capacity to match top-K compute: ``c = capacity_factor * K * N / E``.
Selection happens inside a group: each image named by ``tokens`` (``groups.TokenGroups``) of a
packed batch, or each sequence of dim -2 when ``tokens`` is None, so other images never compete.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .experts import Activation, ExpertBank
from .groups import TokenGroups, per_group
from .router import router_z_loss, token_routing_entropy


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float = 1.0) -> int:
    """Tokens per expert: ``ceil(capacity_factor * k * N / E)``, at least 1, at most N."""
    return min(num_tokens, max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts)))


class ExpertChoiceMLP(nn.Module):
    """``[..., N, d] -> ([..., N, d], aux)``; each expert takes ``expert_capacity(N, E, top_k)`` tokens."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *, capacity_factor: float = 1.0,
                 activation: Activation = "gelu", bias: bool = True, z_loss_weight: float = 1e-3,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.z_loss_weight = z_loss_weight
        self.proj = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.proj.weight, std=init_std)
        self.experts = ExpertBank(dim, hidden_dim, num_experts, activation, bias, init_std)

    def forward(self, x: torch.Tensor, tokens: TokenGroups | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x [..., N, d]`` (each row of dim -2 one sequence), or any ``[..., d]`` with ``tokens``
        naming the real rows and their images."""
        if tokens is not None:
            return per_group(self.forward, x, tokens)
        shape = x.shape
        xs = x.reshape(-1, shape[-2], shape[-1])  # [B, N, d]
        b, n, d = xs.shape
        e = self.num_experts
        c = expert_capacity(n, e, self.top_k, self.capacity_factor)
        logits = self.proj(xs)  # [B, N, E]
        probs = logits.float().softmax(-1)
        gates, token_idx = probs.topk(c, dim=1)  # [B, c, E]: expert j's chosen tokens in column j
        gates, token_idx = gates.transpose(1, 2), token_idx.transpose(1, 2)  # [B, E, c]
        rows = torch.gather(xs.unsqueeze(1).expand(b, e, n, d), 2, token_idx.unsqueeze(-1).expand(b, e, c, d))
        out_rows = self.experts(rows.transpose(0, 1).reshape(e, b * c, d)).reshape(e, b, c, d).transpose(0, 1)
        weighted = (out_rows.float() * gates.unsqueeze(-1)).reshape(b, e * c, d)
        y = torch.zeros(b, n, d, device=x.device, dtype=torch.float32)
        y = y.scatter_add(1, token_idx.reshape(b, e * c, 1).expand(b, e * c, d), weighted).to(x.dtype)

        z = router_z_loss(logits.reshape(b * n, e))
        with torch.no_grad():
            taken = torch.zeros(b, n, device=x.device).scatter_(1, token_idx.reshape(b, e * c), 1.0)
            aux = {
                "dropped_token_fraction": 1.0 - taken.mean(),
                "token_routing_entropy": token_routing_entropy(probs.reshape(b * n, e)),
            }
        aux["z_loss"] = z
        aux["router_loss"] = self.z_loss_weight * z
        aux["router_logits"] = logits.reshape(b * n, e)
        return y.reshape(shape), aux
