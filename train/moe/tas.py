"""M²oT's teacher-aware router π and the fixed maps of teacher targets into an expert's width (§4.2, Eq. 8).

Reconstruction (the text leaves both open; see ``train.losses.tas_loss`` for the loss itself):

- π(x, e, T_i): a two-layer MLP on the MoE layer's input token x, d → d → E·N logits, softmax over the
  N teachers for each expert e. At d = 768, E = 8, N = 2 that is 0.6M parameters per layer, the order
  of the "about 1M" of M²oT Table 4.
- Teachers have their own widths D_i; an expert's output φ(x, e) has the student's width d. Each
  teacher's (PHI-S normalized) patch target is mapped into width d by a fixed random matrix
  Q_i = G_i / sqrt(D_i), G_i ~ N(0, 1) seeded per layer and teacher (a Johnson-Lindenstrauss map: it
  keeps the targets' geometry and gives them unit variance per channel, like the PHI-S targets). Not
  learned on purpose: a learned map could shrink to zero with the experts' outputs and make the TAS
  term vanish without any specialization. Kept as buffers, so checkpoints carry them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TeacherAwareRouter"]


class TeacherAwareRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, teacher_dims: dict[str, int], *, seed: int, hidden: int | None = None):
        super().__init__()
        self.teachers, self.num_experts = list(teacher_dims), num_experts
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts * len(teacher_dims)))
        generator = torch.Generator().manual_seed(seed)
        for k, (name, width) in enumerate(teacher_dims.items()):
            self.register_buffer(f"proj_{k}", torch.randn(dim, width, generator=generator) / width ** 0.5)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """π(x, e, T_i): ``[T, d] -> [T, E, N]``, a distribution over the teachers for every expert."""
        logits = self.net(x).float().reshape(len(x), self.num_experts, len(self.teachers))
        return logits.softmax(-1)

    def project(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each teacher's targets ``[T, D_i]`` in the experts' width, stacked: ``[N, T, d]``."""
        return torch.stack([targets[t].float() @ getattr(self, f"proj_{k}").T for k, t in enumerate(self.teachers)])
