"""Fused elementwise kernels for CUDA, in Triton: RMSNorm (+ residual add), SiLU-and-mul, and neox rotary.

Why: in eager mode each of these is 3 to 7 torch kernels, every one a full pass over the activations (and the
float32 upcasts double those bytes). A prefill step of 8192 tokens of Llama-8B moves ~470 MB through SiLU-and-mul
alone; one fused pass reads and writes each element once. In a decode CUDA graph the launches are free, but
the bytes are the same story at smaller size.

Each kernel computes exactly what the torch layer does, in the same order and precision (float32 math, results
rounded to the activation dtype at the same points), so the two paths agree to the last bit in float32 and
within rounding in bf16/fp16. The layers call these only for CUDA tensors; the CPU keeps the torch code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    dtype = x.dtype
    if HAS_RES:  # the sum is rounded to the activation dtype, as the unfused add is
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * rmsnorm(x [+ residual]) over the last dim. With `residual`, the sum x + residual is written into
    `residual` in place (it is the next block's residual) and the normed sum is returned."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out.view(x.shape)
    if residual is not None:
        r2 = residual.view(-1, n)
        assert r2.stride(-1) == 1, "the residual must be row-contiguous"
    else:
        r2 = x2
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, out, x2.stride(0), r2.stride(0), out.stride(0), n, eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=warps,
    )
    return out.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # F.silu rounds to the dtype before the product
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2*d] = [gate | up] -> silu(gate) * up [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], d)
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
        x2, out, x2.stride(0), out.stride(0), d, BLOCK=block, num_warps=4,
    )
    return out.view(*x.shape[:-1], d)


@triton.jit
def _rotate_heads(base, offs, ok, cos, sin, HALF: tl.constexpr):
    """Rotate the heads of one token at `base` (rows of head x first-half offsets) in place, in float32."""
    x1 = tl.load(base + offs, mask=ok, other=0.0)
    x2 = tl.load(base + offs + HALF, mask=ok, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    tl.store(base + offs, (f1 * cos - f2 * sin).to(x1.dtype), mask=ok)
    tl.store(base + offs + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cache_ptr, stride_qt, stride_kt, stride_cache, num_q_heads, num_k_heads,
    HALF: tl.constexpr, HEADS_P2: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * stride_cache + offs)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs)[None, :]
    heads = tl.arange(0, HEADS_P2)[:, None]
    d1 = heads * (2 * HALF) + offs[None, :]
    _rotate_heads(q_ptr + tok * stride_qt, d1, heads < num_q_heads, cos, sin, HALF)
    _rotate_heads(k_ptr + tok * stride_kt, d1, heads < num_k_heads, cos, sin, HALF)


def rotary_neox_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 head_dim: int) -> None:
    """Rotate q [T, Hq*D] and k [T, Hk*D] in place (rows may be strided views of a fused QKV output).

    cos_sin_cache [max_pos, D] float32 holds cos | sin of each position, as RotaryEmbedding builds it."""
    t = positions.shape[0]
    if t == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    num_q, num_k = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    _rotary_kernel[(t,)](
        q, k, positions, cos_sin_cache, q.stride(0), k.stride(0), cos_sin_cache.stride(0), num_q, num_k,
        HALF=head_dim // 2, HEADS_P2=triton.next_power_of_2(max(num_q, num_k)), num_warps=4,
    )
