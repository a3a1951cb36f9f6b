"""Sparse upcycling (Komatsuzaki et al. 2022; M2oT Sec. 4.1): experts start as copies of a dense MLP.

The one home of upcycling: one MLP into an MoE layer (``upcycle_into``) and a whole dense model's
state into its sparse twin (``upcycle_model``); the trainer only hands over the dense checkpoint.

With renormalized top-k gates (they sum to 1) an upcycled MoE computes exactly the dense MLP before
its first update, ``sum_j g_tj * MLP(x_t) = MLP(x_t)``, whatever the router picks. Optional noise
breaks the symmetry between the copies: each expert gets ``W + noise_std * std(W) * N(0, 1)``, i.e.
noise relative to the scale of the weight it perturbs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .expert_choice import ExpertChoiceMLP
from .soft_moe import SoftMoEMLP
from .token_choice import MoEMLP

__all__ = ["upcycle_into", "upcycle_mlp_into_experts", "upcycle_model"]


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
    moe.experts.load_stacked(upcycle_mlp_into_experts(dense_fc1, dense_fc2, moe.num_experts, noise_std, generator))
    return moe


def _dense_linear(state: dict[str, torch.Tensor], key: str) -> nn.Linear:
    if f"{key}.weight" not in state:
        raise ValueError(f"dense checkpoint has no {key}: is it a dense student of the same depth?")
    weight = state[f"{key}.weight"]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{key}.bias" in state)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(state[f"{key}.bias"])
    return layer


@torch.no_grad()
def upcycle_model(model: nn.Module, dense_state: dict[str, torch.Tensor], noise_std: float = 0.0, seed: int = 0,
                  *, fresh: tuple[str, ...] = ()) -> None:
    """Load a dense model's state into its sparse twin, copying each dense MLP into every expert.

    The two models differ only in the MLPs of the sparse blocks: where ``model`` has a token-choice
    MoE layer at path ``P``, the dense state has ``P.fc1`` and ``P.fc2``. Everything else is loaded as
    it is; routers, and the parts named by a ``fresh`` prefix (ones a dense run cannot have, such as
    teacher-aware routers), keep their fresh init. With renormalized top-k gates and no noise the
    upcycled model computes exactly what the dense one did. Any other key missing on either side is an error.
    """
    generator = torch.Generator().manual_seed(seed)
    sparse: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, (SoftMoEMLP, ExpertChoiceMLP)):
            raise ValueError("upcycling needs token-choice top-k MoE blocks (model.moe.kind = topk)")
        if isinstance(module, MoEMLP):
            upcycle_into(module, _dense_linear(dense_state, f"{path}.fc1"), _dense_linear(dense_state, f"{path}.fc2"),
                         noise_std, generator)
            sparse.append(f"{path}.")
    inside = tuple(sparse)
    rest = {k: v for k, v in dense_state.items() if not k.startswith(inside)}
    own = {k for k in model.state_dict() if not k.startswith(inside) and not (fresh and k.startswith(fresh))}
    missing, unexpected = sorted(own - set(rest)), sorted(set(rest) - own)
    if missing or unexpected:
        raise ValueError(f"dense checkpoint does not match the sparse model outside its MoE layers: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(rest, strict=False)
