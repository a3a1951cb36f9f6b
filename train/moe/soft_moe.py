"""Soft MoE (Puigcerver et al. 2023), a baseline in M2oT and TGR-MoE.

Each expert owns ``p`` slots. For one sequence ``X [N, d]`` and slot parameters ``Phi [d, E*p]``:

    logits = X Phi                         [N, E*p]
    D = softmax over tokens (dim 0)        dispatch: slot s reads  X~_s = sum_n D_ns x_n
    C = softmax over slots  (dim 1)        combine:  token n gets  y_n  = sum_s C_ns Y~_s
    Y~ = expert_{s // p}(X~_s)

No token is dropped and nothing is discrete, so there is no balancing loss. Mixing happens only
inside a group: the images named by ``tokens`` (``groups.TokenGroups``) of a packed batch, one at a
time, or each sequence of dim -2 when ``tokens`` is None. For padded sequences, ``token_mask``
removes padding from the dispatch softmax (padding then influences no slot) and zeros its output. Following the paper, ``normalize=True`` L2-normalizes
tokens and the slot parameters with a learned scale, which keeps logits tame at large ``d``.

TGR-MoE matches its compute to top-K token choice by ``p = K * N / E`` slots per expert
(``slots_for_topk``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import Activation, ExpertBank
from .groups import TokenGroups, per_group
from .router import token_routing_entropy


def slots_for_topk(num_tokens: int, num_experts: int, top_k: int) -> int:
    """Slots per expert so that Soft MoE processes as many rows as top-k routing (``k * N / E``)."""
    return max(1, math.ceil(top_k * num_tokens / num_experts))


class SoftMoEMLP(nn.Module):
    """``[..., N, d] -> ([..., N, d], aux)`` with ``num_experts * slots_per_expert`` soft slots."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, slots_per_expert: int, *,
                 activation: Activation = "gelu", bias: bool = True, normalize: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.slots_per_expert, self.normalize = num_experts, slots_per_expert, normalize
        self.phi = nn.Parameter(torch.empty(dim, num_experts * slots_per_expert))
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.experts = ExpertBank(dim, hidden_dim, num_experts, activation, bias, init_std)

    def slot_logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return x @ self.phi
        return self.scale * (F.normalize(x, dim=-1) @ F.normalize(self.phi, dim=0))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, *, tokens: TokenGroups | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x [..., N, d]`` (each row of dim -2 one sequence), or any ``[..., d]`` with ``tokens`` naming
        the real rows and their images; ``token_mask [..., N]`` (True = real) for padded sequences."""
        if tokens is not None:
            return per_group(self.forward, x, tokens)
        shape = x.shape
        xs = x.reshape(-1, shape[-2], shape[-1])  # [B, N, d]
        b, n, d = xs.shape
        logits = self.slot_logits(xs).float()  # [B, N, S]
        mask = None if token_mask is None else token_mask.reshape(b, n, 1)
        if mask is not None:
            logits_d = logits.masked_fill(~mask, float("-inf"))
        else:
            logits_d = logits
        dispatch = logits_d.softmax(dim=1).nan_to_num(0.0).to(x.dtype)  # over tokens; all-padding rows -> 0
        combine = logits.softmax(dim=2).to(x.dtype)  # over slots
        slots = torch.einsum("bns,bnd->bsd", dispatch, xs)  # [B, S, d]
        e, p = self.num_experts, self.slots_per_expert
        per_expert = slots.reshape(b, e, p, d).transpose(0, 1).reshape(e, b * p, d)
        out_slots = self.experts(per_expert).reshape(e, b, p, d).transpose(0, 1).reshape(b, e * p, d)
        y = torch.einsum("bns,bsd->bnd", combine, out_slots)
        if mask is not None:
            y = y * mask.to(y.dtype)
        with torch.no_grad():
            flat_mask = None if token_mask is None else token_mask.reshape(-1)
            aux = {"combine_entropy": token_routing_entropy(combine.reshape(b * n, -1).float(), flat_mask)}
        aux["router_loss"] = logits.new_zeros(())
        return y.reshape(shape), aux
