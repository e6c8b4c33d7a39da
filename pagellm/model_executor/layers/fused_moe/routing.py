"""Top-k routing: which experts each token goes to, and with what weight."""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over all experts (in float32), then the top_k of them.

    renormalize: divide the chosen weights by their sum (Mixtral always; Qwen2-MoE / Qwen3-MoE when the config's
    `norm_topk_prob` says so). Returns (weights [T, top_k] float32, expert ids [T, top_k] int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
