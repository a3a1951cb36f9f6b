"""Sparse upcycling (Komatsuzaki et al. 2022; M2oT Sec. 4.1): experts start as copies of a dense MLP.

With renormalized top-k gates (they sum to 1) an upcycled MoE computes exactly the dense MLP before
its first update, ``sum_j g_tj * MLP(x_t) = MLP(x_t)``, whatever the router picks. Optional noise
breaks the symmetry between the copies: each expert gets ``W + noise_std * std(W) * N(0, 1)``, i.e.
noise relative to the scale of the weight it perturbs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .experts import MoEMLP


def upcycle_mlp_into_experts(
    dense_fc1: nn.Linear,
    dense_fc2: nn.Linear,
    num_experts: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Stack ``num_experts`` copies of a dense ``fc1 -> act -> fc2`` MLP in :class:`MoEMLP`'s layout.

    Returns ``w1 [E, d, h]``, ``b1 [E, h]``, ``w2 [E, h, d]``, ``b2 [E, d]`` (zero biases where the
    dense layers have none).
    """
    if dense_fc1.out_features != dense_fc2.in_features:
        raise ValueError(f"fc1 out {dense_fc1.out_features} != fc2 in {dense_fc2.in_features}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")

    def stack(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().unsqueeze(0).repeat(num_experts, *([1] * t.dim()))
        if noise_std > 0:
            noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
            t = t + noise_std * t[0].std() * noise
        return t

    def bias(layer: nn.Linear) -> torch.Tensor:
        b = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        return b.detach().unsqueeze(0).repeat(num_experts, 1)

    return {
        "w1": stack(dense_fc1.weight.t()),
        "b1": bias(dense_fc1),
        "w2": stack(dense_fc2.weight.t()),
        "b2": bias(dense_fc2),
    }


@torch.no_grad()
def upcycle_into(moe: MoEMLP, dense_fc1: nn.Linear, dense_fc2: nn.Linear, noise_std: float = 0.0,
                 generator: torch.Generator | None = None) -> MoEMLP:
    """Overwrite ``moe``'s experts with copies of a dense GELU MLP (the router keeps its own init)."""
    if moe.activation != "gelu":
        raise ValueError("upcycling copies a dense fc1 -> GELU -> fc2 MLP; the MoE must use activation='gelu'")
    weights = upcycle_mlp_into_experts(dense_fc1, dense_fc2, moe.num_experts, noise_std, generator)
    for name, value in weights.items():
        param = getattr(moe.experts, name)
        if param is None:
            if value.abs().max() > 0:
                raise ValueError(f"the MoE has no {name} but the dense MLP has a non-zero bias")
            continue
        if param.shape != value.shape:
            raise ValueError(f"{name}: MoE shape {tuple(param.shape)} != upcycled {tuple(value.shape)}")
        param.copy_(value)
    return moe
