"""Per-teacher adaptor heads and the frozen teacher attention pool reused from the store's ``heads/``.

AMoE §3.1 / M²oT Eq. 1: a head g_t = Linear → LayerNorm → GELU → Linear projects student tokens into
teacher t's space. For a teacher whose summary is an attention pool over its patches (SigLIP2), the
student's projected patches go through that teacher's own frozen pool instead of a summary head, so
the pool is not re-learned (AMoE §3.1). The pool expects raw teacher patch features: when the patch
targets live in PHI-S space, the projected patches are mapped back with the unwhitening transform first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AdaptorHead", "TeacherHeads", "TeacherDims", "FrozenSummaryPool", "build_frozen_pool"]


class AdaptorHead(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@dataclass(frozen=True)
class TeacherDims:
    """The widths of a teacher's features and its register count, as the store records them."""

    name: str
    summary_dim: int
    patch_dim: int
    registers: int  # teacher registers supervised (0: none)
    register_dim: int


class FrozenSummaryPool(nn.Module):
    """summary = head(fc_norm(attn_pool(patches))), rebuilt from the tensors and config in ``heads/``."""

    def __init__(self, pool: nn.Module, fc_norm: nn.Module, head: nn.Module):
        super().__init__()
        self.pool, self.fc_norm, self.head = pool, fc_norm, head
        self.requires_grad_(False)

    def forward(self, patches: torch.Tensor, image: torch.Tensor, num_images: int) -> torch.Tensor:
        """Pool each image's patch rows (``image`` [T] says whose) into one summary: [B, D_summary]."""
        counts = torch.bincount(image, minlength=num_images)
        longest = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(image), device=image.device) - starts[image]
        padded = patches.new_zeros(num_images, longest, patches.shape[-1])
        padded[image, slot] = patches
        # additive key-padding mask: exact for timm's fused and unfused attention paths alike
        mask = patches.new_full((num_images, longest), float("-inf"))
        mask[image, slot] = 0.0
        return self.head(self.fc_norm(self.pool(padded, attn_mask=mask[:, None, None, :])))


_ACT = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": None}


def build_frozen_pool(tensors: dict[str, torch.Tensor], config: dict) -> FrozenSummaryPool:
    """Rebuild the pool from ``teachers/<t>/heads`` (written by cache-teachers) without the teacher library."""
    from timm.layers import AttentionPoolLatent

    pc = config.get("attn_pool")
    if not pc:
        raise ValueError("heads/ has no attn_pool config")
    act = pc.get("act_layer") or "gelu"
    if act not in _ACT or _ACT[act] is None:
        raise ValueError(f"unsupported attention-pool activation {act!r}")
    if pc["pos_embed"]:
        raise ValueError("attention pools with a positional embedding cannot take native-resolution grids")
    pool = AttentionPoolLatent(
        pc["in_features"], pc["out_features"] or None, embed_dim=pc["embed_dim"], num_heads=pc["num_heads"],
        mlp_ratio=pc["mlp_ratio"], latent_len=pc["latent_len"], latent_dim=pc["latent_dim"], pos_embed=pc["pos_embed"],
        pool_type=pc["pool_type"], qkv_bias=pc["qkv_bias"], qk_norm=pc["qk_norm"], act_layer=_ACT[act],
        **({"norm_layer": nn.LayerNorm} if pc.get("norm_layer") else {}),
    )
    pool.load_state_dict(_sub(tensors, "attn_pool."), strict=True)
    fc = config.get("fc_norm")
    fc_norm: nn.Module = nn.Identity()
    if fc:
        fc_norm = nn.LayerNorm(fc["dim"], eps=fc["eps"])
        fc_norm.load_state_dict(_sub(tensors, "fc_norm."), strict=True)
    hc = config.get("head")
    head: nn.Module = nn.Identity()
    if hc:
        head = nn.Linear(hc["in_features"], hc["out_features"], bias=hc["bias"])
        head.load_state_dict(_sub(tensors, f"head.{hc['name']}."), strict=True)
    return FrozenSummaryPool(pool, fc_norm, head)


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class TeacherHeads(nn.Module):
    """All heads of one teacher: ``summary`` (from CLS, unless a frozen pool), ``patches``, ``registers``;
    with ``share`` only ``patches``, which then projects every token (how its outputs are compared:
    ``DistillModel.project``)."""

    def __init__(self, spec: TeacherDims, dim: int, hidden: int, share: bool, pool: FrozenSummaryPool | None = None):
        super().__init__()
        self.spec = spec
        if share and len({spec.summary_dim, spec.patch_dim, spec.register_dim or spec.patch_dim}) > 1:
            raise ValueError(f"teacher {spec.name}: shared heads need equal summary/patch/register dims")
        self.share = share
        self.patches = AdaptorHead(dim, hidden, spec.patch_dim)
        self.pool = pool
        need_summary = pool is None and not share
        self.summary = AdaptorHead(dim, hidden, spec.summary_dim) if need_summary else None
        self.registers = AdaptorHead(dim, hidden, spec.register_dim) if spec.registers and not share else None
