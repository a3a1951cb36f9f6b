"""One grouped-GEMM interface, three backends: ``triton``, ``torch`` (``F.grouped_mm``) and ``loop``.

``grouped_gemm(x, w, offsets)`` computes ``Y[rows_g] = X[rows_g] @ W[g]`` for rows sorted by group,
``x [M, K]``, ``w [E, K, N]``, ``offsets [E]`` int32 *end* offsets (``offsets[-1] == M``, dropless).
Every backend is differentiable in ``x`` and ``w`` and they agree to floating-point rounding.

- ``loop``: the reference. A python loop over experts with plain matmuls; reads the offsets on the
  host (one synchronization), so it is for tests and small runs.
- ``torch``: ``torch.nn.functional.grouped_mm`` for the forward and both gradients (its own
  autograd fails on expanded gradients, so we wrap it). Measured on torch 2.15: the CPU kernel takes
  float32/bfloat16/float16, not float64, and needs 16-byte aligned strides; we zero-pad K and N up
  to that and slice the result. Where ``grouped_mm`` cannot run the device/dtype pair (probed once
  per pair, e.g. float64 anywhere), this backend falls back to ``loop``.
- ``triton``: our kernels (``grouped_gemm_triton``), registered as ``torch.library`` operators with
  autograd so ``torch.compile`` keeps the MoE layer in one graph; CUDA, or CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "torch", "loop"]
BACKENDS = ("triton", "torch", "loop")


def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [M, K] and w [E, K, N]; got {tuple(x.shape)} and {tuple(w.shape)}")
    if offsets.shape != (w.shape[0],) or offsets.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 of shape [{w.shape[0]}], got {offsets.dtype} {tuple(offsets.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")


# ----------------------------------------------------------------------------------------------- loop
def grouped_gemm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: slice each group's rows and multiply by its weight (autograd by torch)."""
    ends = offsets.tolist()  # host sync: fine for a reference
    starts = [0] + ends[:-1]
    outs = [x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))]
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[2])
    return torch.cat(outs, 0)


# ---------------------------------------------------------------------------------------------- torch
def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]  # F.pad lists the last dim first
    return F.pad(t, pad)


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` (forward, dX and dW layouts) runs for this device and dtype; probed once.

    While torch.compile traces, it also needs the dtypes its shape function accepts (measured on
    torch 2.14: bf16 and fp16 only, although the eager CPU kernel also takes float32)."""
    key = (device_type, dtype)
    if torch.compiler.is_compiling():  # an eager probe's answer wins (a constant of the graph)
        return _PROBED.get(key, True) and hasattr(F, "grouped_mm") and dtype in (torch.bfloat16, torch.float16)
    if key not in _PROBED:
        _PROBED[key] = _probe_grouped_mm(torch.device(device_type), dtype)
    return _PROBED[key]


def _probe_grouped_mm(dev: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, device=dev, dtype=dtype)
        w = torch.ones(2, 16, 16, device=dev, dtype=dtype)
        offs = torch.tensor([1, 4], device=dev, dtype=torch.int32)
        F.grouped_mm(x, w, offs=offs)
        F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
        F.grouped_mm(x.t(), x, offs=offs)
        return True
    except (RuntimeError, NotImplementedError):
        return False


class TorchGroupedGemm(torch.autograd.Function):
    """``F.grouped_mm`` forward, ``dX = grouped_mm(dY, W^T)``, ``dW = grouped_mm(X^T, dY)`` (2-D x 2-D form)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        align = max(1, 16 // x.element_size())
        k, n = w.shape[1], w.shape[2]
        xp = _pad_to(x, 1, align).contiguous()
        wp = _pad_to(_pad_to(w, 1, align), 2, align).contiguous()
        ctx.save_for_backward(xp, wp, offsets)
        ctx.kn = (k, n)
        return F.grouped_mm(xp, wp, offs=offsets)[:, :n]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xp, wp, offsets = ctx.saved_tensors
        k, n = ctx.kn
        align = max(1, 16 // xp.element_size())
        dyp = _pad_to(dy, 1, align).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = F.grouped_mm(dyp, wp.transpose(-2, -1), offs=offsets)[:, :k]
        if ctx.needs_input_grad[1]:
            dw = F.grouped_mm(xp.t(), dyp, offs=offsets)[:, :k, :n]
        return dx, dw, None


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` backend; falls back to ``loop`` where grouped_mm cannot run (see module doc)."""
    if x.shape[0] == 0 or not _grouped_mm_runs(x.device.type, x.dtype):
        return grouped_gemm_loop(x, w, offsets)
    return TorchGroupedGemm.apply(x, w, offsets)


# --------------------------------------------------------------------------------------------- triton
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def grouped_gemm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Our kernels through their ``torch.library`` operator (``amoe::gmm_rows``, with autograd)."""
    from .grouped_gemm_triton import gmm_rows_op

    return gmm_rows_op(x, w, offsets)


# ------------------------------------------------------------------------------------------ interface
def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``auto``: our Triton kernels on CUDA, ``torch`` elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; choose from {('auto',) + BACKENDS}")
    return backend


_IMPL = {"loop": grouped_gemm_loop, "torch": grouped_gemm_torch, "triton": grouped_gemm_triton}


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """``Y[rows_g] = X[rows_g] @ W[g]``; rows of ``x`` sorted by group, ``offsets`` int32 end offsets."""
    _check(x, w, offsets)
    return _IMPL[resolve_backend(backend, x.device)](x, w, offsets)
