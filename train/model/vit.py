"""The student: a native-resolution ViT over packed sequences, dense or with sparse MoE MLPs.

Every image contributes CLS, ``R`` registers (Darcet et al.; AMoE uses 4 like DINOv3) and its patch
tokens; ``PackedLayout`` says which slot of the ``[seqs, seq_len]`` grid each token occupies. Blocks
are pre-norm (norm → attention with RoPE → residual, norm → MLP → residual). The MLP, dense or sparse,
is called one way (``mlp.py``): padding never reaches a router, and a sparse MLP's auxiliary outputs
are collected per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from ..moe import TokenGroups
from ..moe.tgr import RouteGuide
from ..packing import PackedLayout
from .attention import Attention, DocumentMask, document_mask
from .mlp import build_mlp
from .rope import GoldenRope

__all__ = ["Block", "Student", "StudentOutput"]


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=1e-6)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool):
        super().__init__()
        self.norm1 = _norm(cfg.norm, cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm)
        self.norm2 = _norm(cfg.norm, cfg.dim)
        self.sparse = sparse
        self.mlp = build_mlp(cfg, sparse)

    def forward(self, x: torch.Tensor, rope, mask: DocumentMask, tokens: TokenGroups, guide: RouteGuide | None = None
                ) -> tuple[torch.Tensor, dict]:
        x = x + self.attn(self.norm1(x), rope, mask)
        y, aux = self.mlp(self.norm2(x), tokens=tokens, **({"guide": guide} if guide is not None else {}))
        return x + y, aux


@dataclass
class StudentOutput:
    cls: torch.Tensor  # [B, D] after the final norm
    registers: torch.Tensor  # [B, R, D]
    patches: torch.Tensor  # [T, D] in layout.patch_pos order
    aux: list[dict] = field(default_factory=list)  # one dict per MoE block


class Student(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Linear(3 * p * p, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.reg_tokens = nn.Parameter(torch.zeros(cfg.registers, cfg.dim))
        head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
        self.rope = GoldenRope(head_dim, cfg.rope_base)
        sparse = set(cfg.moe_layer_ids())
        self.blocks = nn.ModuleList(Block(cfg, i in sparse) for i in range(cfg.depth))
        self.norm = _norm(cfg.norm, cfg.dim)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).repeat_interleave(p * p), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).repeat_interleave(p * p), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.reg_tokens, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def rope_coords(self, layout: PackedLayout) -> torch.Tensor:
        """The layout's per-image normalized coordinates (AMoE suppl. §8), or, for the ablation
        ``rope_coords = "patches"``, the same positions in patch units from the image centre divided by
        ``rope_ref_grid / 2``: a grid larger than the reference then reaches angles never seen in training."""
        if self.cfg.rope_coords == "normalized":
            return layout.coords
        scale = layout.grids.to(layout.coords.dtype)[layout.patch_image] / self.cfg.rope_ref_grid  # [T, 2]
        return layout.coords.index_put((layout.patch_pos,), layout.coords[layout.patch_pos] * scale)

    def forward(self, pixels: torch.Tensor, layout: PackedLayout, attention: str = "auto",
                guides: dict[int, RouteGuide] | None = None) -> StudentOutput:
        """``pixels`` [T, 3·p·p] uint8 or float in [0, 1], patch rows in ``layout.patch_pos`` order; ``guides``:
        TGR-MoE's teacher routing for some MoE blocks, by block index (``train/moe/tgr.py``)."""
        S, L = layout.doc_ids.shape
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        tokens = self.patch_embed(((x - self.pixel_mean) / self.pixel_std).to(self.patch_embed.weight.dtype))
        B, R, D = layout.num_images, self.cfg.registers, self.cfg.dim
        seq = tokens.new_zeros(S * L, D)
        seq = seq.index_copy(0, layout.patch_pos, tokens)
        seq = seq.index_copy(0, layout.cls_pos, self.cls_token.expand(B, D).to(seq.dtype))
        if R:
            seq = seq.index_copy(0, layout.reg_pos.reshape(-1), self.reg_tokens.repeat(B, 1).to(seq.dtype))
        rope = self.rope(self.rope_coords(layout).reshape(S, L, 2))
        mask = document_mask(layout.doc_ids, attention)
        tokens = TokenGroups.from_doc_ids(layout.doc_ids)
        x, aux = seq.reshape(S, L, D), []
        guides = guides or {}
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, rope, mask, tokens, guides.get(i))
            if block.sparse:
                aux.append(block_aux)
        x = self.norm(x).reshape(S * L, D)
        return StudentOutput(
            cls=x.index_select(0, layout.cls_pos),
            registers=x.index_select(0, layout.reg_pos.reshape(-1)).reshape(B, R, D) if R else x.new_zeros(B, 0, D),
            patches=x.index_select(0, layout.patch_pos),
            aux=aux,
        )
