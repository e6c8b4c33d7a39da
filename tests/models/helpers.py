"""Run one request through a pagellm model by hand: a prefill, then decodes, over a paged KV cache."""

from __future__ import annotations

import torch

from pagellm.attention import AttentionMetadata

BLOCK_SIZE = 16


def single_request_metadata(num_computed: int, num_new: int, block_size: int = BLOCK_SIZE,
                            device="cpu") -> AttentionMetadata:
    """One request with `num_computed` tokens already cached, computing `num_new` more; blocks 0..n in order,
    so a token's slot is its position."""
    seq_len = num_computed + num_new
    num_blocks = (seq_len + block_size - 1) // block_size
    return AttentionMetadata(
        num_actual_tokens=num_new,
        query_start_loc=torch.tensor([0, num_new], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None, :],
        slot_mapping=torch.arange(num_computed, seq_len, dtype=torch.int64, device=device),
        max_query_len=num_new,
        max_seq_len=seq_len,
        num_decodes=1 if num_new == 1 else 0,
        block_size=block_size,
        query_start_loc_cpu=[0, num_new],
        seq_lens_cpu=[seq_len],
    )


def empty_kv_caches(config, max_tokens: int, dtype=torch.float32, block_size: int = BLOCK_SIZE,
                    device="cpu") -> list[torch.Tensor]:
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_blocks = (max_tokens + block_size - 1) // block_size + 1
    return [torch.zeros(2, num_blocks, block_size, num_kv, head_dim, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)]


@torch.inference_mode()
def run_pagellm(model, token_ids: list[int], prefill_len: int, device="cpu") -> torch.Tensor:
    """Logits [len(token_ids), vocab]: the first `prefill_len` tokens in one prefill, the rest one decode at a
    time, reading the cache the earlier steps wrote."""
    caches = empty_kv_caches(model.config, len(token_ids), next(model.parameters()).dtype, device=device)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    out = []
    hidden = model(ids[:prefill_len], torch.arange(prefill_len, device=device), caches,
                   single_request_metadata(0, prefill_len, device=device))
    out.append(model.compute_logits(hidden))
    for pos in range(prefill_len, len(token_ids)):
        hidden = model(ids[pos:pos + 1], torch.tensor([pos], device=device), caches,
                       single_request_metadata(pos, 1, device=device))
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@torch.inference_mode()
def run_transformers(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()
