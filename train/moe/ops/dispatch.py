"""Dropless token dispatch: sort (token, choice) pairs by expert and scatter results back.

Every (token, choice) pair is kept (no capacity, no dropping), so the number of dispatched rows is
always ``T * k``: a static shape. Counts and offsets are computed on the device with scatter-add and
cumsum, never with ``.item()``/``.tolist()``, so building a plan does not synchronize the host with
the GPU. ``torch.bincount`` is avoided on purpose: its CUDA kernel reads the input's maximum on the
host to size the output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DispatchPlan(NamedTuple):
    """Where each dispatched row comes from and which expert owns it (all on the input's device).

    order:        [T*k] flat (token*k + choice) index of the i-th sorted row
    token_idx:    [T*k] source token of the i-th sorted row
    expert_idx:   [T*k] expert of the i-th sorted row (non-decreasing)
    counts:       [E]   rows per expert (int64)
    offsets:      [E]   int32 end offset of each expert's rows (cumsum of counts), F.grouped_mm's `offs`
    """

    order: torch.Tensor
    token_idx: torch.Tensor
    expert_idx: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert over all top-k choices, on device and sync-free (scatter-add, not bincount)."""
    flat = topk_idx.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def make_plan(topk_idx: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the ``[T, k]`` expert choices by expert (stable, so rows keep token order inside a group)."""
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be [T, k], got shape {tuple(topk_idx.shape)}")
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return DispatchPlan(order, order // k, flat[order], counts, offsets)


def gather_rows(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``[T, d] -> [T*k, d]`` rows in expert order (autograd: scatter-add back onto the tokens)."""
    return x.index_select(0, plan.token_idx)


def scatter_combine(y_sorted: torch.Tensor, gates_sorted: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """``out[t] = sum over t's rows of gate * y`` (M2oT Eq. 4), via one weighted ``index_add``."""
    # Half-precision rows are summed in float32: k partial outputs added one by one in bf16 lose bits.
    acc = torch.float32 if y_sorted.dtype in (torch.float16, torch.bfloat16) else y_sorted.dtype
    weighted = y_sorted.to(acc) * gates_sorted.to(acc).unsqueeze(-1)
    out = weighted.new_zeros(num_tokens, y_sorted.shape[-1])
    return out.index_add(0, plan.token_idx, weighted).to(y_sorted.dtype)
