"""The experts of an MoE layer: stacked MLP weights and the two ways they compute.

Expert weights are stored stacked in ``x @ W`` layout: ``w1 [E, d, h]`` (``[E, d, 2h]`` for the
gated SwiGLU experts of the AMoE release, gate columns first) and ``w2 [E, h, d]``, which is what
the grouped GEMM takes without a transpose. ``ExpertBank.grouped`` runs all experts on rows sorted by
expert (dropless token choice, ragged groups); ``ExpertBank.forward`` on equal-size slot batches
``[E, C, d]`` (Soft MoE, expert choice), where a plain bmm suffices.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.grouped_gemm import Backend, grouped_gemm, resolve_backend

Activation = Literal["gelu", "swiglu"]


def fine_grained_hidden(dim: int, mlp_ratio: float, top_k: int, multiple_of: int = 1) -> int:
    """Expert hidden size so that ``k`` active experts cost the FLOPs of one dense MLP of ``mlp_ratio*dim``.

    Fine-grained MoE (as M2oT does following Ludziejewski et al.): hidden shrinks as k grows.
    """
    h = int(round(mlp_ratio * dim / top_k))
    return max(multiple_of, (h + multiple_of - 1) // multiple_of * multiple_of)


def autocast_operands(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the grouped GEMMs' operands in the autocast dtype (as autocast casts a matmul's):
    the grouped-GEMM operators are not autocast-aware, and would otherwise compute in float32 (or see
    mixed dtypes). Gradients flow back through the casts to the float32 weights."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *weights)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in (x, *weights))


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

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])

    @torch.no_grad()
    def load_stacked(self, weights: dict[str, torch.Tensor]) -> None:
        """Set ``w1``, ``b1``, ``w2``, ``b2`` from stacked tensors of the same shapes (upcycling).

        A bank without biases accepts only all-zero ones, so nothing given is silently dropped."""
        for name, value in weights.items():
            param = getattr(self, name)
            if param is None:
                if value.abs().max() > 0:
                    raise ValueError(f"the experts have no {name} but the weights give a non-zero one")
                continue
            if param.shape != value.shape:
                raise ValueError(f"{name}: expert shape {tuple(param.shape)} != given {tuple(value.shape)}")
            param.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expert e on ``x[e]``: ``[E, C, d] -> [E, C, d]``."""
        return batched_experts(x, self.w1, self.b1, self.w2, self.b2, self.activation)

    def grouped(self, x_sorted: torch.Tensor, expert_idx: torch.Tensor, offsets: torch.Tensor,
                backend: Backend = "auto") -> torch.Tensor:
        """Rows sorted by expert (``offsets`` [E] int32 end offsets, ``expert_idx`` [rows] the expert of
        each): two grouped GEMMs around the activation, no padding, no dropped rows."""
        backend = resolve_backend(backend, x_sorted.device)
        x_sorted, w1, w2 = autocast_operands(x_sorted, self.w1, self.w2)
        h = grouped_gemm(x_sorted, w1, offsets, backend)
        if self.b1 is not None:
            h = h + self.b1.index_select(0, expert_idx)
        h = expert_activation(h, self.activation)
        y = grouped_gemm(h.to(w2.dtype), w2, offsets, backend)
        if self.b2 is not None:
            y = y + self.b2.index_select(0, expert_idx)
        return y
