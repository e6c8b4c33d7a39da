"""Mixture-of-Experts layers: top-k routing, the experts' MLPs as one layer (FusedMoE), a torch path for the CPU
and a fused Triton kernel for CUDA."""

from pagellm.model_executor.layers.fused_moe.layer import FusedMoE, MoESizes, moe_sizes_of
from pagellm.model_executor.layers.fused_moe.routing import select_experts

__all__ = ["FusedMoE", "MoESizes", "moe_sizes_of", "select_experts"]
