"""Fused elementwise kernels for CUDA, in Triton: RMSNorm (+ residual add), SiLU-and-mul, and neox rotary; the
first two optionally end in the per-token fp8/int8 quantization that a W8A8 linear after them wants.

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

from pagellm.model_executor.layers.pdl import pdl_options, pdl_prologue
from pagellm.model_executor.layers.quantization.triton_quant import on_grid, row_scale
from pagellm.model_executor.layers.quantization.w8a8 import MIN_SCALE, QMAX


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, s_ptr, stride_x, stride_r, stride_o, n_cols, eps, qmax, min_scale,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, IS_INT8: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
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
    y = (w * y).to(dtype)
    if QUANT:  # what quantize_per_row_triton makes of the normed row, without writing it in 16 bits first
        y = y.to(tl.float32)
        scale = row_scale(tl.abs(y), qmax, min_scale)
        tl.store(s_ptr + row, scale)
        y = on_grid(y, scale, qmax, IS_INT8)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             quant_dtype: torch.dtype | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * rmsnorm(x [+ residual]) over the last dim. With `residual`, the sum x + residual is written into
    `residual` in place (it is the next block's residual) and the normed sum is returned. With `quant_dtype`
    (fp8 or int8), the normed rows come back quantized per row for a W8A8 linear: (q, scale [rows, 1] float32),
    the same bits as quantizing the 16-bit result."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x2.shape, dtype=quant_dtype or x.dtype, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device) if quant_dtype is not None else out
    if rows > 0:
        if residual is not None:
            r2 = residual.view(-1, n)
            assert r2.stride(-1) == 1, "the residual must be row-contiguous"
        else:
            r2 = x2
        block = triton.next_power_of_2(n)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, scale, x2.stride(0), r2.stride(0), out.stride(0), n, eps,
            QMAX.get(quant_dtype, 1.0), MIN_SCALE, HAS_RES=residual is not None, QUANT=quant_dtype is not None,
            IS_INT8=quant_dtype == torch.int8, BLOCK=block, num_warps=warps, **pdl_options(x.device, rows),
        )
    if quant_dtype is not None:
        return out, scale
    return out.view(x.shape)


@triton.jit
def _silu_mul(x_row, cols, d):
    """silu(gate) * up at columns `cols` of a [gate | up] row, rounded to the activation dtype as F.silu(gate) *
    up is (silu rounds before the product), as float32."""
    ok = cols < d
    gate = tl.load(x_row + cols, mask=ok, other=0.0)
    up = tl.load(x_row + d + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = _silu_mul(x_ptr + row * stride_x, cols, d)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=cols < d)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, d, qmax, min_scale,
                               IS_INT8: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One row per program: its max |silu(gate) * up| first, then the row again, quantized (recomputing the
    product costs less than writing and reading it in 16 bits). Keeping a whole 14336-wide row in registers
    instead (one read, 16 warps a row) was slower on an H200: 6.2 against 5.0 us per output token of
    llama8b-mixed; so was a (row, chunk) grid in two kernels (chunk maxima, then the quantized chunks): 2.1 +
    2.9 us."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    amax = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, d, BLOCK):
        amax = tl.maximum(amax, tl.abs(_silu_mul(x_row, start + cols, d)))
    scale = row_scale(amax, qmax, min_scale)
    tl.store(s_ptr + row, scale)
    for start in range(0, d, BLOCK):
        q = on_grid(_silu_mul(x_row, start + cols, d), scale, qmax, IS_INT8)
        tl.store(q_ptr + row * stride_q + start + cols, q.to(q_ptr.dtype.element_ty), mask=start + cols < d)


def silu_and_mul(x: torch.Tensor, quant_dtype: torch.dtype | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., 2*d] = [gate | up] -> silu(gate) * up [..., d]; with `quant_dtype` (fp8 or int8) the result comes
    back quantized per row, (q [rows, d], scale [rows, 1] float32), as rms_norm's does."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, d), dtype=quant_dtype or x.dtype, device=x.device)
    if quant_dtype is not None:
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        if rows > 0:
            block = min(2048, triton.next_power_of_2(d))
            _silu_and_mul_quant_kernel[(rows,)](x2, out, scale, x2.stride(0), out.stride(0), d, QMAX[quant_dtype],
                                                MIN_SCALE, IS_INT8=quant_dtype == torch.int8, BLOCK=block,
                                                num_warps=4 if block <= 1024 else 8, **pdl_options(x.device, rows))
        return out, scale
    if rows > 0:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), d, BLOCK=block, num_warps=4, **pdl_options(x.device, rows),
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
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
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
        **pdl_options(q.device, t),
    )
