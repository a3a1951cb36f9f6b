"""Sparse Mixture-of-Experts MLP for the student: router, dropless dispatch, grouped GEMM backends.

``ops`` holds the compute (dispatch, grouped GEMM in triton / torch / loop); the modules here hold
parameters (MegaBlocks-style split).
"""

from .experts import MoEMLP, expert_activation, fine_grained_hidden
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

__all__ = [
    "MoEMLP",
    "Router",
    "RouterOutput",
    "expert_activation",
    "expert_fractions",
    "expert_usage_entropy",
    "fine_grained_hidden",
    "load_balance_loss",
    "router_z_loss",
    "routing_aux",
    "token_routing_entropy",
]
