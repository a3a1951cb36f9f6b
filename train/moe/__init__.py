"""Sparse Mixture-of-Experts MLPs for the student: router, experts, token choice, baselines, upcycling.

``ops`` holds the kernels (dispatch, grouped GEMM in triton / torch / loop: functions, no parameters);
the modules here hold parameters and call the kernels (MegaBlocks-style split): ``experts`` (the
stacked expert weights and the two ways they compute), ``router``, ``token_choice`` (the main top-k
layer), ``soft_moe`` and ``expert_choice`` (baselines), ``groups`` (which tokens a layer sees),
``upcycle`` (dense -> sparse), ``tas`` and ``tgr`` (routers that read teacher targets or teacher
layers: M²oT's teacher-aware router, TGR-MoE's teacher routers).
"""

from .expert_choice import ExpertChoiceMLP, expert_capacity
from .experts import ExpertBank, batched_experts, expert_activation, fine_grained_hidden
from .groups import TokenGroups, per_group
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
from .token_choice import MoEMLP
from .upcycle import upcycle_into, upcycle_mlp_into_experts, upcycle_model

__all__ = [
    "ExpertBank",
    "ExpertChoiceMLP",
    "MoEMLP",
    "Router",
    "RouterOutput",
    "SoftMoEMLP",
    "TokenGroups",
    "batched_experts",
    "expert_activation",
    "expert_capacity",
    "expert_fractions",
    "expert_usage_entropy",
    "fine_grained_hidden",
    "load_balance_loss",
    "per_group",
    "router_z_loss",
    "routing_aux",
    "slots_for_topk",
    "token_routing_entropy",
    "upcycle_into",
    "upcycle_mlp_into_experts",
    "upcycle_model",
]
