"""Sparse Mixture-of-Experts MLP for the student: router, dropless dispatch, grouped GEMM backends.

``ops`` holds the compute (dispatch, grouped GEMM in triton / torch / loop); the modules here hold
parameters (MegaBlocks-style split).
"""

from .expert_choice import ExpertChoiceMLP, expert_capacity
from .experts import ExpertBank, MoEMLP, batched_experts, expert_activation, fine_grained_hidden
from .router import (
    Router,
    RouterOutput,
    expert_fractions,
    expert_usage_entropy,
    load_balance_loss,
    router_z_loss,
    routing_aux,
    token_routing_entropy,
)
from .soft_moe import SoftMoEMLP, slots_for_topk
from .upcycle import upcycle_into, upcycle_mlp_into_experts

__all__ = [
    "ExpertBank",
    "ExpertChoiceMLP",
    "MoEMLP",
    "Router",
    "RouterOutput",
    "SoftMoEMLP",
    "batched_experts",
    "expert_activation",
    "expert_capacity",
    "expert_fractions",
    "expert_usage_entropy",
    "fine_grained_hidden",
    "load_balance_loss",
    "router_z_loss",
    "routing_aux",
    "slots_for_topk",
    "token_routing_entropy",
    "upcycle_into",
    "upcycle_mlp_into_experts",
]
