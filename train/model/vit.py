"""The student: a native-resolution ViT over packed sequences, dense or with sparse MoE MLPs.

Every image contributes CLS, ``R`` registers (Darcet et al.; AMoE uses 4 like DINOv3) and its patch
tokens; ``PackedLayout`` says which slot of the ``[seqs, seq_len]`` grid each token occupies. Blocks
are pre-norm (norm → attention with RoPE → residual, norm → MLP → residual). An MoE MLP only sees the
real tokens (padding never reaches a router), and its auxiliary outputs are collected per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..moe import ExpertChoiceMLP, MoEMLP, SoftMoEMLP, fine_grained_hidden
from ..packing import PackedLayout
from .attention import Attention, DocumentMask, document_mask
from .rope import GoldenRope

__all__ = ["Student", "StudentOutput", "DenseMLP", "patchify"]


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``[3, H, W] -> [gh*gw, 3*patch*patch]`` in row-major patch order, channels outermost per patch."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


class DenseMLP(nn.Module):
    """fc1 → GELU → fc2, or SwiGLU with fc1 producing ``[gate | up]`` (the experts' column layout)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden * (2 if activation == "swiglu" else 1), bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.fc2(h)


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=1e-6)


def _moe_mlp(cfg: ModelConfig) -> nn.Module:
    m = cfg.moe
    hidden = m.hidden or cfg.hidden
    if m.fine_grained:
        hidden = fine_grained_hidden(cfg.dim, hidden / cfg.dim, m.top_k)
    if m.kind == "topk":
        return MoEMLP(cfg.dim, hidden, m.experts, m.top_k, activation=cfg.activation, bias=m.bias, backend=m.backend,
                      score_func=m.score, renormalize=m.renormalize, noise_std=m.noise_std,
                      load_balance_weight=m.load_balance_weight, z_loss_weight=m.z_loss_weight)
    if m.kind == "expert_choice":
        return ExpertChoiceMLP(cfg.dim, hidden, m.experts, m.top_k, capacity_factor=m.capacity_factor,
                               activation=cfg.activation, bias=m.bias, z_loss_weight=m.z_loss_weight)
    return SoftMoEMLP(cfg.dim, hidden, m.experts, m.soft_slots, activation=cfg.activation, bias=m.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool):
        super().__init__()
        self.norm1 = _norm(cfg.norm, cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm)
        self.norm2 = _norm(cfg.norm, cfg.dim)
        self.sparse = sparse
        self.mlp = _moe_mlp(cfg) if sparse else DenseMLP(cfg.dim, cfg.hidden, cfg.activation)

    def forward(self, x: torch.Tensor, rope, mask: DocumentMask, real: torch.Tensor, doc_ids: torch.Tensor
                ) -> tuple[torch.Tensor, dict | None]:
        x = x + self.attn(self.norm1(x), rope, mask)
        h = self.norm2(x)
        if not self.sparse:
            return x + self.mlp(h), None
        flat = h.reshape(-1, h.shape[-1])
        if isinstance(self.mlp, MoEMLP):  # token choice: only real tokens are routed
            y_real, aux = self.mlp(flat.index_select(0, real))
            y = torch.zeros_like(flat).index_copy(0, real, y_real.to(flat.dtype))
        else:  # slot-based baselines mix tokens within a sequence: one image per "sequence" row
            y, aux = self._per_image(flat, real, doc_ids)
        return x + y.reshape(x.shape), aux

    def _per_image(self, flat: torch.Tensor, real: torch.Tensor, doc_ids: torch.Tensor):
        """Soft MoE / expert choice pick tokens among a group; the group must be one image, never a pack."""
        ids = doc_ids.reshape(-1).index_select(0, real)
        y = torch.zeros_like(flat)
        auxes = []
        for image in torch.unique(ids).tolist():
            rows = real[ids == image]
            out, aux = self.mlp(flat.index_select(0, rows).unsqueeze(0))
            y = y.index_copy(0, rows, out.squeeze(0).to(flat.dtype))
            auxes.append(aux)
        merged = {k: torch.stack([a[k] for a in auxes]).mean(0) for k in auxes[0]
                  if torch.is_tensor(auxes[0][k]) and all(a[k].shape == auxes[0][k].shape for a in auxes)}
        return y, merged


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

    @torch.no_grad()
    def upcycle_from(self, dense_state: dict[str, torch.Tensor], noise_std: float = 0.0, seed: int = 0) -> None:
        """Sparse upcycling (M²oT §4.1): load a dense student, copying each dense MLP into every expert.

        Everything but the MoE MLPs is loaded as is; routers keep their fresh init. With renormalized
        top-k gates and no noise, the upcycled student computes exactly what the dense one did.
        """
        from ..moe import upcycle_into

        own = self.state_dict()
        generator = torch.Generator().manual_seed(seed)
        for i, block in enumerate(self.blocks):
            if not block.sparse:
                continue
            if not isinstance(block.mlp, MoEMLP):
                raise ValueError("upcycling needs token-choice top-k MoE blocks (model.moe.kind = topk)")
            fc1, fc2 = nn.Linear(self.cfg.dim, block.mlp.hidden_dim), nn.Linear(block.mlp.hidden_dim, self.cfg.dim)
            for name, layer in (("fc1", fc1), ("fc2", fc2)):
                key = f"blocks.{i}.mlp.{name}"
                if f"{key}.weight" not in dense_state:
                    raise ValueError(f"dense checkpoint has no {key}: is it a dense student of the same depth?")
                layer.weight.copy_(dense_state[f"{key}.weight"])
                layer.bias.copy_(dense_state[f"{key}.bias"])
            upcycle_into(block.mlp, fc1, fc2, noise_std, generator)
        shared = {k: v for k, v in dense_state.items() if k in own and not self._is_sparse_key(k)}
        missing = [k for k in own if k not in shared and not self._is_sparse_key(k)]
        if missing:
            raise ValueError(f"dense checkpoint lacks {missing[:5]}")
        self.load_state_dict(shared, strict=False)

    def _is_sparse_key(self, key: str) -> bool:
        return key.startswith("blocks.") and ".mlp." in key and self.blocks[int(key.split(".")[1])].sparse

    def forward(self, pixels: torch.Tensor, layout: PackedLayout, attention: str = "auto") -> StudentOutput:
        """``pixels`` [T, 3·p·p] uint8 or float in [0, 1], patch rows in ``layout.patch_pos`` order."""
        S, L = layout.doc_ids.shape
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        tokens = self.patch_embed(((x - self.pixel_mean) / self.pixel_std).to(self.patch_embed.weight.dtype))
        B, R, D = layout.num_images, self.cfg.registers, self.cfg.dim
        seq = tokens.new_zeros(S * L, D)
        seq = seq.index_copy(0, layout.patch_pos, tokens)
        seq = seq.index_copy(0, layout.cls_pos, self.cls_token.expand(B, D).to(seq.dtype))
        if R:
            seq = seq.index_copy(0, layout.reg_pos.reshape(-1), self.reg_tokens.repeat(B, 1).to(seq.dtype))
        rope = self.rope(layout.coords.reshape(S, L, 2))
        mask = document_mask(layout.doc_ids, attention)
        real = torch.nonzero(layout.doc_ids.reshape(-1) >= 0).squeeze(1)
        x, aux = seq.reshape(S, L, D), []
        for block in self.blocks:
            x, block_aux = block(x, rope, mask, real, layout.doc_ids)
            if block_aux is not None:
                aux.append(block_aux)
        x = self.norm(x).reshape(S * L, D)
        return StudentOutput(
            cls=x.index_select(0, layout.cls_pos),
            registers=x.index_select(0, layout.reg_pos.reshape(-1)).reshape(B, R, D) if R else x.new_zeros(B, 0, D),
            patches=x.index_select(0, layout.patch_pos),
            aux=aux,
        )
