"""Rows of a routing sorted by expert, in blocks of one expert each: the layout the fused MoE kernel
(triton_moe.py) multiplies. Plain torch, so that it is tested without Triton."""

from __future__ import annotations

import torch


def sort_by_expert(topk_ids: torch.Tensor, num_local: int, first_expert: int, block_m: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_rows [max_blocks * block_m], block_expert [max_blocks]) with no host synchronization.

    sorted_rows lists the flat routing rows (token * top_k + pick) expert by expert, each expert's run padded
    to a multiple of block_m with the value T * top_k (no row); block_expert is each block's local expert, or
    -1 for blocks past the end. Picks of experts this rank does not hold (expert parallelism) are left out.
    """
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    device = flat.device
    local = flat.to(torch.int64) - first_expert
    local = torch.where((local >= 0) & (local < num_local), local, num_local)  # num_local: not held here
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, local, torch.ones_like(local))
    counts = counts[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    run_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(local, stable=True)
    sorted_local = local[order]
    held = sorted_local < num_local
    e = sorted_local.clamp(max=num_local - 1)
    max_blocks = -(-n // block_m) + num_local
    size = max_blocks * block_m
    dest = pad_start[e] + torch.arange(n, device=device) - run_start[e]
    dest = torch.where(held, dest, size)  # one spare slot past the end takes the rows not held
    sorted_rows = torch.full((size + 1,), n, dtype=torch.int64, device=device)
    sorted_rows.scatter_(0, dest, order)
    starts = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1)
    return sorted_rows[:size], block_expert
