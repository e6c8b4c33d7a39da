"""Pipeline parallelism around a model: receive the previous stage's activations, run this stage's layers, send
them on. Kept apart from the model runner: the runner calls `model(...)` as always and gets None on a stage
that is not the last (nothing to sample there).

Activations travel as one [2, T, H] tensor (hidden states and residual) over torch.distributed point-to-point
send/recv (NCCL on GPUs, gloo on CPUs). Every stage sees the same SchedulerOutput, so T is known on both sides
and nothing else is exchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagellm.attention.metadata import AttentionMetadata
from pagellm.distributed.parallel_state import get_pp_group
from pagellm.model_executor.models.utils import IntermediateTensors


class PipelineStage:
    """Wraps one stage's model; same call signature as the model's forward, and `compute_logits` on the last."""

    def __init__(self, model: nn.Module, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata) -> Optional[torch.Tensor]:
        pp = get_pp_group()
        intermediate = None
        if not pp.is_first_rank:
            buf = pp.recv((2, input_ids.shape[0], self.hidden_size), self.dtype, self.device)
            intermediate = IntermediateTensors(buf[0], buf[1])
        out = self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)
        if pp.is_last_rank:
            return out
        pp.send(torch.stack([out.hidden, out.residual]))
        return None

    def __getattr__(self, name: str) -> Any:  # compute_logits, parameters(), eval(), ...
        return getattr(self.model, name)
