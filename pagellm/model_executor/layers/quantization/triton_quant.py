"""Per-token (per-row) symmetric quantization to fp8 or int8 in one Triton kernel (CUDA), and the rescale that
undoes it after an unscaled GEMM.

Why: in torch it is five passes over the activations (upcast, abs, max, divide, cast) before every quantized
matmul; here one program per row reads it twice (max, then quantize) and writes one byte per value. It computes
what w8a8.quantize_per_row does: the same float32 scale (max|x| / qmax, at least MIN_SCALE), a correctly
rounded division, round-half-even for int8 and the hardware's round-to-nearest-even cast for fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagellm.model_executor.layers.pdl import pdl_options, pdl_prologue
from pagellm.model_executor.layers.quantization.w8a8 import FP8, MIN_SCALE, QMAX

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest integer, ties to even


@triton.jit
def row_scale(absmax, qmax, min_scale):
    """A row's scale from the |x| maxima of its blocks (a vector): max / qmax, at least min_scale (w8a8.MIN_SCALE,
    so that an all-zero row divides by something). Shared, like on_grid, by every kernel that quantizes per row."""
    return tl.maximum(tl.max(absmax, axis=0) / qmax, min_scale)


@triton.jit
def on_grid(v, scale, qmax, IS_INT8: tl.constexpr):
    """float32 v / scale on the 8-bit grid: a correctly rounded division, round-half-even for int8, clamped to
    +-qmax (the caller's cast to fp8 rounds to nearest even). Shared by every kernel that quantizes per row."""
    v = tl.math.div_rn(v, tl.zeros_like(v) + scale)
    if IS_INT8:
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(v, -qmax), qmax)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q, qmax, min_scale,
                          IS_INT8: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = row_scale(amax, qmax, min_scale)
    tl.store(s_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + start + cols, on_grid(x, scale, qmax, IS_INT8).to(q_ptr.dtype.element_ty),
                 mask=ok)


def quantize_per_row_triton(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] qdtype, scale [M, 1] float32) of a 2-D tensor whose rows are contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=qdtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), QMAX[qdtype], MIN_SCALE,
                                IS_INT8=qdtype == torch.int8, BLOCK=block, num_warps=4 if block <= 1024 else 8,
                                **pdl_options(x.device, m))
    return q, scale


@triton.jit
def _rescale_kernel(acc_ptr, xs_ptr, ws_ptr, out_ptr, m, n, stride_acc, stride_out,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    acc = tl.load(acc_ptr + rows64 * stride_acc + cols[None, :], mask=ok, other=0.0)
    xs = tl.load(xs_ptr + rows, mask=row_ok, other=0.0)
    ws = tl.load(ws_ptr + cols, mask=col_ok, other=0.0)
    y = acc * xs[:, None] * ws[None, :]
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def rescale_rows_cols_triton(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
                             out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] float32 * xs [M, 1] * ws [1, N], in out_dtype: one pass.

    Why: cuBLASLt's fp8 GEMM takes only one scale per operand, and torch's row-wise scaled GEMM (a CUTLASS kernel)
    is slower than it below a few hundred rows, so small batches run the unscaled GEMM into float32 and apply the
    per-token and per-channel scales here."""
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0:
        return out
    block_m = min(16, triton.next_power_of_2(m))
    block_n = 4096 // block_m
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _rescale_kernel[grid](acc, xs, ws, out, m, n, acc.stride(0), out.stride(0),
                          BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **pdl_options(acc.device, m))
    return out


__all__ = ["quantize_per_row_triton", "rescale_rows_cols_triton", "row_scale", "on_grid", "FP8"]
