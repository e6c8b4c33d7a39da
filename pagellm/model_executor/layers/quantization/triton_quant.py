"""Per-token (per-row) symmetric quantization to fp8 or int8 in one Triton kernel (CUDA), fused into RMSNorm and
SiLU-and-mul when their output only feeds a W8A8 linear, and the rescale that undoes it after an unscaled GEMM.

Why: in torch it is five passes over the activations (upcast, abs, max, divide, cast) before every quantized
matmul; here one program per row reads it twice (max, then quantize) and writes one byte per value. It computes
what w8a8.quantize_per_row does: the same float32 scale (max|x| / qmax, at least MIN_SCALE), a correctly
rounded division, round-half-even for int8 and the hardware's round-to-nearest-even cast for fp8.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagellm.model_executor.layers.quantization.w8a8 import FP8, MIN_SCALE, QMAX
from pagellm.model_executor.layers.triton_ops import rms_norm_row, silu_and_mul_cols

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest integer, ties to even


@triton.jit
def _on_grid(x, scale, qmax, IS_INT8: tl.constexpr):
    """x / scale (correctly rounded), rounded half-even for int8, clamped to +-qmax (the caller casts)."""
    v = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    if IS_INT8:
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(v, -qmax), qmax)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q, qmax, min_scale,
                          IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / qmax, min_scale)
    tl.store(s_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + start + cols, _on_grid(x, scale, qmax, IS_INT8).to(q_ptr.dtype.element_ty),
                 mask=ok)


# ---- the op before a W8A8 linear, writing its output quantized per token (w8a8.QuantizedActivation) ----------
# Each computes what the unfused pair does (the op's output rounded to the activations' dtype, then
# quantize_per_row), in one launch instead of two and without the 16-bit intermediate in memory.

@triton.jit
def _rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, stride_x, stride_r, stride_q, n_cols, eps, qmax,
                           min_scale, HAS_RES: tl.constexpr, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y, ok = rms_norm_row(x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps, HAS_RES, BLOCK)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.maximum(tl.max(tl.where(ok, tl.abs(y), 0.0), axis=0) / qmax, min_scale)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * stride_q + tl.arange(0, BLOCK), _on_grid(y, scale, qmax, IS_INT8).to(q_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, d, qmax, min_scale,
                               IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the products twice (for the row's max, then to quantize) rather than kept."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, d, BLOCK):
        ok = start + cols < d
        y = silu_and_mul_cols(x_ptr, row, stride_x, d, start + cols, ok).to(x_ptr.dtype.element_ty)
        amax = tl.maximum(amax, tl.where(ok, tl.abs(y.to(tl.float32)), 0.0))
    scale = tl.maximum(tl.max(amax, axis=0) / qmax, min_scale)
    tl.store(s_ptr + row, scale)
    for start in range(0, d, BLOCK):
        ok = start + cols < d
        y = silu_and_mul_cols(x_ptr, row, stride_x, d, start + cols, ok).to(x_ptr.dtype.element_ty)
        tl.store(q_ptr + row * stride_q + start + cols,
                 _on_grid(y.to(tl.float32), scale, qmax, IS_INT8).to(q_ptr.dtype.element_ty), mask=ok)


def _quant_outputs(rows: int, cols: int, qdtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, cols), dtype=qdtype, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def rms_norm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, qdtype: torch.dtype,
                          residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K], scale [M, 1]) of weight * rmsnorm(x [+ residual]) over the last dim, quantized per token;
    with `residual`, x + residual is written into it in place (as triton_ops.rms_norm does)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, scale = _quant_outputs(x2.shape[0], n, qdtype, x.device)
    if x2.shape[0] == 0:
        return q, scale
    r2 = residual.view(-1, n) if residual is not None else x2
    block = triton.next_power_of_2(n)
    _rms_norm_quant_kernel[(x2.shape[0],)](
        x2, r2, weight, q, scale, x2.stride(0), r2.stride(0), q.stride(0), n, eps, QMAX[qdtype], MIN_SCALE,
        HAS_RES=residual is not None, IS_INT8=qdtype == torch.int8, BLOCK=block,
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return q, scale


def silu_and_mul_quant_triton(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, d], scale [M, 1]) of silu(gate) * up for x [..., 2d] = [gate | up], quantized per token."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, scale = _quant_outputs(x2.shape[0], d, qdtype, x.device)
    if x2.shape[0] == 0:
        return q, scale
    block = min(triton.next_power_of_2(d), 2048)
    _silu_and_mul_quant_kernel[(x2.shape[0],)](x2, q, scale, x2.stride(0), q.stride(0), d, QMAX[qdtype], MIN_SCALE,
                                               IS_INT8=qdtype == torch.int8, BLOCK=block,
                                               num_warps=4 if block <= 1024 else 8)
    return q, scale


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
                                IS_INT8=qdtype == torch.int8, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return q, scale


@triton.jit
def _rescale_kernel(acc_ptr, xs_ptr, ws_ptr, out_ptr, m, n, stride_acc, stride_out,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
                          BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


__all__ = ["quantize_per_row_triton", "rescale_rows_cols_triton", "rms_norm_quant_triton", "silu_and_mul_quant_triton",
           "FP8"]
