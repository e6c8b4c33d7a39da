"""Token embedding and the LM head (which may share the embedding's weight), vocabulary-parallel under TP.

With TP, the vocabulary is split into tp equal slices of ceil(vocab / tp) rows (the last one padded with zero
rows): each rank embeds only the ids in its slice (zeros elsewhere) and an all-reduce sums the slices; the
LM head computes its slice of the logits and an all-gather concatenates them (the padding is cut off). At TP
size 1 both are the plain single-device modules: the whole table, no collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.distributed.parallel_state import get_tp_group
from pagellm.model_executor.layers.linear import copy_weight, default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.num_embeddings = num_embeddings  # the whole vocabulary
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader if self.tp_size > 1 else default_weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """This rank's rows of the [vocab, hidden] checkpoint tensor; padding rows are zero."""
        if shard_id is not None:
            raise ValueError(f"this parameter is not merged, but shard {shard_id!r} was given")
        if tuple(loaded.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded.shape)}, expected "
                             f"{(self.num_embeddings, self.embedding_dim)}")
        n = self.vocab_end - self.vocab_start
        copy_weight(param.data[:n], loaded.narrow(0, self.vocab_start, n))
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return get_tp_group().all_reduce(out)

    def extra_repr(self) -> str:
        tp = f", tp={self.tp_size} rows [{self.vocab_start}, {self.vocab_end})" if self.tp_size > 1 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{tp}"


class LMHead(nn.Module):
    """hidden [N, H] -> logits [N, vocab] in float32. With `tie_to`, uses that embedding's weight (same Parameter,
    so it is loaded once and appears once in named_parameters())."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, tie_to: Optional[VocabEmbedding] = None) -> None:
        super().__init__()
        self.tied = tie_to is not None
        self.vocab_size = vocab_size
        self.tp_size = get_tp_group().world_size
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            # Same row split as the embedding (a VocabEmbedding's loader does the sharding).
            shard = VocabEmbedding(vocab_size, hidden_size, dtype, device)
            self.weight = shard.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()
        if self.tp_size == 1:
            return logits
        return get_tp_group().all_gather(logits, dim=-1)[..., : self.vocab_size]
