"""Paged attention in plain torch: the CPU path and the reference the GPU kernels are judged against.

K/V are always read through block tables from the paged cache; nothing per request is kept between steps.
Decodes (one query each) are attended as one padded batch, gathered through the block table in a single
index op, because on the CPU one batched op per layer beats a Python loop of tiny ones. Prefill chunks are
attended one request at a time with torch's SDPA and a causal mask offset by the cached prefix.

An FP8 cache (attention/fp8_kv.py) is written quantized and read through the same gathers, upcast to float32;
the K scale multiplies q and the V scale the output, so no dequantized copy of the cache is made. A prefill then
always reads its K/V back from the cache, so that it sees the stored (quantized) values, as the Triton kernels do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pagellm.attention import fp8_kv
from pagellm.attention.metadata import AttentionMetadata

# Decode batches are attended in at most this many groups of at least this many requests (see forward).
DECODE_GROUPS = 4
DECODE_GROUP_MIN = 8


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> None:
    """Store this step's K/V [T, Hk, D] at their slots of the cache [2, num_blocks, block_size, Hk, D].
    A slot of -1 marks a padding token (a CUDA-graph batch's spare rows): nothing is written for it.
    An FP8 cache stores x / scale (scales None: 1.0), saturated; other caches ignore the scales."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if fp8_kv.is_fp8(kv_cache.dtype):
        # index_copy_ has no float8 kernel on the CPU: copy the bytes.
        key, value = fp8_kv.quantize(key, k_scale).view(torch.uint8), fp8_kv.quantize(value, v_scale).view(torch.uint8)
        kv_cache = kv_cache.view(torch.uint8)
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's K and V [seq_len, Hk, D], read through its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    k = kv_cache[0].index_select(0, ids).flatten(0, 1)[:seq_len]
    v = kv_cache[1].index_select(0, ids).flatten(0, 1)[:seq_len]
    return k, v


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
            max_seq_len: int, scale: float, k_scale: Optional[torch.Tensor] = None,
            v_scale: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
    """q [B, Hq, D] against each request's whole context, as one masked batch. Returns [B, Hq, D] float32.
    k_scale/v_scale (FP8 caches only, else None) multiply q and the output.

    K/V are gathered once into [B, S, Hk, D] and handed to SDPA as strided [B, Hk, S, D] views with GQA:
    an einsum over the same tensors made two more copies of K (measured 2x slower on a 2-core CPU).
    """
    bsz = q.shape[0]
    block_size = kv_cache.shape[2]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    ids = block_tables[:, :num_blocks].reshape(-1).long()
    # index_select over whole blocks: 2.5x the bandwidth of advanced indexing (kv_cache[0, ids]) on the CPU.
    k = kv_cache[0].index_select(0, ids).view(bsz, -1, *kv_cache.shape[3:]).transpose(1, 2)  # [B, Hk, S, D]
    v = kv_cache[1].index_select(0, ids).view(bsz, -1, *kv_cache.shape[3:]).transpose(1, 2)
    key_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    visible = key_pos < seq_lens[:, None].long()
    if window is not None:  # the query sits at seq_len - 1: keys > seq_len - 1 - window
        visible &= key_pos >= seq_lens[:, None].long() - window
    qf = q[:, :, None, :].float()
    if k_scale is not None:
        qf = qf * k_scale
    out = F.scaled_dot_product_attention(
        qf, k.float(), v.float(), attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True,
    )[:, :, 0]
    if v_scale is not None:
        out = out * v_scale
    # An empty context (a padding row, seq_len 0) attends to nothing: zeros, as the Triton kernel gives.
    return out.masked_fill_((seq_lens == 0)[:, None, None], 0.0)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
             window: Optional[int] = None) -> torch.Tensor:
    """q [L, Hq, D] are the last L positions of a context of k, v [S, Hk, D]; causal. Returns [L, Hq, D].
    k_scale/v_scale (FP8 caches only, else None) multiply q and the output."""
    q_len = q.shape[0]
    seq_len = k.shape[0]
    ctx = seq_len - q_len
    if ctx == 0 and window is None:  # plain causal attention: SDPA's own mask, no mask tensor
        mask, causal = None, True
    else:
        key_pos = torch.arange(seq_len, device=q.device)[None, :]
        q_pos = (ctx + torch.arange(q_len, device=q.device))[:, None]
        mask = key_pos <= q_pos
        if window is not None:
            mask &= key_pos > q_pos - window
        causal = False
    qf = q.transpose(0, 1).float()
    if k_scale is not None:
        qf = qf * k_scale
    out = F.scaled_dot_product_attention(
        qf, k.transpose(0, 1).float(), v.transpose(0, 1).float(), attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=True,
    )
    if v_scale is not None:
        out = out * v_scale
    return out.transpose(0, 1).to(q.dtype)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata, scale: float, k_scale: Optional[torch.Tensor] = None,
            v_scale: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] for the flat batch; returns [T, Hq, D]. k_scale/v_scale: the layer's FP8
    KV-cache scales (float32 [1]; None: 1.0), used only when kv_cache is float8. sliding_window: a query at
    position i sees keys at positions > i - window (None: all earlier keys)."""
    t = meta.num_actual_tokens
    write_kv(k[:t], v[:t], kv_cache, meta.slot_mapping[:t], k_scale, v_scale)
    fp8 = fp8_kv.is_fp8(kv_cache.dtype)
    if not fp8:
        k_scale = v_scale = None
    out = torch.empty_like(q)
    nd = meta.num_decodes
    # Decodes go in a few groups of neighbours, each padded only to its own longest context: the model runner
    # orders decodes by length, so this gathers far less padding than one batch padded to the longest.
    groups = min(DECODE_GROUPS, max(1, nd // DECODE_GROUP_MIN))
    bounds = [nd * g // groups for g in range(groups + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            max_len = max(meta.seq_lens_cpu[lo:hi])
            out[lo:hi] = _decode(q[lo:hi], kv_cache, meta.block_tables[lo:hi], meta.seq_lens[lo:hi], max_len,
                                 scale, k_scale, v_scale, sliding_window).to(q.dtype)
    qsl = meta.query_start_loc_cpu
    for i in range(nd, meta.num_reqs):
        start, end = qsl[i], qsl[i + 1]
        if meta.seq_lens_cpu[i] == end - start and not fp8:  # nothing cached before: its own K/V are the context
            kc, vc = k[start:end], v[start:end]
        else:
            kc, vc = gather_kv(kv_cache, meta.block_tables[i], meta.seq_lens_cpu[i])
        out[start:end] = _prefill(q[start:end], kc, vc, scale, k_scale, v_scale, sliding_window)
    return out
