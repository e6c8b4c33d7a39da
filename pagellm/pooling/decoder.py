"""A pagellm decoder (Llama, Mistral, Qwen2, Qwen3 checkpoints) as an embedder: each prompt is prefilled whole,
in one step, through the model's own paged attention over a throw-away cache that holds just this batch; the
cache is dropped after the step (nothing is kept), and the LM head never runs. The pooler then takes the final
hidden state (after the last norm) of the prompt's last token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagellm.attention.metadata import AttentionMetadata

_BLOCK = 16


class DecoderEmbedder(nn.Module):
    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.config: Any = causal_lm.config
        attn = next(m for m in causal_lm.modules() if type(m).__name__ == "Attention")
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.num_layers = self.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """input_ids: [T], whole prompts back to back. Returns the final hidden states [T, H]."""
        device = input_ids.device
        blocks_per_req = [-(-n // _BLOCK) for n in seq_lens]
        first_block = [0]
        for n in blocks_per_req[:-1]:
            first_block.append(first_block[-1] + n)
        width = max(blocks_per_req)
        table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
        slots = []
        for i, (n, first) in enumerate(zip(seq_lens, first_block)):
            table[i, :blocks_per_req[i]] = torch.arange(first, first + blocks_per_req[i], dtype=torch.int32)
            slots.append(torch.arange(n) + first * _BLOCK)
        qsl = [0]
        for n in seq_lens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            num_actual_tokens=qsl[-1], query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=table.to(device),
            slot_mapping=torch.cat(slots).to(device), max_query_len=max(seq_lens), max_seq_len=max(seq_lens),
            num_decodes=0, block_size=_BLOCK, query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens))
        dtype = next(self.causal_lm.parameters()).dtype
        shape = (2, sum(blocks_per_req), _BLOCK, self.num_kv_heads, self.head_dim)
        caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(device)
        return self.causal_lm(input_ids, positions, caches, meta)
