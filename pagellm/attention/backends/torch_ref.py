"""Paged attention in plain torch: the CPU path and the reference the GPU kernels are judged against.

K/V are always read through block tables from the paged cache; nothing per request is kept between steps.
Decodes (one query each) are attended as one padded batch, gathered through the block table in a single
index op, because on the CPU one batched op per layer beats a Python loop of tiny ones. Prefill chunks are
attended one request at a time with torch's SDPA and a causal mask offset by the cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagellm.attention.metadata import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V [T, Hk, D] at their slots of the cache [2, num_blocks, block_size, Hk, D]."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's K and V [seq_len, Hk, D], read through its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    k = kv_cache[0, ids].flatten(0, 1)[:seq_len]
    v = kv_cache[1, ids].flatten(0, 1)[:seq_len]
    return k, v


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
            max_seq_len: int, scale: float) -> torch.Tensor:
    """q [B, Hq, D] against each request's whole context, as one masked batch. Returns [B, Hq, D]."""
    bsz, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_blocks = (max_seq_len + block_size - 1) // block_size
    ids = block_tables[:, :num_blocks].long()
    k = kv_cache[0, ids].flatten(1, 2)  # [B, S, Hk, D]
    v = kv_cache[1, ids].flatten(1, 2)
    qg = q.view(bsz, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k.float()) * scale
    pad = torch.arange(k.shape[1], device=q.device)[None, :] >= seq_lens[:, None].long()
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgs,bshd->bhgd", probs, v.float())
    return out.reshape(bsz, num_heads, head_dim)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, Hq, D] are the last L positions of a context of k, v [S, Hk, D]; causal. Returns [L, Hq, D]."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    ctx = seq_len - q_len
    mask = torch.arange(seq_len, device=q.device)[None, :] <= (ctx + torch.arange(q_len, device=q.device))[:, None]
    dtype = q.dtype
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1).to(dtype)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] for the flat batch; returns [T, Hq, D]."""
    t = meta.num_actual_tokens
    write_kv(k[:t], v[:t], kv_cache, meta.slot_mapping[:t])
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        max_len = max(meta.seq_lens_cpu[:nd])
        out[:nd] = _decode(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], max_len, scale).to(q.dtype)
    qsl = meta.query_start_loc_cpu
    for i in range(nd, meta.num_reqs):
        start, end = qsl[i], qsl[i + 1]
        kc, vc = gather_kv(kv_cache, meta.block_tables[i], meta.seq_lens_cpu[i])
        out[start:end] = _prefill(q[start:end], kc, vc, scale)
    return out
