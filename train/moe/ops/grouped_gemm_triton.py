"""Triton grouped GEMM for dropless MoE: one launch for all experts, forward and both gradients.

Rows are sorted by expert; ``offsets[g]`` is the end row of group ``g`` (the layout of
``F.grouped_mm``'s ``offs``). Three products are needed:

    forward   Y[rows_g]  = X[rows_g] @ W[g]          (rows kernel)
    input     dX[rows_g] = dY[rows_g] @ W[g]^T       (rows kernel on a transposed view of W)
    weight    dW[g]      = X[rows_g]^T @ dY[rows_g]  (weight kernel, loops over the group's rows)

The rows kernel gives each program one (row tile inside one group, column tile) pair. Which group a
row-tile id belongs to is found inside the kernel from the offsets: tiles per group are
``ceil(count_g / BLOCK_M)``, their cumulative sum locates the group. The number of row tiles is at
most ``ceil(M / BLOCK_M) + E`` (each group wastes at most one partial tile), and ``M = T * k`` is
static, so the grid never depends on data: no host synchronization. Surplus tile ids return at once.

All loads are masked (any M per group including 0, any K and N), accumulation is float32, and all
tensors are addressed through their strides (expanded or transposed views need no copy).

On CPU the kernels run only under Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* ``triton`` is first imported (the flag is read when ``@triton.jit``
decorates a function, and Triton's own standard-library helpers are decorated at import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed block sizes for the CPU interpreter: one config, smallest legal tl.dot tile (16).
_INTERPRET_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def _cuda_configs() -> list[triton.Config]:
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]:
        cfgs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages))
    return cfgs


def _dw_cuda_configs() -> list[triton.Config]:
    cfgs = []
    for bk, bn, bm, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]:
        cfgs.append(triton.Config(dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=bm), num_warps=warps, num_stages=stages))
    return cfgs


@triton.jit
def _gmm_rows_kernel(
    X, W, Y, OFFS,
    N, K, NUM_GROUPS,
    stride_xm, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_ym, stride_yn,
    GROUPS_P2: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Device-side tile schedule: which group owns row-tile `pid_m`, and where its rows start.
    gi = tl.arange(0, GROUPS_P2)
    real = gi < NUM_GROUPS
    ends = tl.load(OFFS + gi, mask=real, other=0)
    starts = tl.load(OFFS + gi - 1, mask=real & (gi > 0), other=0)
    tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum_tiles = tl.cumsum(tiles, 0)
    g = tl.sum((cum_tiles <= pid_m).to(tl.int32), 0)
    if g >= NUM_GROUPS:
        return
    pick = gi == g
    row_start = tl.sum(tl.where(pick, starts, 0), 0)
    row_end = tl.sum(tl.where(pick, ends, 0), 0)
    first_tile = tl.sum(tl.where(pick, cum_tiles - tiles, 0), 0)

    rm = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < row_end
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    x_ptrs = X + rm64[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + g.to(tl.int64) * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = Y + rm64[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gmm_dw_kernel(
    X, DY, DW, OFFS,
    N, K,
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    stride_wg, stride_wk, stride_wn,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_end = tl.load(OFFS + g)
    row_start = tl.where(g > 0, tl.load(OFFS + tl.maximum(g - 1, 0)), 0)

    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = rk < K
    n_ok = rn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # An empty group runs zero iterations and stores zeros: its weight gets no gradient.
    for m0 in range(row_start, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < row_end
        rm64 = rm.to(tl.int64)
        xt = tl.load(X + rm64[None, :] * stride_xm + rk[:, None] * stride_xk, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        dy = tl.load(DY + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc += tl.dot(xt, dy, input_precision="ieee")
        else:
            acc += tl.dot(xt, dy)
    dw_ptrs = DW + g.to(tl.int64) * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


_gmm_rows_tuned = triton.autotune(configs=_cuda_configs(), key=["N", "K", "NUM_GROUPS"])(_gmm_rows_kernel)
_gmm_dw_tuned = triton.autotune(configs=_dw_cuda_configs(), key=["N", "K"])(_gmm_dw_kernel)


def interpreter_enabled() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors)."""
    return not isinstance(_gmm_rows_kernel, triton.runtime.JITFunction)


def _check_device(*ts: torch.Tensor) -> bool:
    """Return True for CUDA launches; CPU tensors need the interpreter, else say how to get it."""
    if ts[0].is_cuda:
        return True
    if not interpreter_enabled():
        raise RuntimeError(
            "the triton backend got CPU tensors but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 in the environment before `triton` is first imported, or use backend='torch'/'loop'"
        )
    return False


def _ieee(x: torch.Tensor) -> bool:
    # float32 inputs are multiplied exactly (no TF32), so all backends agree to float32 rounding.
    return x.dtype == torch.float32


def gmm_rows(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``Y[rows_g] = X[rows_g] @ W[g]`` for ``x [M, K]``, ``w [E, K, N]`` (any strides), int32 end ``offsets [E]``."""
    m, k = x.shape
    e, k2, n = w.shape
    assert k == k2 and offsets.shape == (e,), (x.shape, w.shape, offsets.shape)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    args = (
        x, w, y, offsets, n, k, e,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
    )
    consts = dict(GROUPS_P2=triton.next_power_of_2(e), IEEE_FP32=_ieee(x))
    if _check_device(x, w):
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + e, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        with torch.cuda.device(x.device):  # Triton launches on the current device, whatever x's is
            _gmm_rows_tuned[grid](*args, **consts)
    else:
        meta = _INTERPRET_META
        _gmm_rows_kernel[(triton.cdiv(m, meta["BLOCK_M"]) + e, triton.cdiv(n, meta["BLOCK_N"]))](*args, **consts, **meta)
    return y


def gmm_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, num_groups: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dW[g] = X[rows_g]^T @ dY[rows_g]`` -> ``[E, K, N]``; groups without rows get exact zeros."""
    m, k = x.shape
    m2, n = dy.shape
    assert m == m2 and offsets.shape == (num_groups,), (x.shape, dy.shape, offsets.shape)
    dw = torch.empty(num_groups, k, n, device=x.device, dtype=out_dtype or x.dtype)
    if k == 0 or n == 0 or num_groups == 0:
        return dw
    args = (
        x, dy, dw, offsets, n, k,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
    )
    consts = dict(IEEE_FP32=_ieee(x))
    if _check_device(x, dy):
        grid = lambda meta: (num_groups, triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        with torch.cuda.device(x.device):
            _gmm_dw_tuned[grid](*args, **consts)
    else:
        meta = _INTERPRET_META
        _gmm_dw_kernel[(num_groups, triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))](*args, **consts, **meta)
    return dw


# ------------------------------------------------------------------ torch.library custom ops
# The kernels as registered operators with a fake (shape) implementation and autograd, so that
# ``torch.compile`` traces a model through the MoE layer as one graph (an autograd.Function that
# launches Triton would be a graph break) and treats each launch as an opaque node.


@torch.library.custom_op("amoe::gmm_rows", mutates_args=())
def gmm_rows_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``gmm_rows`` as an operator: ``Y[rows_g] = X[rows_g] @ W[g]``."""
    return gmm_rows(x, w, offsets)


@gmm_rows_op.register_fake
def _gmm_rows_fake(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("amoe::gmm_dw", mutates_args=())
def gmm_dw_op(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``gmm_dw`` as an operator: ``dW[g] = X[rows_g]^T @ dY[rows_g]``."""
    return gmm_dw(x, dy, offsets, num_groups)


@gmm_dw_op.register_fake
def _gmm_dw_fake(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x.new_empty(num_groups, x.shape[1], dy.shape[1])


def _gmm_rows_setup(ctx, inputs, output) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _gmm_rows_backward(ctx, dy: torch.Tensor):
    """dX = dY W^T (rows kernel on W's transposed view), dW = X^T dY (weight kernel); none for offsets."""
    x, w, offsets = ctx.saved_tensors
    dx = gmm_rows_op(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dw = gmm_dw_op(x, dy, offsets, w.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


gmm_rows_op.register_autograd(_gmm_rows_backward, setup_context=_gmm_rows_setup)
