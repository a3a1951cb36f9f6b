"""The MLP of a block, dense or sparse, behind one call: ``mlp(x, tokens=tokens) -> (y, aux)``.

``x`` is the block's normalized input over every slot of the packed batch (``[S, L, D]``), ``tokens``
(``train.moe.TokenGroups``) names the real tokens and the image of each; ``aux`` holds a sparse
layer's routing losses and metrics (empty for the dense MLP). The dense MLP is position-wise and
ignores ``tokens``; token-choice top-k routes only real tokens; Soft MoE and expert choice mix tokens
within one image at a time. ``build_mlp`` picks the variant a block's config asks for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..moe import ExpertChoiceMLP, MoEMLP, SoftMoEMLP, TokenGroups, fine_grained_hidden

__all__ = ["DenseMLP", "build_mlp"]


class DenseMLP(nn.Module):
    """fc1 → GELU → fc2, or SwiGLU with fc1 producing ``[gate | up]`` (the experts' column layout)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden * (2 if activation == "swiglu" else 1), bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, tokens: TokenGroups | None = None) -> tuple[torch.Tensor, dict]:
        h = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.fc2(h), {}


def build_mlp(cfg: ModelConfig, sparse: bool) -> nn.Module:
    """A block's MLP: the dense one, or the ``model.moe.kind`` sparse layer for blocks in ``model.moe.layers``."""
    if not sparse:
        return DenseMLP(cfg.dim, cfg.hidden, cfg.activation)
    m = cfg.moe
    hidden = m.hidden or cfg.hidden
    if m.fine_grained:
        hidden = fine_grained_hidden(cfg.dim, hidden / cfg.dim, m.top_k)
    if m.kind == "topk":
        return MoEMLP(cfg.dim, hidden, m.experts, m.top_k, activation=cfg.activation, bias=m.bias, backend=m.backend,
                      score_func=m.score, renormalize=m.renormalize, noise_std=m.noise_std,
                      load_balance_weight=m.load_balance_weight, z_loss_weight=m.z_loss_weight)
    if m.kind == "expert_choice":
        return ExpertChoiceMLP(cfg.dim, hidden, m.experts, m.top_k, capacity_factor=m.capacity_factor,
                               activation=cfg.activation, bias=m.bias, z_loss_weight=m.z_loss_weight)
    return SoftMoEMLP(cfg.dim, hidden, m.experts, m.soft_slots, activation=cfg.activation, bias=m.bias)
