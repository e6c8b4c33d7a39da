"""AttentionMetadata: where each request's tokens sit in the flat batch and in the paged KV cache.

The model runner orders a step's requests decodes first (one query token each), then prefill chunks, so a
backend can treat the first `num_decodes` requests as one dense decode batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_actual_tokens: int  # T: tokens in the flat batch
    query_start_loc: torch.Tensor  # int32 [B+1]: request i's queries are tokens [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # int32 [B]: tokens in the KV cache after this step (cached prefix + new)
    block_tables: torch.Tensor  # int32 [B, max_blocks]: request i's block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block_id * block_size + offset) of each new token
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # the first num_decodes requests have exactly one query token
    block_size: int
    # Host copies, so that a CPU backend can loop over requests without a device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)
