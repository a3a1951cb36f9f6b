"""The teacher interface every adapter implements (the cache job only talks to this)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Teacher", "TeacherOutput", "library_versions", "resize_pixels", "to_student_grid"]


@dataclass
class TeacherOutput:
    summary: torch.Tensor  # [B, Ds] global embedding
    patches: torch.Tensor  # [B, gh, gw, D] on the student grid
    registers: torch.Tensor | None  # [B, R, D] where the model has register tokens


class Teacher(ABC):
    """A frozen teacher that turns the store's uint8 pixels into targets on the student grid."""

    name: str
    spec: str
    embed_dim: int
    summary_dim: int
    num_registers: int
    resampled: bool

    @abstractmethod
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int]) -> TeacherOutput:
        """pixels: uint8 [B, 3, H, W] (H = gh·P, W = gw·P); the adapter applies its own input rule."""

    @abstractmethod
    def fingerprint(self) -> dict: ...

    def heads(self) -> dict[str, torch.Tensor]:
        return {}

    def heads_config(self) -> dict:
        return {}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise ValueError(f"teacher {self.spec} has no text tower")


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalized float [B,3,h,w]: bicubic (antialiased when shrinking), clamped to [0, 1]."""
    x = pixels.float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink).clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def to_student_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """[B, h, w, D] -> [B, gh, gw, D]: bilinear (antialiased when shrinking); flags whether it resampled."""
    if tuple(tokens.shape[1:3]) == tuple(grid):
        return tokens, False
    shrink = grid[0] < tokens.shape[1] or grid[1] < tokens.shape[2]
    x = tokens.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return x.permute(0, 2, 3, 1).contiguous(), True


def library_versions() -> dict[str, str]:
    import open_clip
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__}
