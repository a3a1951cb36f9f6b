"""Which tokens of a packed batch an MLP transforms, and which of them may be mixed together.

Every MLP of a block takes the same call, ``mlp(x, tokens=tokens) -> (y, aux)`` (``train/model/mlp.py``):
``x`` is the block's ``[..., d]`` input over all slots, ``tokens`` says which rows are real tokens
and the group (image) of each. Padding never reaches a router, and slot-based variants (Soft MoE,
expert choice), which pick tokens among a group, only ever see one image, never a pack of them.
``tokens=None`` means every row is real and the rows of dim -2 form the groups (a plain batch of
sequences, as in the layers' own tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["TokenGroups", "per_group"]


@dataclass(frozen=True)
class TokenGroups:
    index: torch.Tensor  # [T] int64: rows of x.reshape(-1, d) holding real tokens, ascending
    group: torch.Tensor  # [T] int64: the group (image) of each real token

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "TokenGroups":
        """From a packed layout's ``doc_ids`` [S, L] (-1 = padding)."""
        flat = doc_ids.reshape(-1)
        index = torch.nonzero(flat >= 0).squeeze(1)
        return cls(index, flat.index_select(0, index))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens ``[T, d]`` of ``x [..., d]``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def scatter(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``y [T, d]`` put back in the rows of a zero tensor shaped like ``like``."""
        flat = like.new_zeros(like.numel() // like.shape[-1], like.shape[-1])
        return flat.index_copy(0, self.index, y.to(flat.dtype)).reshape(like.shape)


def per_group(fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]], x: torch.Tensor, tokens: TokenGroups
              ) -> tuple[torch.Tensor, dict]:
    """Run ``fn`` on each group's tokens as one sequence ``[1, n_g, d]``; aux averaged over groups.

    Aux entries of equal shape in every group are averaged; others are left out.
    """
    flat = x.reshape(-1, x.shape[-1])
    y = torch.zeros_like(flat)
    auxes = []
    for g in torch.unique(tokens.group).tolist():
        rows = tokens.index[tokens.group == g]
        out, aux = fn(flat.index_select(0, rows).unsqueeze(0))
        y = y.index_copy(0, rows, out.squeeze(0).to(flat.dtype))
        auxes.append(aux)
    merged = {k: torch.stack([a[k] for a in auxes]).mean(0) for k in (auxes[0] if auxes else {})
              if torch.is_tensor(auxes[0][k]) and all(a[k].shape == auxes[0][k].shape for a in auxes)}
    return y.reshape(x.shape), merged
