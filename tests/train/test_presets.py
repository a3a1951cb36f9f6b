"""Named students built on the meta device: total and active parameters against counts done by hand."""

from __future__ import annotations

import torch

from train.config import ModelConfig
from train.model import Student
from train.moe import MoEMLP


def _counts(preset: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = Student(ModelConfig(preset=preset))
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEMLP):
            per_expert = sum(p[0].numel() for p in (m.experts.w1, m.experts.b1, m.experts.w2, m.experts.b2) if p is not None)
            inactive += (m.num_experts - m.top_k) * per_expert
    return total, total - inactive


def test_amoe_parameter_counts_by_hand():
    d, heads, hd, depth, E, k, h = 768, 8, 128, 18, 28, 6, 384
    attn = d * 3 * heads * hd + 3 * heads * hd + 2 * hd + heads * hd * d + d  # qkv(+bias), qk RMSNorm, proj(+bias)
    norms = 2 * d  # two RMSNorms (weight only)
    router = d * E  # no bias
    expert = d * 2 * h + h * d  # gated: [gate | up] then down, no biases
    stem = (3 * 16 * 16) * d + d + d + 4 * d + d  # patch embed, CLS, 4 registers, final RMSNorm
    total = stem + depth * (attn + norms + router + E * expert)
    active = stem + depth * (attn + norms + router + k * expert)
    assert _counts("amoe") == (total, active)
    assert (round(total / 1e9, 2), round(active / 1e9, 2)) == (0.50, 0.15)


def test_m2ot_b_parameter_counts_by_hand():
    d, depth, hidden, E, k = 768, 12, 3072, 8, 2
    attn = d * 3 * d + 3 * d + d * d + d
    norms = 2 * 2 * d  # two LayerNorms with bias
    mlp = d * hidden + hidden + hidden * d + d
    stem = (3 * 16 * 16) * d + d + d + 4 * d + 2 * d
    dense_block = attn + norms + mlp
    moe_block_total = attn + norms + d * E + E * mlp
    moe_block_active = attn + norms + d * E + k * mlp
    sparse = depth // 2  # every other block (1, 3, ..., 11)
    total = stem + (depth - sparse) * dense_block + sparse * moe_block_total
    active = stem + (depth - sparse) * dense_block + sparse * moe_block_active
    assert _counts("m2ot-b") == (total, active)
    assert round(dense_block / 1e6, 2) == 7.09  # a ViT-B block


def test_amoe_dense_equals_amoe_without_experts():
    dense_total, dense_active = _counts("amoe-dense")
    assert dense_total == dense_active
