"""The experts' MLPs in plain torch (the CPU path, and the reference the Triton kernel is checked against).

Tokens are sorted by expert once; each expert that got tokens runs its gate/up matmul, SiLU-and-mul and down
matmul on its rows, scaled by the routing weight, and the rows are summed back into their tokens (index_add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), for the experts this rank holds.

    x [T, H]; w13 [E_local, 2I, H] ([gate | up] rows); w2 [E_local, H, I]; topk_* [T, K]. The experts held are
    global ids first_expert .. first_expert + E_local - 1 (expert parallelism); the others contribute nothing.
    Returns [T, H] in x's dtype (summed in float32).
    """
    num_tokens, top_k = topk_ids.shape
    num_local = w13.shape[0]
    inter = w2.shape[2]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    local = topk_ids.reshape(-1) - first_expert
    order = torch.argsort(local, stable=True)
    local_sorted = local[order]
    held = (local_sorted >= 0) & (local_sorted < num_local)
    order, local_sorted = order[held], local_sorted[held]
    counts = torch.bincount(local_sorted, minlength=num_local).tolist()
    flat_weights = topk_weights.reshape(-1)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]  # positions in the flat [T * K] routing
        start += count
        tokens = rows // top_k
        gate_up = F.linear(x[tokens], w13[expert])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[expert]).float() * flat_weights[rows, None]
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)
