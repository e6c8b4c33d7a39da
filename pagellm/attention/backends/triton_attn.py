"""Paged attention on CUDA in Triton: same `forward(q, k, v, kv_cache, meta, scale)` as `torch_ref`.

Why these kernels, and not something torch already has:
- torch SDPA and `varlen_attn` want each request's K/V contiguous. The cache is paged ([2, num_blocks,
  block_size, Hk, D], a request's blocks anywhere), so using them means gathering every request's whole
  context into a fresh buffer every step and layer: O(context) extra reads and writes, plus one call per
  request. That copy alone costs as much as decode attention itself.
- flex_attention can be taught the paged layout through index tricks, but it compiles per shape/mask and
  recompiles as batch composition changes, which a continuous-batching step changes every time.
- So the kernels here read K/V straight through the block table. There are three of them, plus a reduce:

1. `_write_kv_kernel`: scatters this step's K/V [T, Hk, D] into the cache at `slot_mapping`; one program per
   token (and chunk of Hk*D). A slot of -1 means a padded token (CUDA-graph padding): the program skips it.
2. `_paged_attn_kernel`, one source compiled in two modes:
   - prefill mode (requests num_decodes..num_reqs-1): a program owns BLOCK_Q consecutive query tokens of one
     request times the GROUP query heads that share one KV head (rows = BLOCK_Q * GROUP_P2, so each K/V tile
     is loaded once for the whole group), walks the request's KV tiles through the block table with an online
     softmax (fp32 statistics and accumulator), and applies the causal mask offset by the cached prefix
     (query i of a request sits at position seq_len - query_len + i). Tiles wholly below the first query's
     position run unmasked; only the few diagonal tiles pay for masking. The flat grid has
     (prefill tokens // BLOCK_Q + prefill requests) programs, a bound on the tiles needed that the host knows
     without reading device memory; each program finds its request by binary search over query_start_loc.
   - decode mode (the first num_decodes requests, one query each): one program per (request, KV head,
     split); rows are that KV head's query heads (padded to 16 for the tensor-core dot).
3. Split-KV (flash-decoding) for decode: when few (request, KV head) pairs exist for the chip (few decodes,
   e.g. batch 1 at 32k context) one program per pair would leave most SMs idle while it streams the whole
   context alone. Then each pair's KV range is cut into `num_splits` tile-aligned parts, each program writes a
   partial output and its log-sum-exp, and `_reduce_splits_kernel` combines them. See `decode_num_splits`:
   split only when num_decodes * Hk < SMs and max_seq_len >= 256; aim at ~4 programs per SM, at least 64
   keys per part, at most 64 parts. The parts are cut from each request's own seq_len on the device, so a
   request much shorter than max_seq_len still spreads evenly. Measured on an H100 (Llama-8B heads, bf16,
   attention alone in a CUDA graph): B=1 x 32k 54 us with 64 parts vs 772 us unsplit; B=16 x 8k (128
   programs) 187 us with 5 parts vs 229 us; B=32 x 2k (256 programs) 95 us unsplit vs 108 us with 3 parts,
   hence the threshold of one program per SM. Short contexts on an H200 (`attention_kernels.py --short`,
   h200-tp1-attn-decode-short.json): B=1 x 384 5.6 us with 6 parts vs 9.0 unsplit, B=1 x 256 5.5 with 4 vs
   6.8, but B=1 x 128 4.6 unsplit vs 5.3 with 2 (the reduce kernel's launch costs more than it saves), hence
   256 and 64.

Launch path: no `.item()`/`.tolist()`, no device->host reads; grids come from host ints (num_actual_tokens,
num_decodes, num_reqs, max_seq_len) only. The decode path is CUDA-graph capturable: its grid depends only on
(num_decodes, num_kv_heads, max_seq_len), so a graph runner passes a fixed max_seq_len (e.g. max_model_len)
for a captured batch size; padded decode slots with seq_len 0 produce zeros, and slot -1 skips the cache write.

Supported: head dims that are powers of two in [16, 256]; block sizes that are powers of two; any GQA ratio
(non-powers of two are padded and masked); bf16, fp16 and fp32 (fp32 dots run in IEEE fp32, for tests).

FP8 KV cache (kv_cache_dtype="fp8", attention/fp8_kv.py; KV_FP8 below): the write kernel stores x / scale in
e4m3, saturated; the attention kernel loads e4m3 tiles (half the bytes of bf16: decode is bound by reading
them), widens them exactly to fp16 (fp32 for fp32 tests), and folds the K scale into the softmax scale and the
V scale into the output. q is not quantized: it is multiplied by the softmax scale and rounded to fp16 (10
mantissa bits, more than bf16's 7), so the dots run in fp16 with float32 sums. The scales
are read from device memory in the kernels (never as host floats), so a captured graph reads the layer's
loaded values.
Sliding-window layers (WINDOW > 0, a compile-time constant: a model has one or two values, full and its
window): a query at position i sees keys > i - window. A program
starts at the tile holding its first row's window start (so a decode reads at most window keys plus a tile)
and masks every tile, since each may hold keys outside some row's window.
Other head dims fall back to torch_ref (correct, slow).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from pagellm.attention import fp8_kv
from pagellm.attention.metadata import AttentionMetadata
from pagellm.model_executor.layers.pdl import pdl_options, pdl_prologue

LOG2E = 1.4426950408889634
FP8_MAX = tl.constexpr(fp8_kv.FP8_MAX)

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_b, stride_c_s, stride_c_h,
    num_elems,
    HEAD_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_E: tl.constexpr, KV_FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padded token
        return
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < num_elems
    h = e // HEAD_D
    d = e % HEAD_D
    key = tl.load(k_ptr + tok * stride_kt + h * stride_kh + d, mask=ok)
    val = tl.load(v_ptr + tok * stride_vt + h * stride_vh + d, mask=ok)
    if KV_FP8:  # x / scale (IEEE division, as torch_ref), saturated to e4m3's finite range
        key = tl.clamp(tl.div_rn(key.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        val = tl.clamp(tl.div_rn(val.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    dst = cache_ptr + blk * stride_c_b + off * stride_c_s + h * stride_c_h + d
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + stride_c_kv, val.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _attn_kv_tile(
    acc, l_i, m_i, q, k_base, v_base, bt_row, start, kv_hi, q_pos, offs_n, offs_d,
    stride_c_b, stride_c_s, scale_log2,
    BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, KV_FP8: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One KV tile [start, start + TILE_N) of the online softmax. With MASK, keys >= kv_hi and keys after a
    row's query position are masked (and K/V loads past kv_hi are skipped, so garbage there cannot leak);
    with a WINDOW (> 0) also keys at or before a row's query position - WINDOW.
    KV_FP8: K/V tiles are e4m3, widened to q's dtype exactly (the scales are applied by the caller)."""
    n = start + offs_n
    if MASK:
        n_ok = n < kv_hi
        page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        page = tl.load(bt_row + n // BLOCK_SIZE)
    kv_off = page.to(tl.int64) * stride_c_b + (n % BLOCK_SIZE) * stride_c_s
    kv_off2 = kv_off[:, None] + offs_d[None, :]
    if MASK:
        k = tl.load(k_base + kv_off2, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + kv_off2)
    if KV_FP8:
        k = k.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    if MASK:
        visible = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible = visible & (n[None, :] > q_pos[:, None] - WINDOW)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASK:
        v = tl.load(v_base + kv_off2, mask=n_ok[:, None], other=0.0)
    else:
        v = tl.load(v_base + kv_off2)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


# Step-dependent ints are not specialized: Triton would otherwise compile a variant per (value == 1, value % 16
# == 0) combination of each, seconds of JIT stalls in the middle of serving (measured: 2-3 s per new mixed
# step shape on an H100). Their values only bound loops and masks, so the specialization gains nothing here.
@triton.jit(do_not_specialize=["first_req", "num_reqs", "num_splits"])
def _paged_attn_kernel(
    q_ptr, o_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, part_o_ptr, part_lse_ptr, k_scale_ptr, v_scale_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_b, stride_c_s, stride_c_h, stride_bt,
    first_req, num_reqs, num_splits,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DECODE: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, KV_FP8: tl.constexpr,
    WINDOW: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # --- which request and which query tile this program owns
    if DECODE:
        req = pid
        q_tile = 0
    else:
        # Request r's tiles start at (qsl[r] - qsl[first]) // BLOCK_Q + (r - first): strictly increasing in r
        # and leaving each request at least cdiv(query_len, BLOCK_Q) tiles. Find the last r starting <= pid.
        q_base = tl.load(qsl_ptr + first_req)
        lo = pid * 0 + first_req  # (pid * 0 keeps these i32 tensors even when an arg is specialized to 1)
        hi = pid * 0 + num_reqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            mid_start = (tl.load(qsl_ptr + mid) - q_base) // BLOCK_Q + (mid - first_req)
            go = mid_start <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        req = lo
        q_tile = pid - ((tl.load(qsl_ptr + req) - q_base) // BLOCK_Q + (req - first_req))
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    q_off0 = q_tile * BLOCK_Q
    if q_off0 >= q_len:  # a spare tile of the bound
        return

    # --- rows: BLOCK_Q tokens x GROUP_P2 query heads of KV head kvh
    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // GROUP_P2
    head = offs_m % GROUP_P2
    row_ok = (tok < BLOCK_Q) & (q_off0 + tok < q_len) & (head < GROUP)
    q_row = (q_start + q_off0 + tok).to(tl.int64)
    q_head = kvh * GROUP + head
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if KV_FP8:  # q . (k8 * s_k) = (q . k8) * s_k: fold the K scale into the softmax scale
        if q.dtype.is_fp32():
            scale_log2 = scale_log2 * tl.load(k_scale_ptr)
        else:
            # Dots in fp16: an e4m3 pair widens to fp16 in one conversion, to bf16 in three, and at bf16 the
            # conversions, not the bytes, bounded decode (half the bandwidth of a bf16 cache on an H200). q is
            # scaled first (by the softmax scale, |q| / 8 or less), so fp16's range holds it.
            q = (q.to(tl.float32) * scale_log2).to(tl.float16)
            scale_log2 = tl.load(k_scale_ptr)
    else:
        q = q.to(cache_ptr.dtype.element_ty)
    ctx0 = seq_len - q_len + q_off0  # position of the tile's first query
    q_pos = ctx0 + tok

    # --- KV range: keys < kv_hi matter to some row; keys < full_hi are visible to every valid row
    kv_hi = tl.minimum(seq_len, ctx0 + BLOCK_Q)
    full_hi = ctx0 + 1
    if WINDOW > 0:  # keys before the tile's first window start are seen by no row: start at its tile
        win_lo = tl.maximum(ctx0 - WINDOW + 1, 0) // TILE_N * TILE_N
    else:
        win_lo = 0
    if SPLIT:
        part = tl.cdiv(tl.cdiv(kv_hi - win_lo, num_splits), TILE_N) * TILE_N
        kv_lo = win_lo + split * part
        kv_hi = tl.minimum(kv_hi, kv_lo + part)
    else:
        kv_lo = win_lo
    if WINDOW > 0:  # every tile may hold keys outside some row's window: all of them are masked
        n_full = 0
    else:
        n_full = tl.maximum(tl.minimum(kv_hi, full_hi) - kv_lo, 0) // TILE_N
    kv_mid = kv_lo + n_full * TILE_N

    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    k_base = cache_ptr + kvh * stride_c_h
    v_base = k_base + stride_c_kv
    offs_n = tl.arange(0, TILE_N)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for start in range(kv_lo, kv_mid, TILE_N):
        acc, l_i, m_i = _attn_kv_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, start, kv_hi, q_pos, offs_n,
                                      offs_d, stride_c_b, stride_c_s, scale_log2, BLOCK_SIZE, False, PREC,
                                      KV_FP8, WINDOW)
    for start in range(kv_mid, kv_hi, TILE_N):
        acc, l_i, m_i = _attn_kv_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, start, kv_hi, q_pos, offs_n,
                                      offs_d, stride_c_b, stride_c_s, scale_log2, BLOCK_SIZE, True, PREC,
                                      KV_FP8, WINDOW)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_FP8:  # p . (v8 * s_v) = (p . v8) * s_v
        out = out * tl.load(v_scale_ptr)
    if SPLIT:
        num_heads = tl.num_programs(1) * GROUP
        idx = (req.to(tl.int64) * num_heads + q_head) * num_splits + split
        tl.store(part_o_ptr + idx[:, None] * HEAD_D + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_i))
        tl.store(part_lse_ptr + idx, lse, mask=row_ok)
    else:
        tl.store(o_ptr + q_row[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, qsl_ptr, num_splits, stride_ot, stride_oh,
    HEAD_D: tl.constexpr, SPLITS_P2: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < num_splits
    base = (req * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)  # empty parts: exp2(-inf) = 0
    denom = tl.sum(w, 0)
    offs_d = tl.arange(0, HEAD_D)
    part = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    row = tl.load(qsl_ptr + req).to(tl.int64)
    tl.store(o_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------
# Launch configuration (fixed tables, no autotuning: autotune would time on first call, and graph capture
# needs the choice made before capture anyway)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows per program (query tokens x padded group); for decode, max(16, group)
    tile_n: int  # keys per KV tile
    num_warps: int
    num_stages: int


# Defaults picked by `benchmarks/attention_kernels.py --sweep` on an H100 (bf16, Llama-8B heads):
# prefill D=128, 4x2048 causal: (64 rows, 64 keys, 4 warps, 2 stages) 437 us = 315 TFLOP/s, 190 registers, no
# spills; (128, 32, 4, 3) as fast (436 us) but at 255 registers with spills; the first default (128, 64, 8, 3)
# 485 us; 8 warps with 64-row tiles up to 875 us. Decode: (64 keys, 4 warps, 2 stages) 360 us at B=256 x 1024
# (95% of the 3.0 TB/s copy rate); other tiles and stage counts within 1-8%, 8 warps worse.
def prefill_config(head_dim: int, group_p2: int, elem_size: int) -> KernelConfig:
    if head_dim <= 64:
        cfg = KernelConfig(128, 64, 4, 3)
    elif head_dim <= 128:
        cfg = KernelConfig(64, 64, 4, 2)
    else:
        cfg = KernelConfig(64, 32, 8, 2)
    if elem_size >= 4:  # fp32 (tests only): IEEE dots run on FMAs; half the tiles, 8 warps
        cfg = KernelConfig(max(16, cfg.block_m // 2), max(16, cfg.tile_n // 2), 8, 2)
    return KernelConfig(max(cfg.block_m, group_p2, 16), cfg.tile_n, cfg.num_warps, cfg.num_stages)


def decode_config(head_dim: int, group_p2: int, elem_size: int) -> KernelConfig:
    """elem_size: the cache's bytes per element. An fp8 cache takes tiles of 128 keys (same bytes as 64 of bf16;
    on an H200 the fastest at Llama-8B shapes: `benchmarks/attention_kernels.py --decode-only --sweep --kv-dtype
    fp8`)."""
    block_m = max(16, group_p2)
    if elem_size == 1:
        return KernelConfig(block_m, 128 if head_dim <= 128 else 64, 4, 2)
    if elem_size >= 4:
        return KernelConfig(block_m, 32, 8, 2)
    if head_dim <= 128:
        return KernelConfig(block_m, 64, 4, 2)
    return KernelConfig(block_m, 32, 4, 2)


# Split-KV heuristic (see the module docstring).
SPLIT_MAX_PROGRAMS_PER_SM = 1  # split only below this many (request, KV head) programs per SM
SPLIT_TARGET_PROGRAMS_PER_SM = 4
SPLIT_MIN_SEQ = 256
SPLIT_MIN_KEYS = 64
SPLIT_MAX = 64


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter on CPU tensors (local checks)
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def decode_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many parts each decode's KV range is cut into. Host ints only, so the grid is graph-stable."""
    programs = num_decodes * num_kv_heads
    if programs == 0 or programs >= SPLIT_MAX_PROGRAMS_PER_SM * num_sms or max_seq_len < SPLIT_MIN_SEQ:
        return 1
    want = triton.cdiv(SPLIT_TARGET_PROGRAMS_PER_SM * num_sms, programs)
    return max(1, min(want, max_seq_len // SPLIT_MIN_KEYS, SPLIT_MAX))


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------


def _supported(head_dim: int, block_size: int) -> bool:
    pow2 = lambda x: x > 0 and (x & (x - 1)) == 0  # noqa: E731
    return pow2(head_dim) and 16 <= head_dim <= 256 and pow2(block_size)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             num_tokens: int, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> None:
    """Store k/v [T, Hk, D] (first num_tokens rows) at slot_mapping in kv_cache [2, NB, BS, Hk, D]; an FP8 cache
    stores x / scale, saturated (attention/fp8_kv.py)."""
    if num_tokens == 0:
        return
    fp8 = fp8_kv.is_fp8(kv_cache.dtype)
    k_scale, v_scale = _scales(k_scale, v_scale, k.device)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    assert k.stride(2) == 1 and v.stride(2) == 1
    num_elems = num_kv_heads * head_dim
    block_e = min(triton.next_power_of_2(num_elems), 4096)
    grid = (num_tokens, triton.cdiv(num_elems, block_e))
    _write_kv_kernel[grid](
        k, v, kv_cache, slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_elems,
        HEAD_D=head_dim, BLOCK_SIZE=kv_cache.shape[2], BLOCK_E=block_e, KV_FP8=fp8, num_warps=4,
        **pdl_options(k.device, num_tokens),
    )


def _prec(q: torch.Tensor) -> str:
    """Dots run in q's dtype (an FP8 cache's tiles are widened to it); float32 (tests) in IEEE fp32."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _scales(k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' scale pointers: the layer's buffers, or 1.0 for a scale not given (direct calls: tests,
    benchmarks). Only an FP8 cache reads them."""
    one = _unit_scale(device) if k_scale is None or v_scale is None else None
    return (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)


@functools.lru_cache(maxsize=None)
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def attend_decode(q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, num_splits: int | None = None, cfg: KernelConfig | None = None,
                  k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                  sliding_window: Optional[int] = None) -> None:
    """Attention for the first meta.num_decodes requests (one query each), written into out."""
    fp8 = fp8_kv.is_fp8(kv_cache.dtype)
    k_scale, v_scale = _scales(k_scale, v_scale, q.device)
    nd = meta.num_decodes
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    if cfg is None:
        cfg = decode_config(head_dim, group_p2, 4 if q.element_size() >= 4 else kv_cache.element_size())
    if num_splits is None:
        # A window bounds the keys one decode reads: split by that length, not the context's.
        span = meta.max_seq_len if sliding_window is None else min(meta.max_seq_len, sliding_window)
        num_splits = decode_num_splits(nd, num_kv_heads, span, _device_sms(q.device))
    split = num_splits > 1
    if split:
        part_o = torch.empty((nd, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((nd, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    bt = meta.block_tables
    _paged_attn_kernel[(nd, num_kv_heads, num_splits)](
        q, out, kv_cache, bt, meta.seq_lens, meta.query_start_loc, part_o, part_lse, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), bt.stride(0),
        0, nd, num_splits,
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=1, BLOCK_M=cfg.block_m, TILE_N=cfg.tile_n, HEAD_D=head_dim,
        BLOCK_SIZE=kv_cache.shape[2], DECODE=True, SPLIT=split, PREC=_prec(q), KV_FP8=fp8,
        WINDOW=sliding_window or 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_options(q.device, nd),
    )
    if split:
        _reduce_splits_kernel[(nd, num_heads)](
            part_o, part_lse, out, meta.query_start_loc, num_splits, out.stride(0), out.stride(1),
            HEAD_D=head_dim, SPLITS_P2=triton.next_power_of_2(num_splits), num_warps=4,
            **pdl_options(q.device, nd),
        )


def attend_prefill(q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float, cfg: KernelConfig | None = None, k_scale: Optional[torch.Tensor] = None,
                   v_scale: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None) -> None:
    """Attention for requests num_decodes..num_reqs-1 (prefill chunks, any query length), written into out."""
    fp8 = fp8_kv.is_fp8(kv_cache.dtype)
    k_scale, v_scale = _scales(k_scale, v_scale, q.device)
    nd, nr = meta.num_decodes, meta.num_reqs
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    if cfg is None:
        cfg = prefill_config(head_dim, group_p2, q.element_size())
    block_q = max(1, cfg.block_m // group_p2)
    # Decodes own exactly tokens [0, nd); the rest belong to prefills. This bounds the tiles needed.
    num_tiles = (meta.num_actual_tokens - nd) // block_q + (nr - nd)
    bt = meta.block_tables
    _paged_attn_kernel[(num_tiles, num_kv_heads, 1)](
        q, out, kv_cache, bt, meta.seq_lens, meta.query_start_loc, out, out, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), bt.stride(0),
        nd, nr, 1,
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_M=block_q * group_p2, TILE_N=cfg.tile_n,
        HEAD_D=head_dim, BLOCK_SIZE=kv_cache.shape[2], DECODE=False, SPLIT=False, PREC=_prec(q), KV_FP8=fp8,
        WINDOW=sliding_window or 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, 
        **pdl_options(q.device, meta.num_actual_tokens),
    )


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata, scale: float, k_scale: Optional[torch.Tensor] = None,
            v_scale: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] for the flat batch; returns [T, Hq, D] (rows past num_actual_tokens are
    left unwritten). k_scale/v_scale: the layer's FP8 KV-cache scales (float32 [1] on the device; None: 1.0),
    read only when kv_cache is float8. sliding_window: a query at position i sees keys > i - window."""
    head_dim, block_size = q.shape[2], kv_cache.shape[2]
    if not _supported(head_dim, block_size):
        from pagellm.attention.backends import torch_ref

        return torch_ref.forward(q, k, v, kv_cache, meta, scale, k_scale, v_scale, sliding_window)
    if q.stride(2) != 1:
        q = q.contiguous()
    assert kv_cache.stride(4) == 1 and meta.block_tables.stride(1) == 1
    write_kv(k, v, kv_cache, meta.slot_mapping, meta.num_actual_tokens, k_scale, v_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.num_decodes:
        attend_decode(q, out, kv_cache, meta, scale, k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window)
    if meta.num_reqs > meta.num_decodes:
        attend_prefill(q, out, kv_cache, meta, scale, k_scale=k_scale, v_scale=v_scale,
                       sliding_window=sliding_window)
    return out


__all__ = ["forward", "write_kv", "attend_decode", "attend_prefill", "decode_num_splits", "KernelConfig",
           "prefill_config", "decode_config"]
