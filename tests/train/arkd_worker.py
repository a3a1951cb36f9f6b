"""Run by ``torchrun`` from test_arkd.py: ARKD over a batch split unevenly between two ranks (gloo).

Each rank computes ``relational_terms`` on its rows through ``gather_rows``, back-propagates, and
the gradients are summed over ranks as the trainer does; rank 0 writes the logged value (summed over
ranks) and the summed gradient of every row to the file named on the command line.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from train.config import LossConfig
from train.distributed import gather_rows


def batch(dim: int = 6, rows: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64), torch.randn(rows, dim, generator=g, dtype=torch.float64)


def main(out: str) -> None:
    from train.losses import relational_terms

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    student, teacher = batch()
    split = [0, 4, 9]  # uneven: 4 rows on rank 0, 5 on rank 1
    mine = student[split[rank]:split[rank + 1]].float().clone().requires_grad_(True)
    cfg = LossConfig(arkd=0.7)
    terms = relational_terms({"t": {"summary": mine}}, {"t": {"summary": teacher[split[rank]:split[rank + 1]].float()}},
                             cfg, 1.0, gather_rows)
    terms["t/arkd"].backward()
    grad = torch.zeros(student.shape, dtype=torch.float32)
    grad[split[rank]:split[rank + 1]] = mine.grad
    value = terms["t/arkd"].detach().reshape(1)
    dist.all_reduce(grad)
    dist.all_reduce(value)
    if rank == 0:
        torch.save({"value": value, "grad": grad}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
