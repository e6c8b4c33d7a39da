"""The fused MoE kernel for CUDA, in Triton: tokens sorted by expert, then one grouped GEMM per projection.

    1. sort_by_expert: the T * top_k (token, pick) rows are ordered by expert, and each expert's run is padded
       to a multiple of BLOCK_M, so that every block of BLOCK_M rows belongs to one expert (block_expert).
    2. GEMM 1: each program multiplies one block of rows (gathered from x by token) by one BLOCK_N slice of its
       expert's w13 -> [gate | up] for every row; SiLU-and-mul -> [rows, I].
    3. GEMM 2: the same blocks times the expert's w2, each row scaled by its routing weight; the top_k rows of a
       token are then summed.

Why: the torch loop runs 2 x (experts hit) small matmuls plus gathers and an index_add per layer, each a
launch with a host round trip (`bincount(...).tolist()`); here a layer is a fixed handful of launches with
no host synchronization, so it also runs inside a decode CUDA graph, and each expert's weight tile is read
once per block of its tokens.

Tile sizes come from one table keyed by the rows per expert (moe_configs.py): small blocks for decode, where an
expert gets a row or two, large blocks walked in groups (GROUP_M) for prefill, where it gets hundreds.
All shapes are upper bounds fixed by (tokens, top_k, experts): unused blocks are marked expert -1 and exit.
float32 inputs multiply in IEEE float32 (no TF32), so the kernel matches the torch path to rounding.
Runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1), which is how it is tested without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagellm.model_executor.layers.fused_moe.moe_configs import moe_config
from pagellm.model_executor.layers.fused_moe.sorting import sort_by_expert
from pagellm.model_executor.layers.kernel_configs import Config


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_rows_ptr, block_expert_ptr,
    N, num_rows, num_blocks,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    K: tl.constexpr, ROWS_PER_A: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[row, :] = a[row // ROWS_PER_A, :] @ b[expert].T (* weights[row]) for the rows of one block.

    Programs run GROUP_M row blocks down one column of N tiles before the next column, so that a weight tile
    is read from HBM once per GROUP_M blocks of the same expert, not once per block (large M).
    K (the hidden or the intermediate size) is a compile-time constant: two variants per model, and Triton
    3.6's interpreter cannot loop over a runtime bound with numpy 2.4."""
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    a_rows = (rows // ROWS_PER_A).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # (tl.zeros is a jit function: not under the interpreter)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor, sorted_rows: torch.Tensor,
          block_expert: torch.Tensor, rows_per_a: int, mul_weight: bool, config: Config) -> None:
    num_rows = c.shape[0]
    n, k = b.shape[1], b.shape[2]
    num_blocks = block_expert.numel()
    grid = (num_blocks * triton.cdiv(n, config["block_n"]),)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    _moe_gemm_kernel[grid](
        a, b, c, weights, sorted_rows, block_expert, n, num_rows, num_blocks,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        K=k, ROWS_PER_A=rows_per_a, MUL_WEIGHT=mul_weight, PRECISION=precision,
        BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_K=config["block_k"], GROUP_M=config["group_m"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from pagellm.model_executor.layers import triton_ops

        return triton_ops.silu_and_mul(x)
    d = x.shape[-1] // 2  # (the interpreter's CPU tensors)
    return torch.nn.functional.silu(x[:, :d]) * x[:, d:]


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, first_expert: int = 0, config: Optional[Config] = None) -> torch.Tensor:
    """The same sum as torch_moe.fused_experts_torch (same arguments), in three kernels and a sum.

    config: a moe_configs config for both GEMMs (the tuning sweep passes its candidates); None: the table's."""
    num_tokens, top_k = topk_ids.shape
    num_local, two_inter, hidden = w13.shape
    num_rows = num_tokens * top_k
    x = x.contiguous()
    config = config or moe_config(num_rows, num_local, two_inter // 2, hidden)
    sorted_rows, block_expert = sort_by_expert(topk_ids, num_local, first_expert, config["block_m"])
    weights = topk_weights.reshape(-1).float().contiguous()
    gate_up = torch.empty(num_rows, two_inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, gate_up, weights, sorted_rows, block_expert, top_k, False, config)
    act = _silu_and_mul(gate_up)
    # Rows of experts held elsewhere are never written: zeros, so the sum over picks skips them.
    down = torch.zeros(num_rows, hidden, dtype=x.dtype, device=x.device)
    _gemm(act, w2, down, weights, sorted_rows, block_expert, 1, True, config)
    return down.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
