"""2-D rotary position embedding on per-image normalized coordinates (AMoE suppl. §8, "Golden RoPE").

Coordinates are patch centres mapped to [-1, 1] on each axis whatever the grid, so the rotation a
token sees depends on where it is in the image, not on the resolution: the student generalizes to
sizes it was not trained at. Each rotary pair k turns along its own direction θ_k = k·golden angle
(not only the x or y axis as axial RoPE does), with periods spaced geometrically from 1 to ``base``
(in units of the half image), following DINOv3's normalized-coordinate RoPE for the period range.
Tokens with coordinates (0, 0) — CLS, registers, padding — are not rotated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GoldenRope", "apply_rope"]

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


class GoldenRope(nn.Module):
    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        pairs = head_dim // 2
        k = torch.arange(pairs, dtype=torch.float64)
        periods = base ** (k / max(pairs - 1, 1))
        theta = k * GOLDEN_ANGLE
        # angle_k(y, x) = 2π (y·sin θ_k + x·cos θ_k) / period_k  =  coords @ freqs
        freqs = torch.stack([torch.sin(theta), torch.cos(theta)]) * (2 * math.pi / periods)
        self.register_buffer("freqs", freqs.float(), persistent=False)  # [2, pairs]

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the rotation angles, [..., pairs], for coordinates [..., 2] (y, x)."""
        angles = coords.float() @ self.freqs
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., k], x[..., k + pairs]) of ``x`` [S, H, L, hd] by angles given as [S, L, pairs]."""
    pairs = x.shape[-1] // 2
    x1, x2 = x[..., :pairs].float(), x[..., pairs:].float()
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
