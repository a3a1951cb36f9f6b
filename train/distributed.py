"""Where a process computes: its device and its place in a ``torchrun`` group (one rule for train and eval).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``: the group uses NCCL on GPUs and gloo on
CPUs, and each rank takes the GPU of its local rank. Gradients are all-reduced explicitly (not by
DDP's hooks) because experts that receive no token in a step have no gradient, which DDP only
tolerates with ``find_unused_parameters``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["allreduce_grads", "barrier", "gather_rows", "init_distributed", "rank_and_world", "resolve_device",
           "use_device"]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun a bare
    CUDA device is the local rank's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def use_device(spec: str = "auto") -> torch.device:
    """``resolve_device``, and on CUDA make that GPU the current device: Triton launches its kernels,
    ``torch.cuda.synchronize`` waits and the DataLoader pins memory on the current device, which is
    otherwise GPU 0 for every rank (and for a run asked to compute on ``cuda:1``)."""
    device = resolve_device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the torchrun group when ``WORLD_SIZE`` > 1 (once); returns (rank, world). ``device`` is the run's
    (``use_device``): NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dev = use_device(device)
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def allreduce_grads(model: torch.nn.Module) -> None:
    """Sum every trainable parameter's gradient over the ranks in one flat all-reduce (missing = zero)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``rows`` [n_r, C] concatenated in rank order, and the world size.

    Ranks may hold different row counts (packed microbatches), so the counts travel first and the
    rows are padded to the largest. The result is detached except for this rank's own rows, which
    stay attached to the graph: a loss over all rows back-propagates into this rank's part only,
    and the ranks' summed gradients are that loss's whole gradient.
    """
    rank, world = rank_and_world()
    if world == 1:
        return rows, 1
    counts = torch.zeros(world, dtype=torch.int64, device=rows.device)
    counts[rank] = rows.shape[0]
    dist.all_reduce(counts)
    most = int(counts.max())
    padded = rows.detach().new_zeros((most, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    pieces = [rows if r == rank else parts[r][: int(counts[r])] for r in range(world)]
    return torch.cat(pieces), world
