"""Pipeline parallelism around a model: receive the previous stage's activations, run this stage's layers, send
them on. Kept apart from the model runner: the runner calls `model(...)` as always and gets None on a stage
that is not the last (nothing to sample there).

Activations travel as one [2, T, H] tensor (hidden states and residual) over torch.distributed point-to-point
send/recv (NCCL on GPUs, gloo on CPUs). Every stage sees the same SchedulerOutput, so T is known on both sides
and nothing else is exchanged.

Decode CUDA graphs: each stage captures its own layers for every graph batch size, reading the previous stage's
activations from a static buffer of that size; the exchange stays outside the graph (`recv_for_graph` before a
replay, `send` of the graph's output after). Both stages pick the same batch size from the same step, so the
padded shapes match.
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
        self.graph_inputs: dict[int, torch.Tensor] = {}  # graph batch size -> static [2, bs, H] activations

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata) -> Optional[torch.Tensor]:
        pp = get_pp_group()
        received = None
        if not pp.is_first_rank:
            received = pp.recv((2, input_ids.shape[0], self.hidden_size), self.dtype, self.device)
        out = self._layers(input_ids, positions, kv_caches, attn_metadata, received)
        if pp.is_last_rank:
            return out
        pp.send(out)
        return None

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, received: Optional[torch.Tensor]) -> torch.Tensor:
        """This stage's layers on the previous stage's [2, T, H] activations (None on the first stage): the hidden
        states on the last stage, else the [2, T, H] activations for the next."""
        intermediate = None if received is None else IntermediateTensors(received[0], received[1])
        out = self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)
        return out if get_pp_group().is_last_rank else torch.stack([out.hidden, out.residual])

    # ---- decode CUDA graphs ----
    def prepare_graph_input(self, bs: int) -> None:
        """The static input of graph batch size bs (stages after the first), made before the graph is captured
        so that it lives outside the graphs' memory pool."""
        if not get_pp_group().is_first_rank and bs not in self.graph_inputs:
            self.graph_inputs[bs] = torch.zeros((2, bs, self.hidden_size), dtype=self.dtype, device=self.device)

    def graph_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                      attn_metadata: AttentionMetadata) -> torch.Tensor:
        """What a decode graph of len(input_ids) rows captures: this stage's layers, no exchange, reading the
        static input that `recv_for_graph` fills before each replay; on a stage before the last, its output is
        what `send` passes on after the replay."""
        received = None if get_pp_group().is_first_rank else self.graph_inputs[input_ids.shape[0]]
        return self._layers(input_ids, positions, kv_caches, attn_metadata, received)

    def recv_for_graph(self, bs: int) -> None:
        """Before a replay of graph batch size bs: the previous stage's activations into its static input."""
        pp = get_pp_group()
        if not pp.is_first_rank:
            pp.recv_into(self.graph_inputs[bs])

    def send(self, out: torch.Tensor) -> None:
        """After a replay on a stage before the last: the graph's output to the next stage."""
        get_pp_group().send(out)

    def __getattr__(self, name: str) -> Any:  # compute_logits, parameters(), eval(), ...
        return getattr(self.model, name)
