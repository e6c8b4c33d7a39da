"""W4A16 GEMM in Triton: y = x @ W with W dequantized from 4-bit inside the kernel (layout of w4a16.py).

Why: batch-1 decode reads every weight once per token, so its speed is bytes: a 4-bit weight is a quarter of
a bf16 one. Dequantizing first would write and read the 16-bit weight again; here each tile of packed ints is
unpacked in registers, scaled and fed to the dot product. Small batches (decode) split K across programs so
that the few output tiles still fill every SM; partial sums are float32 and added once at the end.

Per K tile, w = (q - z) * s in float32, rounded to the activation dtype, and the dot accumulates in float32:
the same arithmetic as w4a16.w4a16_reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = (tl.arange(0, BLOCK_K) % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k_step in range(0, k_per_split, BLOCK_K):
        k0 = k_start + k_step
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        packed = tl.load(qw_ptr + (offs_k[:, None] // 8).to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=mask_k[:, None] & mask_n[None, :], other=0)
        q = ((packed >> shifts[:, None]) & 0xF).to(tl.float32)
        if GROUP_PER_TILE:  # the whole tile is in one group: one row of scales and zeros
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
            else:
                g = offs_k // group_size
            ptrs = g[:, None].to(tl.int64) * stride_sg + offs_n[None, :]
            ok = mask_k[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + ptrs, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + ptrs, mask=ok, other=0.0).to(tl.float32)
        w = ((q - z) * s).to(x.dtype)
        acc += tl.dot(x, w)
    out = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


def _config(m: int, n: int, k: int, group_size: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps), chosen by shape: small batches are memory-bound and
    split K so that about two waves of programs cover the SMs; large ones use bigger tiles and no split."""
    if m <= 16:
        block_m, block_n, block_k, warps = 16, 64, 128, 4
    elif m <= 64:
        block_m, block_n, block_k, warps = 32, 64, 128, 4
    else:
        block_m, block_n, block_k, warps = 64, 128, 64, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    if m <= 64:
        while tiles * split < 2 * sms and k // (split * 2) >= 4 * block_k:
            split *= 2
    return block_m, block_n, block_k, split, warps


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ W [K, N] (qweight [K / 8, N] int32, scales and zeros [groups, N]) -> [M, N]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    block_m, block_n, block_k, split, warps = _config(m, n, k, group_size, _num_sms(x.device))
    if g_idx is None and group_size % block_k and block_k > group_size >= 16:
        block_k = group_size  # keep whole groups per tile (group sizes 16..64)
    group_per_tile = g_idx is None and group_size % block_k == 0
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    if split == 1:
        out = torch.empty((1, m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, g_idx if g_idx is not None else qweight, out,
        m, n, k, group_size, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), out.stride(1),
        HAS_GIDX=g_idx is not None, GROUP_PER_TILE=group_per_tile,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
