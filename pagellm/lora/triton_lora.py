"""Batched LoRA on CUDA: two Triton kernels over a flat batch where every token names its adapter slot.

    shrink:  u[t, :] = x[t, :] @ A[slot[t]]^T          A [L, R, K]  ->  u [T, R] float32
    expand:  y[t, :] += u[t, :] @ B[slot[t]]^T         B [L, N, R]  (in place on the base layer's output)

A program takes a block of tokens in slot order (`order`: the token indices sorted by slot, the base model's last)
and loops over the adapter slots, doing a tensor-core dot only for the slots its tokens use. Sorted, a block
seldom sees more than one or two slots, so each adapter's A and B are read about once per block of its own
tokens; in batch order (a decode batch mixes every adapter in every block) each block would read all of them.
Tokens with slot -1 (the base model) get nothing added. The grid depends only on the token count, so the
kernels are captured in the decode CUDA graphs and replay with whatever slots and order the step wrote.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU installs have no triton: layers.py then uses the torch path
    triton = None

if triton is not None:

    # The batch's token count (and what follows from it) is not specialized on: one compiled kernel serves every
    # step, instead of a compile (~1 s) the first time a step's count is 1, or a multiple of 16, or not.
    @triton.jit(do_not_specialize=["T", "K_PER_SPLIT", "stride_us"])
    def _shrink_kernel(x_ptr, a_ptr, slot_ptr, order_ptr, u_ptr, T, K, R, K_PER_SPLIT, stride_xt, stride_al,
                       stride_ar, stride_us, stride_ut, L: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        offs_p = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = tl.load(order_ptr + offs_p, mask=offs_p < T, other=0)  # this block's tokens, in slot order
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        t_mask = (offs_p < T) & (offs_t < T)
        r_mask = offs_r < R
        slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for s in range(0, L):
            sel = slots == s
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                k_start = tl.program_id(2) * K_PER_SPLIT
                for k0 in range(0, K_PER_SPLIT, BLOCK_K):
                    kk = k_start + k0 + offs_k
                    x = tl.load(x_ptr + offs_t[:, None] * stride_xt + kk[None, :],
                                mask=sel[:, None] & (kk[None, :] < K), other=0.0)
                    a = tl.load(a_ptr + s * stride_al + offs_r[None, :] * stride_ar + kk[:, None],
                                mask=r_mask[None, :] & (kk[:, None] < K), other=0.0)
                    acc += tl.dot(x, a, input_precision=PRECISION)
        # Each split of K writes its own partial sums (the expand adds them): no atomics, no zeroed buffer. A block
        # of base-model tokens writes nothing: the expand reads u only for blocks with adapter tokens, and only
        # those tokens' rows count there.
        if tl.max(slots, axis=0) >= 0:
            u_ptrs = u_ptr + tl.program_id(2) * stride_us + offs_t[:, None] * stride_ut + offs_r[None, :]
            tl.store(u_ptrs, acc, mask=t_mask[:, None] & r_mask[None, :])

    @triton.jit(do_not_specialize=["T", "SPLITS", "stride_us"])
    def _expand_kernel(u_ptr, b_ptr, slot_ptr, order_ptr, y_ptr, T, N, R, SPLITS, SLICE1, SLICE2, stride_us,
                       stride_ut, stride_bl, stride_bn, stride_yt, L: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        offs_p = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = tl.load(order_ptr + offs_p, mask=offs_p < T, other=0)  # this block's tokens, in slot order
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        # A merged layer's B is block diagonal: output columns of slice i (from SLICE1, SLICE2 on) use only the
        # rank columns [i * R, (i + 1) * R). The host passes SLICE1 = SLICE2 = N when a block may straddle slices.
        slice_idx = (tl.program_id(1) * BLOCK_N >= SLICE1).to(tl.int32) + (tl.program_id(1) * BLOCK_N >= SLICE2)
        offs_r = slice_idx * R + tl.arange(0, BLOCK_R)
        t_mask = (offs_p < T) & (offs_t < T)
        n_mask = offs_n < N
        r_mask = offs_r < (slice_idx + 1) * R
        slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
        if tl.max(slots, axis=0) >= 0:  # a block of base-model tokens (the sorted batch's tail) has nothing to add
            lora_rows = (t_mask & (slots >= 0))[:, None]
            u_ptrs = u_ptr + offs_t[:, None] * stride_ut + offs_r[None, :]
            u = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for split in range(0, SPLITS):  # the shrink's partial sums over K
                u += tl.load(u_ptrs + split * stride_us, mask=lora_rows & r_mask[None, :], other=0.0)
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for s in range(0, L):
                sel = slots == s
                if tl.sum(sel.to(tl.int32), axis=0) > 0:
                    b = tl.load(b_ptr + s * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None],
                                mask=n_mask[None, :] & r_mask[:, None], other=0.0)
                    us = tl.where(sel[:, None], u, 0.0).to(b.dtype)
                    acc += tl.dot(us, b, input_precision=PRECISION)
            y_mask = lora_rows & n_mask[None, :]
            y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=y_mask)


# Tile sizes (benchmarks/lora_kernel.py times the alternatives on a GPU). target_programs: the shrink splits K
# until about this many programs run (about four per SM of an H100/H200).
# The values: the best at decode (256 tokens) on an H200, within 4% of the best at prefill (4096 tokens).
CONFIG = {"shrink_block_t": 16, "target_programs": 512, "expand_block_t": 32, "expand_block_n": 128}


def _precision(dtype: torch.dtype) -> str:
    """float32 weights get float32 dots (a float32 engine matches transformers), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def slot_order(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The token indices sorted by slot, the base model's (-1) last: the `order` the kernels take (LoRAManager.set_step
    computes it on the host from each step's per-token slots)."""
    key = torch.where(slots < 0, num_slots, slots)
    return torch.argsort(key, stable=True).to(torch.int32)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """u [splits, T, R] float32, whose sum over splits is each token's input through its slot's A (rows of
    slot -1 tokens are not written); `order`: slot_order's. Only lora_expand_ reads it."""
    t, k = x.shape
    num_loras, r, _ = a.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_r = min(64, _pow2(r))
    block_t = CONFIG["shrink_block_t"]
    tiles = triton.cdiv(max(t, 1), block_t) * triton.cdiv(r, block_r)
    # Few tokens make few tiles: split the reduction over K too (partial sums, added by the expand), so that a
    # decode batch still fills the GPU's SMs. A model's small K (the tests') stays in one split.
    split_k = max(1, min(triton.cdiv(k, 256), triton.cdiv(CONFIG["target_programs"], tiles)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), 64) * 64
    split_k = triton.cdiv(k, k_per_split)
    u = torch.empty(split_k, t, r, dtype=torch.float32, device=x.device)
    if t == 0:
        return u
    grid = (triton.cdiv(t, block_t), triton.cdiv(r, block_r), split_k)
    _shrink_kernel[grid](x, a, slots, order, u, t, k, r, k_per_split, x.stride(0), a.stride(0), a.stride(1),
                         u.stride(0), u.stride(1), L=num_loras, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=64,
                         PRECISION=_precision(x.dtype))
    return u


def lora_expand_(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, order: torch.Tensor,
                 slice_sizes: Optional[list[int]] = None) -> torch.Tensor:
    """y [T, N] += u @ B[slot]^T per token (u: lora_shrink's partial sums), in place (tokens with slot -1
    untouched). slice_sizes: a merged layer's output slices (at most 3), B block diagonal with equal rank widths."""
    t, n = y.shape
    num_loras, _, r = b.shape
    block_t, block_n = CONFIG["expand_block_t"], CONFIG["expand_block_n"]
    bounds = [n, n]
    if slice_sizes and 1 < len(slice_sizes) <= 3 and all(size % block_n == 0 for size in slice_sizes):
        r //= len(slice_sizes)  # each column block reads only its slice's rank columns
        bounds = [sum(slice_sizes[:i]) for i in (1, 2)] if len(slice_sizes) == 3 else [slice_sizes[0], n]
    if t == 0:
        return y
    if y.stride(-1) != 1:
        raise ValueError("lora_expand_: the output must be contiguous in its last dim")
    grid = (triton.cdiv(t, block_t), triton.cdiv(n, block_n))
    _expand_kernel[grid](u, b, slots, order, y, t, n, r, u.shape[0], *bounds, u.stride(0), u.stride(1), b.stride(0),
                         b.stride(1), y.stride(0), L=num_loras, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=_pow2(r), PRECISION=_precision(b.dtype))
    return y
