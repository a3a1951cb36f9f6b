"""Self-attention over packed sequences that never crosses images.

Two exact implementations of one mask (query and key belong to the same image, ``doc_ids`` equal):
FlexAttention with a block mask on CUDA (skips the off-diagonal blocks, AMoE §3.2), and a dense
boolean mask through ``scaled_dot_product_attention`` elsewhere (exact; O(L²) memory per sequence,
fine for the CPU sequence lengths here). Padding slots form their own "image" so no row is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

__all__ = ["Attention", "DocumentMask", "document_mask"]


@dataclass
class DocumentMask:
    kind: str  # "dense" or "flex"
    mask: Any  # [S, 1, L, L] bool, or a flex BlockMask


_compiled_flex = None


def _flex(cuda: bool):
    """Compiled FlexAttention on CUDA (fused kernel); eager elsewhere (a reference path, used by tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def document_mask(doc_ids: torch.Tensor, backend: str = "auto") -> DocumentMask:
    """The same-image mask for ``doc_ids`` [S, L]; backend "auto" picks flex on CUDA, dense elsewhere."""
    if backend == "auto":
        backend = "flex" if doc_ids.is_cuda else "dense"
    if backend == "dense":
        return DocumentMask("dense", (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]))
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        ids = doc_ids

        def same_image(b, h, q, k):
            return ids[b, q] == ids[b, k]

        S, L = doc_ids.shape
        # compiled on CUDA: the eager path materializes the whole [S, L, L] mask before blocking it
        return DocumentMask("flex", create_block_mask(same_image, S, None, L, L, device=doc_ids.device,
                                                      _compile=doc_ids.is_cuda))
    raise ValueError(f"unknown attention backend {backend!r} (auto, dense, flex)")


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; ``head_dim`` may differ from dim / heads (AMoE: 8 × 128 at dim 768)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = True,
                 qk_norm: bool = False):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: DocumentMask) -> torch.Tensor:
        S, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(S, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # CUDA autocast runs rms_norm in float32, so q and k leave their norms float32 while v stays bf16;
        # FlexAttention's backward refuses mixed dtypes (SDPA would cast them itself)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if mask.kind == "flex":
            out = _flex(q.is_cuda)(q, k, v, block_mask=mask.mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask)
        return self.proj(out.transpose(1, 2).reshape(S, L, self.num_heads * self.head_dim))
