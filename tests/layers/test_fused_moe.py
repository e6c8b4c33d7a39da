"""The fused MoE Triton kernel against the torch experts path (itself checked against a plain per-token sum in
tests/models/test_moe.py): under Triton's CPU interpreter here (skipped when triton is not installed), and
compiled on CUDA over many shapes (tokens 1..4096, experts 8..128, top-k 1..8), with expert parallelism's
partial sums, and inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.layers.fused_moe import select_experts
from pagellm.model_executor.layers.fused_moe.torch_moe import fused_experts_torch
from tests.triton_interpreter import interpreted as interpreted_module

MODULE = "pagellm.model_executor.layers.fused_moe.triton_moe"
CUDA = torch.cuda.is_available()


def make_case(tokens, experts, top_k, hidden, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g) * 2, top_k, renormalize=top_k > 1)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


def reference(x, w13, w2, weights, ids, first_expert=0):
    """The torch path in float32 on the same (rounded) weights."""
    return fused_experts_torch(x.float(), w13.float(), w2.float(), weights, ids, first_expert)


TOL = {torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 4e-2}


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and torch.isfinite(out).all()
    scale = ref.abs().max().item() + 1e-6
    assert (out.float() - ref).abs().max().item() <= TOL[dtype] * scale


# ---- CPU: Triton's interpreter ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted():
    with interpreted_module(MODULE) as module:
        yield module


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,dtype", [
    (1, 8, 2, 64, 32, torch.float32),     # one decode token
    (19, 8, 2, 96, 48, torch.float32),    # K not a multiple of the block, ragged expert runs
    (40, 16, 4, 64, 64, torch.float16),
    (7, 4, 1, 32, 80, torch.float32),     # top-1, N not a multiple of BLOCK_N
])
def test_interpreted_kernel_matches_torch(interpreted, tokens, experts, top_k, hidden, inter, dtype):
    x, w13, w2, weights, ids = make_case(tokens, experts, top_k, hidden, inter, dtype, "cpu", seed=tokens)
    assert_close(interpreted.fused_experts(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids), dtype)


MOE_CONFIGS = [  # the grouped walk over blocks (group_m 1, 3: a last group shorter than the rest, 8), tile sizes
    dict(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=1),
    dict(block_m=16, block_n=16, block_k=16, group_m=3, num_warps=4, num_stages=1),
    dict(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=2),
]


@pytest.mark.parametrize("config", MOE_CONFIGS, ids=lambda c: f"m{c['block_m']}-n{c['block_n']}-g{c['group_m']}")
def test_interpreted_kernel_with_table_configs(interpreted, config):
    x, w13, w2, weights, ids = make_case(45, 8, 2, 64, 48, torch.float32, "cpu", seed=5)
    out = interpreted.fused_experts(x, w13, w2, weights, ids, config=config)
    assert_close(out, reference(x, w13, w2, weights, ids), torch.float32)


def test_moe_table_is_valid_and_picks_by_rows_per_expert(monkeypatch):
    from pagellm.model_executor.layers.fused_moe import moe_configs as mc

    mc.check_moe_table()
    default = mc.FUSED_MOE_CONFIGS["default"]
    assert mc.moe_config(1 * 8, 128, 768, 2048) == default["1"]  # Qwen3-30B-A3B decode: 8 rows, 128 experts
    assert mc.moe_config(4096 * 2, 8, 14336, 4096) == default["1024"]  # Mixtral, 4096 tokens: 1024 per expert
    assert mc.moe_config(10 ** 6, 8, 14336, 4096) == default["1024"]  # past the last bucket: the last
    own = dict(MOE_CONFIGS[2])
    monkeypatch.setattr(mc, "FUSED_MOE_CONFIGS", {"default": default, "8x14336x4096": {"2048": own}})
    assert mc.moe_config(64, 8, 14336, 4096) == own
    with pytest.raises(ValueError, match=r"\['default'\]\['1'\].*block_n"):
        mc.check_moe_table({"default": {"1": {**own, "block_n": 48}}})
    with pytest.raises(ValueError, match="group_m"):
        mc.check_config({**own, "group_m": 0})


def test_interpreted_kernel_expert_parallel_halves(interpreted):
    x, w13, w2, weights, ids = make_case(13, 8, 2, 64, 32, torch.float32, "cpu", seed=3)
    parts = [interpreted.fused_experts(x, w13[r * 4:(r + 1) * 4], w2[r * 4:(r + 1) * 4], weights, ids, r * 4)
             for r in range(2)]
    for r, part in enumerate(parts):
        assert_close(part, reference(x, w13[r * 4:(r + 1) * 4], w2[r * 4:(r + 1) * 4], weights, ids, r * 4),
                     torch.float32)
    assert_close(parts[0] + parts[1], reference(x, w13, w2, weights, ids), torch.float32)


@pytest.mark.parametrize("tokens,experts,top_k,first,num_local,block_m", [
    (1, 8, 2, 0, 8, 16), (50, 8, 3, 0, 8, 16), (50, 8, 3, 4, 4, 32), (300, 64, 8, 16, 16, 64)])
def test_sort_by_expert_blocks(tokens, experts, top_k, first, num_local, block_m):
    """Every routed row of a held expert appears once, in a block of its own expert; padding is T * top_k."""
    from pagellm.model_executor.layers.fused_moe.sorting import sort_by_expert

    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    rows, block_expert = sort_by_expert(ids, num_local, first, block_m)
    n = tokens * top_k
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        block = rows[b * block_m:(b + 1) * block_m].tolist()
        if e < 0:
            assert all(r == n for r in block)
            continue
        for r in block:
            if r != n:
                assert flat[r].item() == first + e
                seen.append(r)
    held = [r for r in range(n) if first <= flat[r].item() < first + num_local]
    assert sorted(seen) == held


# ---- CUDA: the compiled kernel ---------------------------------------------------------------------------
SHAPES = [  # (tokens, experts, top_k, hidden, moe intermediate)
    (1, 8, 2, 1024, 512), (3, 8, 1, 512, 384), (16, 64, 6, 1024, 256), (64, 128, 8, 2048, 768),
    (255, 8, 2, 4096, 1408), (512, 60, 4, 2048, 1408), (1000, 32, 8, 1536, 512), (4096, 128, 8, 2048, 768),
    (4096, 8, 2, 1024, 2048), (77, 16, 3, 96, 200),
]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", SHAPES)
def test_cuda_kernel_matches_torch(tokens, experts, top_k, hidden, inter, dtype):
    from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

    x, w13, w2, weights, ids = make_case(tokens, experts, top_k, hidden, inter, dtype, "cuda", seed=tokens)
    assert_close(fused_experts(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids), dtype)



def _table_configs():
    from pagellm.model_executor.layers.fused_moe.moe_configs import FUSED_MOE_CONFIGS

    return [pytest.param(c, id=f"{key}-{bucket}") for key, entry in FUSED_MOE_CONFIGS.items()
            for bucket, c in entry.items()]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", _table_configs())
@pytest.mark.parametrize("tokens", [3, 300])
def test_every_moe_table_config_on_cuda(config, tokens):
    """Whatever the table holds (baked tuning winners included) computes the sum, whatever the rows per expert."""
    from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

    x, w13, w2, weights, ids = make_case(tokens, 16, 4, 512, 384, torch.bfloat16, "cuda", seed=tokens)
    out = fused_experts(x, w13, w2, weights, ids, config=config)
    assert_close(out, reference(x, w13, w2, weights, ids), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ep", [2, 4])
def test_cuda_expert_parallel_parts_sum_to_the_whole(ep):
    from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

    x, w13, w2, weights, ids = make_case(300, 64, 8, 1024, 256, torch.float32, "cuda", seed=ep)
    n = 64 // ep
    total = sum(fused_experts(x, w13[r * n:(r + 1) * n], w2[r * n:(r + 1) * n], weights, ids, r * n) for r in range(ep))
    assert_close(total, reference(x, w13, w2, weights, ids), torch.float32)



@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_kernel_runs_in_a_cuda_graph():
    """No host synchronization: captured once, replayed with other routings and inputs, it gives their sums."""
    from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

    x, w13, w2, weights, ids = make_case(32, 16, 4, 512, 256, torch.bfloat16, "cuda", seed=1)
    fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    for seed in (2, 3):
        x2, _, _, weights2, ids2 = make_case(32, 16, 4, 512, 256, torch.bfloat16, "cuda", seed=seed)
        x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
        graph.replay()
        assert_close(out.clone(), reference(x, w13, w2, weights, ids), torch.bfloat16)
