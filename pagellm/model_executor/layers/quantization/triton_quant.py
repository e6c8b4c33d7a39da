"""Per-token (per-row) symmetric quantization to fp8 or int8 in one Triton kernel (CUDA).

Why: in torch it is five passes over the activations (upcast, abs, max, divide, cast) before every quantized
matmul; here one program per row reads it twice (max, then quantize) and writes one byte per value. It computes
what w8a8.quantize_per_row does: the same float32 scale (max|x| / qmax, at least MIN_SCALE), a correctly
rounded division, round-half-even for int8 and the hardware's round-to-nearest-even cast for fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagellm.model_executor.layers.quantization.w8a8 import FP8, MIN_SCALE, QMAX

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest integer, ties to even


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
        v = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        if IS_INT8:
            v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        tl.store(q_ptr + row * stride_q + start + cols, v.to(q_ptr.dtype.element_ty), mask=ok)


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


__all__ = ["quantize_per_row_triton", "FP8"]
