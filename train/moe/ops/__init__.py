"""Compute kernels of the MoE layer (no nn.Modules here): dispatch and grouped GEMM backends."""

from .dispatch import DispatchPlan, expert_counts, gather_rows, make_plan, scatter_combine
from .grouped_gemm import BACKENDS, grouped_gemm, grouped_gemm_loop, grouped_gemm_torch, resolve_backend

__all__ = [
    "BACKENDS",
    "DispatchPlan",
    "expert_counts",
    "gather_rows",
    "grouped_gemm",
    "grouped_gemm_loop",
    "grouped_gemm_torch",
    "make_plan",
    "resolve_backend",
    "scatter_combine",
]
