"""W4A16 GEMM in Triton: y = x @ W with W dequantized from 4-bit inside the kernel (layout of w4a16.py).

Why: batch-1 decode reads every weight once per token, so its speed is bytes: a 4-bit weight is a quarter of
a bf16 one. Dequantizing first would write and read the 16-bit weight again; here each tile of packed ints is
unpacked in registers, scaled and fed to the product. Small batches split K across programs so that the few
output tiles still fill every SM; partial sums are float32 and added once at the end.

Split K ends inside the kernel: the last program of an output tile to finish adds the float32 partials in a
fixed order and writes the tile (a counter per tile), so no reduction kernel follows (at batch 1 each linear is
one launch, as cuBLAS's GEMV is).

Five kernels, chosen per call by the config table (w4a16_configs.py, keyed by M and shape):

- batch 1 (`gemv`): see _w4a16_colwise_kernel; about 3.5 instructions per weight, one and and one fma each.
- batch 1 (`gemv_rows`): the same arithmetic with each thread summing its columns down the tile's packed rows
  (2.7 instructions per weight in its K loop, sm_90 SASS); faster on wide layers (Llama-8B's gate_up: 24.9
  against 31.6 us on an H200), slower on the small ones, where `gemv`'s more warps per program hide latency.
- small M (`fma`, one row of x per program, and `mma`; `gemv` falls back to `fma` for act-order and for tiles
  that cross groups): each packed tile [BLOCK_K / 8, BLOCK_N] is loaded once and
  read as eight slices, slice j holding input channels k0 + 8r + j; each slice is multiplied by the matching
  strided columns of x. No [BLOCK_K, BLOCK_N] unpacked copy, no 8x repeated loads. A nibble becomes a float by
  bits, not by an int-to-float conversion (a slow instruction on every GPU). When a tile lies in one group (the
  common case: BLOCK_K divides the group size), the weight is read as 1 + q / 16 (the nibble put under the exponent
  of 1.0) and zero point and scale are applied once per tile and column: sum x (q - z) = 16 sum x (1 + q / 16) -
  (16 + z) sum x: a shift, an and-or and an fma per weight at M = 1 (the sm_90 SASS of `fma` at block_n 128, 4
  warps, compiled here without a GPU: 5.7 instructions per weight in its loop, x's loads and moves the rest). `fma`
  sums on CUDA cores (M = 1: a GEMV, where tensor cores would idle 15 of 16 rows); `mma` feeds the same slices to
  tl.dot.
- large M (`gemm`): the weight tile is unpacked to [BLOCK_K, BLOCK_N], w = (q - z) * s rounded to the
  activation dtype, one tl.dot per K tile (the arithmetic of w4a16.w4a16_reference).

All are CUDA-graph safe: shapes, not data, decide the grid and the buffers.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from pagellm.model_executor.layers.kernel_configs import Config
from pagellm.model_executor.layers.pdl import pdl_options, pdl_prologue
from pagellm.model_executor.layers.quantization.w4a16_configs import launch_params, w4a16_config


# (tl.zeros and tl.sum are themselves jit functions: once triton.language was imported without TRITON_INTERPRET,
# as torch may do, the interpreter cannot call them; tl.full and tl.reduce with this combine run either way.)
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _write_out(acc, out_ptr, part_ptr, count_ptr, offs_m, offs_n, mask, split, stride_ps, stride_om,
               FIXUP: tl.constexpr, UNROLL: tl.constexpr = 4):
    """Store a program's [BLOCK_M, BLOCK_N] result. Split K: store the float32 partial; with FIXUP, the last of
    the tile's `split` programs to finish (a counter per tile, acquire-release) adds the partials in split order
    (the same sum whichever program comes last), stores the output and resets the counter for the next call,
    so no reduction kernel follows. Without FIXUP the caller sums the partials."""
    ptrs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if split == 1:
        tl.store(out_ptr + ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + tl.program_id(2).to(tl.int64) * stride_ps + ptrs, acc, mask=mask)
        if FIXUP:
            tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            tl.debug_barrier()  # every thread's partial is stored before the (one-thread) release below
            count = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if count == split - 1:
                total = acc * 0.0
                part = part_ptr + ptrs
                # UNROLL partials per round trip to L2 (a load then its add, in a loop, would wait for each load
                # in turn: a long tail at split 16-64), still added in split order.
                for first in range(0, split, UNROLL):
                    for i in tl.static_range(UNROLL):
                        ok = mask & (offs_m[:, None] * 0 + first + i < split)
                        total += tl.load(part + (first + i) * stride_ps, mask=ok, other=0.0,
                                         cache_modifier=".cg")  # (L2: not this SM's L1)
                tl.store(out_ptr + ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split, split,
    stride_xm, stride_qk, stride_sg, stride_ps, stride_om,
    HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXUP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = (tl.arange(0, BLOCK_K) % 8) * 4
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
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
            g = tl.minimum(k0, K - 1) // group_size  # (the last split's tiles may start past K: x is 0 there)
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
    _write_out(acc, out_ptr, part_ptr, count_ptr, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], split,
               stride_ps, stride_om, FIXUP)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split, split,
    stride_xm, stride_qk, stride_sg, stride_ps, stride_om,
    HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXUP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """`fma`: one row of x per program (BLOCK_M = 1), products summed on CUDA cores in a [BLOCK_K / 8, BLOCK_N]
    tile (2-D, so each thread holds a few packed rows and columns and loads only its rows' x)."""
    pdl_prologue(PDL)
    ROWS: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    # Rows stay apart until the end: summing over them is a reduction across warps, not worth a barrier per tile.
    acc = tl.full([ROWS, BLOCK_N], 0.0, tl.float32)
    k_start = pid_k * k_per_split
    for k_step in range(0, k_per_split, BLOCK_K):
        k0 = k_start + k_step
        rows = k0 // 8 + offs_r
        row_ok = rows < K // 8
        packed = tl.load(qw_ptr + rows[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=row_ok[:, None] & mask_n[None, :], other=0)
        if GROUP_PER_TILE:  # as in _w4a16_mma_kernel: 1 + q / 16, zero point and scale once per tile
            tile = tl.full([ROWS, BLOCK_N], 0.0, tl.float32)
            x_sum = tl.full([ROWS], 0.0, tl.float32)
            for j in tl.static_range(8):
                x = tl.load(x_row + k0 + 8 * offs_r + j, mask=row_ok, other=0.0).to(tl.float32)
                if 4 * j <= 19:
                    field = packed << (19 - 4 * j)
                else:
                    field = packed >> (4 * j - 19)
                v = ((field & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                x_sum += x
                tile += x[:, None] * v
            g = tl.minimum(k0, K - 1) // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tile * (16.0 * s)[None, :] - x_sum[:, None] * ((16.0 + z) * s)[None, :]
        else:
            for j in tl.static_range(8):
                offs_k = k0 + 8 * offs_r + j
                x = tl.load(x_row + offs_k, mask=row_ok, other=0.0).to(tl.float32)
                qf = (((packed >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                if HAS_GIDX:
                    g = tl.load(g_ptr + offs_k, mask=row_ok, other=0)
                else:
                    g = offs_k // group_size
                ptrs = g[:, None].to(tl.int64) * stride_sg + offs_n[None, :]
                ok = row_ok[:, None] & mask_n[None, :]
                sj = tl.load(s_ptr + ptrs, mask=ok, other=0.0).to(tl.float32)
                zj = tl.load(z_ptr + ptrs, mask=ok, other=0.0).to(tl.float32)
                acc += x[:, None] * ((qf - (zj + 8388608.0)) * sj)
    _write_out(tl.reduce(acc, 0, _add)[None, :], out_ptr, part_ptr, count_ptr, offs_m, offs_n,
               (offs_m < M)[:, None] & mask_n[None, :], split, stride_ps, stride_om, FIXUP, 8)


@triton.jit
def _scaled_x(xr, i, BF16_PAIRS: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr):
    """Activations 2i and 2i + 1 after xr, as float32 times 2**E_LO and 2**E_HI. BF16_PAIRS: one int32 load holds
    both bfloat16 values; the scales are added to their exponent fields (one integer add for the two), then each
    half becomes a float32 by a shift or an and. Exact for |x| < 2**26 (zero becomes a float too small to count)."""
    if BF16_PAIRS:
        pair = tl.load(xr + i) + ((E_LO << 7) + (E_HI << 23))
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    lo = tl.load(xr + 2 * i).to(tl.float32) * (2.0 ** E_LO)
    hi = tl.load(xr + 2 * i + 1).to(tl.float32) * (2.0 ** E_HI)
    return lo, hi


@triton.jit
def _packed_products(p, xr, BF16_PAIRS: tl.constexpr, t=0.0):
    """t + sum over the eight nibbles q_j of the packed ints p of x_j q_j 2**-48, x_j the activations at xr
    (shaped to broadcast against p). Each nibble is masked where it lies (the top three after one shift) and
    read as a float32 subnormal q * 2**(b - 149) for a nibble at bit b; x is scaled by 2**(101 - b) to match
    (_scaled_x), so each weight is one and and one fma."""
    hi = p >> 12  # nibbles 5..7 to bits 8..19 (what the shift brings in above is masked off)
    # nibble j at bit b = 4j (j < 5) or 4j - 12: x scaled by 2**(101 - b)
    x0, x1 = _scaled_x(xr, 0, BF16_PAIRS, 101, 97)
    x2, x3 = _scaled_x(xr, 1, BF16_PAIRS, 93, 89)
    x4, x5 = _scaled_x(xr, 2, BF16_PAIRS, 85, 93)
    x6, x7 = _scaled_x(xr, 3, BF16_PAIRS, 89, 85)
    t += x0 * (p & 0xF).to(tl.float32, bitcast=True)
    t += x1 * (p & 0xF0).to(tl.float32, bitcast=True)
    t += x2 * (p & 0xF00).to(tl.float32, bitcast=True)
    t += x3 * (p & 0xF000).to(tl.float32, bitcast=True)
    t += x4 * (p & 0xF0000).to(tl.float32, bitcast=True)
    t += x5 * (hi & 0xF00).to(tl.float32, bitcast=True)
    t += x6 * (hi & 0xF000).to(tl.float32, bitcast=True)
    t += x7 * (hi & 0xF0000).to(tl.float32, bitcast=True)
    return t


@triton.jit
def _w4a16_colwise_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split, split,
    stride_xm, stride_qk, stride_sg, stride_ps, stride_om,
    HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXUP: tl.constexpr,
    BF16_PAIRS: tl.constexpr = False, STAGES: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """`gemv`: one row of x per program, a [BLOCK_K / 8, BLOCK_N] tile of packed ints per K step (its rows spread
    over the warps, four columns per thread). STAGES > 1 (the config's num_stages): the K loop is software-
    pipelined (tl.range), the next tiles' loads in flight while this one's products run; otherwise each tile's
    load is waited for in turn, and the table splits K down to one tile per program instead
    (w4a16_configs.auto_split_k). Split-K partials are added by the last program of each column tile. Needs
    GROUP_PER_TILE, and K a multiple of BLOCK_K (w4a16_matmul runs `fma` otherwise).

    About 3.5 instructions per weight (`fma`: 5.7): a nibble is masked where it lies in the packed int (the top
    three after one shift per int) and the masked int is read as a float32 as it is, a subnormal q * 2**(b - 149)
    for a nibble at bit b, so each weight is one and and one fma. x is scaled by 2**(101 - b) to match, so every
    product is x q 2**-48, a normal float32 summed exactly as x q would be; sum x comes from one vector load per
    tile for the zero points. (GPUs compute with subnormal operands at full speed; Triton does not flush them.)"""
    pdl_prologue(PDL)
    ROWS: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_n = offs_n < N
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    if BF16_PAIRS:
        x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + pid_m.to(tl.int64) * (stride_xm // 2)
    for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
        rows = k0 // 8 + offs_r
        p = tl.load(qw_ptr + rows[:, None].to(tl.int64) * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
        if BF16_PAIRS:
            xr = x_pairs + 4 * rows
        else:
            xr = x_row + 8 * rows
        t = _packed_products(p, xr[:, None], BF16_PAIRS)
        x_total = tl.reduce(tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), 0, _add)
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += (tl.reduce(t, 0, _add) * 281474976710656.0 - z * x_total) * s  # t * 2**48 = sum x q
    _write_out(acc[None, :], out_ptr, part_ptr, count_ptr, offs_m, offs_n, (offs_m < M)[:, None] & mask_n[None, :],
               split, stride_ps, stride_om, FIXUP, 32)


@triton.jit
def _load_cols(ptrs, mask, EVEN: tl.constexpr):
    """A row of columns; EVEN (no column past N): unmasked, so no register is zeroed before the load."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _w4a16_gemv_rows_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split, split,
    stride_xm, stride_qk, stride_sg, stride_ps, stride_om,
    HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXUP: tl.constexpr,
    BF16_PAIRS: tl.constexpr = False, STAGES: tl.constexpr = 1, EVEN_N: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """`gemv_rows`: one row of x per program; each packed row of a tile is a [BLOCK_N] vector (a thread holds
    BLOCK_N / (32 num_warps) columns of it), and the products of all the tile's rows are summed into one running
    float per column, so no sum crosses threads until the program's end and x's eight values per packed row are
    loaded and scaled once per thread for all its columns (`gemv` sums each tile's rows across warps instead).
    Zero point and scale once per tile and column; sum x by one reduction per tile. EVEN_N: no column past N,
    so the loads take no mask. Needs what `gemv` needs (GROUP_PER_TILE, K a multiple of BLOCK_K)."""
    pdl_prologue(PDL)
    ROWS: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    if BF16_PAIRS:
        x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + pid_m.to(tl.int64) * (stride_xm // 2)
    w_col = qw_ptr + offs_n
    for k0 in range(k_start, k_stop, BLOCK_K):
        t = tl.full([BLOCK_N], 0.0, tl.float32)
        x_sum = tl.reduce(tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), 0, _add)
        for r in tl.static_range(ROWS):
            row = k0 // 8 + r
            p = _load_cols(w_col + row.to(tl.int64) * stride_qk, mask_n, EVEN_N)
            if BF16_PAIRS:
                xr = x_pairs + 4 * row
            else:
                xr = x_row + 8 * row
            t = _packed_products(p, xr, BF16_PAIRS, t)
        g = k0 // group_size
        s = _load_cols(s_ptr + g * stride_sg + offs_n, mask_n, EVEN_N).to(tl.float32)
        z = _load_cols(z_ptr + g * stride_sg + offs_n, mask_n, EVEN_N).to(tl.float32)
        # t * 2**48 = sum x q
        acc = tl.fma(t, s * 281474976710656.0, acc)
        acc = tl.fma(z * s, -x_sum, acc)
    _write_out(acc[None, :], out_ptr, part_ptr, count_ptr, offs_m, offs_n,
               (offs_m < M)[:, None] & (offs_n < N)[None, :], split, stride_ps, stride_om, FIXUP, 32)


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split, split,
    stride_xm, stride_qk, stride_sg, stride_ps, stride_om,
    HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXUP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """`mma`: BLOCK_M rows (>= 16) of x per program, the eight slices of each packed tile fed to tl.dot."""
    pdl_prologue(PDL)
    ROWS: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    k_start = pid_k * k_per_split
    for k_step in range(0, k_per_split, BLOCK_K):
        k0 = k_start + k_step
        rows = k0 // 8 + offs_r
        row_ok = rows < K // 8
        packed = tl.load(qw_ptr + rows[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=row_ok[:, None] & mask_n[None, :], other=0)
        tile = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        if GROUP_PER_TILE:
            # One group: sum x * (1 + q / 16) and x, then (16 * that - (16 + z) * sum x) * s per column. The
            # float 1 + q / 16 is the nibble moved to the top of the mantissa of 1.0 (one shift, one and-or),
            # exact in bf16 too; no per-weight subtraction or scale.
            x_sum = tl.full([BLOCK_M, ROWS], 0.0, tl.float32)
            for j in tl.static_range(8):
                x = tl.load(x_rows + (k0 + 8 * offs_r + j)[None, :], mask=mask_m[:, None] & row_ok[None, :],
                            other=0.0)
                if 4 * j <= 19:
                    field = packed << (19 - 4 * j)
                else:
                    field = packed >> (4 * j - 19)
                v = ((field & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 16
                x_sum += x.to(tl.float32)
                tile = tl.dot(x, v.to(x.dtype), tile)
            g = tl.minimum(k0, K - 1) // group_size  # (the last split's tiles may start past K: x is 0 there)
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            x_total = tl.reduce(x_sum, 1, _add)
            acc += (16.0 * tile - (16.0 + z)[None, :] * x_total[:, None]) * s[None, :]
        else:
            # Groups inside the tile (small groups, act-order's g_idx): w = (q - z) * s per weight, with q - z
            # exact as (q | 0x4B000000) read as float32 (2**23 + q) minus 2**23 + z.
            for j in tl.static_range(8):
                offs_k = k0 + 8 * offs_r + j
                x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & row_ok[None, :], other=0.0)
                qf = (((packed >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                if HAS_GIDX:
                    g = tl.load(g_ptr + offs_k, mask=row_ok, other=0)
                else:
                    g = offs_k // group_size
                ptrs = g[:, None].to(tl.int64) * stride_sg + offs_n[None, :]
                ok = row_ok[:, None] & mask_n[None, :]
                sj = tl.load(s_ptr + ptrs, mask=ok, other=0.0).to(tl.float32)
                zj = tl.load(z_ptr + ptrs, mask=ok, other=0.0).to(tl.float32)
                tile = tl.dot(x, ((qf - (zj + 8388608.0)) * sj).to(x.dtype), tile)
            acc += tile
    _write_out(acc, out_ptr, part_ptr, count_ptr, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], split,
               stride_ps, stride_om, FIXUP)


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on CPU tensors (the tests): any count
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


_KERNELS = {"fma": _w4a16_gemv_kernel, "gemv": _w4a16_colwise_kernel, "gemv_rows": _w4a16_gemv_rows_kernel,
            "mma": _w4a16_mma_kernel, "gemm": _w4a16_gemm_kernel}

# Split-K's per-tile counters: int32 zeros, one buffer per device, each counter back at 0 after every call (so
# calls must not overlap: one stream per device, as the engine runs).
_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_SPLIT_TILES = 1 << 16


def _tile_counters(device: torch.device, tiles: int) -> Optional[torch.Tensor]:
    """The device's counters, made on first use; None (the caller sums the partials itself) for more tiles than
    the buffer holds, or when the first use comes during CUDA-graph capture (made there, the buffer would be
    zeroed only by the graph's replays)."""
    if tiles > MAX_SPLIT_TILES:
        return None
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return counters


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: Optional[torch.Tensor], group_size: int, config: Optional[Config] = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ W [K, N] (qweight [K / 8, N] int32, scales and zeros [groups, N]) -> [M, N].

    config: a w4a16_configs config (the tuning sweep passes its candidates); None: the table's for (M, K, N)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    config = config or w4a16_config(m, k, n)
    block_m, block_n = config["block_m"], config["block_n"]
    block_k, split, k_per_split, group_per_tile = launch_params(m, n, k, group_size, g_idx is not None, config,
                                                                _num_sms(x.device))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    parts, counters = out, None
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    if split > 1:
        parts = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        counters = _tile_counters(x.device, grid[0] * grid[1])
    fixup = split > 1 and counters is not None
    args = (x, qweight, scales, zeros, g_idx if g_idx is not None else qweight, out, parts,
            counters if fixup else qweight, m, n, k, group_size, k_per_split, split,
            x.stride(0), qweight.stride(0), scales.stride(0), m * n, n)
    opts = dict(HAS_GIDX=g_idx is not None, GROUP_PER_TILE=group_per_tile, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, FIXUP=fixup, num_warps=config["num_warps"], num_stages=config["num_stages"],
                **pdl_options(x.device, m))
    kernel = config["kernel"]
    if kernel in ("gemv", "gemv_rows"):
        if group_per_tile and k % block_k == 0:
            opts["BF16_PAIRS"] = x.dtype == torch.bfloat16 and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0
            opts["STAGES"] = opts.pop("num_stages")  # the loop's pipeline depth (tl.range), not the launch's
            if kernel == "gemv_rows":
                opts["EVEN_N"] = n % block_n == 0
        else:  # groups inside a tile (act-order, small groups) or a last partial tile: `fma`, which masks them
            kernel = "fma"
    _KERNELS[kernel][grid](*args, **opts)
    if split > 1 and not fixup:
        out = parts.sum(0).to(x.dtype)
    return out
