"""FusedMoE: the routed experts of one MoE block as two stacked weights, split over the tensor-parallel ranks.

    w13_weight [E_local, 2 * I_local, H]   every expert's gate (w1) rows, then its up (w3) rows
    w2_weight  [E_local, H, I_local]       every expert's down projection

Checkpoints store each expert separately (`experts.N.gate_proj/up_proj/down_proj`, Mixtral's
`experts.N.w1/w3/w2`); `weight_loader(param, tensor, shard_id, expert_id)` copies one of them into its expert's
slot. Two ways to split over the TP group (the hidden states are the same on every rank there, since the
attention's o_proj all-reduces them):

- tensor parallelism (default): every rank holds every expert, sliced along the intermediate dim (as a dense
  MLP is: w1/w3 by rows, w2 by columns); each rank's partial output is summed by an all-reduce.
- expert parallelism (`enable_expert_parallel`): rank r holds whole experts r * E/tp .. (r + 1) * E/tp - 1;
  every rank routes all tokens, computes only the tokens' picks among its own experts, and the same
  all-reduce sums the ranks' outputs. No token is sent anywhere: the all-gather of the hidden states that an
  EP exchange needs is the replicated activations the attention already has (the first version the issue
  allows; an all-to-all dispatch of only the routed tokens is the next step).

The computation is `fused_experts` (Triton kernel, triton_moe.py) on CUDA and `fused_experts_torch`
(torch_moe.py) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel_state import expert_parallel_enabled, get_tp_group
from pagellm.model_executor.layers.fused_moe.routing import select_experts
from pagellm.model_executor.layers.fused_moe.torch_moe import fused_experts_torch
from pagellm.model_executor.layers.linear import copy_weight, divide, materialize

# checkpoint projection name -> FusedMoE shard id
EXPERT_SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}


@dataclass(frozen=True)
class MoESizes:
    """The MoE facts of an HF config, under one set of names."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    renormalize: bool


def moe_sizes_of(config: Any) -> MoESizes:
    """The routed experts' sizes, as the normalized config reads them (arch_config.py: Mixtral's
    num_local_experts / intermediate_size, always renormalized; Qwen2/3-MoE's num_experts /
    moe_intermediate_size, renormalized when `norm_topk_prob`)."""
    from pagellm.arch_config import ArchConfig

    arch = ArchConfig.from_hf(config)
    return MoESizes(arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size, arch.moe_renormalize)


class FusedMoE(nn.Module):
    """The routed experts: forward(hidden [T, H], router_logits [T, E]) -> [T, H], summed over the TP ranks."""

    def __init__(self, sizes: MoESizes, hidden_size: int, dtype=None, device=None) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.sizes = sizes
        self.expert_parallel = expert_parallel_enabled() and self.tp_size > 1
        if self.expert_parallel:
            self.num_local_experts = divide(sizes.num_experts, self.tp_size, "the number of experts (expert parallel)")
            self.first_expert = self.tp_rank * self.num_local_experts
            self.inter = sizes.intermediate_size
        else:
            self.num_local_experts, self.first_expert = sizes.num_experts, 0
            self.inter = divide(sizes.intermediate_size, self.tp_size, "the experts' intermediate size")
        dtype = dtype or torch.get_default_dtype()
        e, i = self.num_local_experts, self.inter
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype, device=device),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype, device=device), requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader
            p.expert_weight = True

    def local_expert(self, expert_id: int) -> int | None:
        """This rank's slot of a global expert id, or None when another rank holds it."""
        slot = expert_id - self.first_expert
        return slot if 0 <= slot < self.num_local_experts else None

    def weight_loader(self, param: torch.Tensor, loaded, shard_id: str, expert_id: int) -> bool:
        """Copy one expert's checkpoint projection into its slot; False (nothing read) for another rank's
        expert. Under tensor parallelism only this rank's slice of the intermediate dim is read."""
        slot = self.local_expert(expert_id)
        if slot is None:
            return False
        i = self.inter
        sliced = not self.expert_parallel and self.tp_size > 1
        if shard_id in ("w1", "w3"):
            src = loaded.narrow(0, self.tp_rank * i, i) if sliced else materialize(loaded)
            copy_weight(param.data[slot].narrow(0, 0 if shard_id == "w1" else i, i), src)
        elif shard_id == "w2":
            src = loaded.narrow(1, self.tp_rank * i, i) if sliced else materialize(loaded)
            copy_weight(param.data[slot], src)
        else:
            raise ValueError(f"unknown expert shard {shard_id!r} (w1, w2 or w3)")
        return True

    def expected_shards(self) -> dict[str, int]:
        """Parameter -> how many (expert, shard) tensors fill it on this rank."""
        return {"w13_weight": 2 * self.num_local_experts, "w2_weight": self.num_local_experts}

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.sizes.top_k, self.sizes.renormalize)
        if hidden.is_cuda:
            from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

            out = fused_experts(hidden, self.w13_weight, self.w2_weight, weights, ids, self.first_expert)
        else:
            out = fused_experts_torch(hidden, self.w13_weight, self.w2_weight, weights, ids, self.first_expert)
        return get_tp_group().all_reduce(out)

    def extra_repr(self) -> str:
        mode = "expert parallel" if self.expert_parallel else "tensor parallel"
        return (f"experts={self.num_local_experts}/{self.sizes.num_experts} ({mode}), top_k={self.sizes.top_k}, "
                f"intermediate={self.inter}")
