"""The quantized layers' CUDA paths against their torch references, on random data of many shapes (GPU only):
the per-token quantization kernel, the fp8 GEMM (torch._scaled_mm), the int8 GEMM (torch._int_mm) and the
Triton W4A16 kernel; then a tiny engine per method with CUDA graphs. Run by benchmarks/gpu_check.sh quant.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from pagellm.model_executor.layers.quantization.w8a8 import (  # noqa: E402
    FP8,
    fp8_mm_supported,
    quantize_per_row,
    w8a8_matmul,
)
from pagellm.model_executor.layers.quantization.w4a16 import pack_rows, w4a16_reference  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("qdtype", [FP8, torch.int8])
@pytest.mark.parametrize("rows,cols", [(1, 4096), (7, 576), (64, 14336), (300, 1000), (3, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_quant_kernel(qdtype, rows, cols, dtype):
    from pagellm.model_executor.layers.quantization.triton_quant import quantize_per_row_triton

    x = (torch.randn(rows, cols, device="cuda") * 3).to(dtype)
    x[0, :] = 0  # an all-zero row
    q, s = quantize_per_row_triton(x, qdtype)
    q_ref, s_ref = quantize_per_row(x, qdtype)
    assert torch.equal(s, s_ref)
    mismatch = (q.float() != q_ref.float()).float().mean().item()
    assert mismatch < 1e-4, f"{mismatch:.2e} of the values differ"


@pytest.mark.parametrize("qdtype", [FP8, torch.int8])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 128, 1000])
@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (4096, 14336), (576, 1536), (48, 32)])
def test_w8a8_gemm_matches_float_reference(qdtype, m, n, k):
    if qdtype == FP8:
        assert fp8_mm_supported(torch.device("cuda")) == (torch.cuda.get_device_capability() >= (8, 9))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    wq, ws = quantize_per_row(w, qdtype)
    ws = ws.reshape(1, -1).contiguous()
    xq, xs = quantize_per_row(x, qdtype)
    y = w8a8_matmul(xq, xs, wq, ws, torch.bfloat16)
    ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double()
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item() + 1e-3, err


def _w4_case(m, n, k, group, act_order, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    group = group if group != -1 else k
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), device="cuda", dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, device="cuda", generator=g) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 16, (groups, n), device="cuda", generator=g).half()
    g_idx = None
    if act_order:  # sorted groups of uneven sizes, as a tensor-parallel shard of an act-order checkpoint has
        g_idx = torch.sort(torch.randint(0, groups, (k,), device="cuda", generator=g)).values.to(torch.int32)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    return x, pack_rows(q), scales, zeros, g_idx, group


@pytest.mark.parametrize("m", [1, 2, 8, 16, 33, 128, 700])
@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (1536, 576), (72, 256)])
@pytest.mark.parametrize("group,act_order", [(128, False), (32, False), (64, True), (-1, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_kernel_matches_dequantize_then_matmul(m, n, k, group, act_order, dtype):
    from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

    if k % (group if group != -1 else k):
        pytest.skip("group does not divide K")
    x, qweight, scales, zeros, g_idx, group = _w4_case(m, n, k, group, act_order, dtype)
    y = w4a16_matmul(x, qweight, scales, zeros, g_idx, group)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert y.dtype == dtype and y.shape == (m, n)
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= 1e-2 * ref.float().abs().max().item() + 1e-2, err


W4_VARIANTS = [  # every kernel of triton_w4a16.py, whatever the table picks today
    dict(kernel="fma", block_m=1, block_n=128, block_k=128, split_k=0, num_warps=4, num_stages=3),
    dict(kernel="fma", block_m=1, block_n=256, block_k=64, split_k=0, num_warps=8, num_stages=3),
    dict(kernel="gemv", block_m=1, block_n=256, block_k=128, split_k=0, num_warps=4, num_stages=1),
    dict(kernel="gemv", block_m=1, block_n=128, block_k=64, split_k=3, num_warps=2, num_stages=3),
    dict(kernel="gemv_rows", block_m=1, block_n=128, block_k=128, split_k=0, num_warps=1, num_stages=1),
    dict(kernel="gemv_rows", block_m=1, block_n=512, block_k=64, split_k=3, num_warps=2, num_stages=1),
    dict(kernel="mma", block_m=16, block_n=64, block_k=128, split_k=0, num_warps=4, num_stages=3),
    dict(kernel="mma", block_m=64, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=3),
    dict(kernel="gemm", block_m=16, block_n=64, block_k=128, split_k=0, num_warps=4, num_stages=3),
    dict(kernel="gemm", block_m=64, block_n=128, block_k=64, split_k=1, num_warps=8, num_stages=3),
]


@pytest.mark.parametrize("config", W4_VARIANTS, ids=lambda c: f"{c['kernel']}-m{c['block_m']}-n{c['block_n']}")
@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1536, 576), (72, 256)])
@pytest.mark.parametrize("group,act_order", [(128, False), (32, False), (64, True)])
def test_every_w4a16_kernel_variant(config, m, n, k, group, act_order):
    from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

    if k % (group if group != -1 else k):
        pytest.skip("group does not divide K")
    x, qweight, scales, zeros, g_idx, group = _w4_case(m, n, k, group, act_order, torch.bfloat16, seed=m)
    y = w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= 1e-2 * ref.float().abs().max().item() + 1e-2, err


@pytest.mark.parametrize("kernel,block_m", [("fma", 1), ("gemv", 1), ("gemv_rows", 1), ("mma", 16), ("gemm", 16)])
def test_w4a16_split_k_is_deterministic_and_leaves_the_counters_at_zero(kernel, block_m):
    """Split K ends in the kernel (the last program of a tile adds the partials in split order): the same bits on
    every call, whichever program finishes last, and every tile counter back at 0."""
    from pagellm.model_executor.layers.quantization import triton_w4a16

    config = dict(kernel=kernel, block_m=block_m, block_n=64, block_k=128, split_k=8, num_warps=4, num_stages=3)
    if kernel in ("gemv", "gemv_rows"):  # its tiles: whole columns per thread; split 32 takes the unrolled fixup past one round
        config.update(block_n=256, num_warps=1, split_k=32)
    x, qweight, scales, zeros, g_idx, group = _w4_case(3, 4096, 4096, 128, False, torch.bfloat16, seed=4)
    outs = [triton_w4a16.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config) for _ in range(5)]
    torch.cuda.synchronize()
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert not triton_w4a16._COUNTERS[x.device].any()
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert (outs[0].float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item() + 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", [(6144, 4096, 128), (4096, 14336, 128), (28672, 4096, 128), (4096, 4096, -1),
                                       (1536, 576, 32), (72, 256, 64)])
@pytest.mark.parametrize("kernel", ["gemv", "gemv_rows"])
def test_w4a16_gemv_with_extreme_activations(n, k, group, dtype, kernel):
    """The batch-1 `gemv` reads each masked nibble as a float32 subnormal and scales x by up to 2**101 through its
    exponent: large (2**14) and tiny (2**-40) activations and exact zeros give the reference's result, so no
    subnormal is flushed to zero and no scaled x overflows."""
    from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

    config = dict(kernel=kernel, block_m=1, block_n=256, block_k=128, split_k=0, num_warps=1, num_stages=1)
    x, qweight, scales, zeros, g_idx, group = _w4_case(3, n, k, group, False, dtype, seed=n + k)
    x[0, : k // 2] *= 2.0 ** 14 if dtype == torch.bfloat16 else 2.0 ** 4
    x[1, : k // 2] *= 2.0 ** -40 if dtype == torch.bfloat16 else 2.0 ** -8
    x[2, ::3] = 0.0
    y = w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    for row in range(3):
        err = (y[row].float() - ref[row].float()).abs().max().item()
        assert err <= 1e-2 * ref[row].float().abs().max().item() + 1e-30, (row, err)


def _table_configs():
    from pagellm.model_executor.layers.quantization.w4a16_configs import W4A16_CONFIGS

    return [pytest.param(c, id=f"{key}-{bucket}") for key, entry in W4A16_CONFIGS.items()
            for bucket, c in entry.items()]


@pytest.mark.parametrize("config", _table_configs())
@pytest.mark.parametrize("m", [1, 7, 64])
def test_every_w4a16_table_config(config, m):
    """Whatever the table holds (baked tuning winners included) computes the product, on any M and shape."""
    from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

    x, qweight, scales, zeros, g_idx, group = _w4_case(m, 1536, 576, 64, False, torch.bfloat16, seed=m)
    y = w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert (y.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item() + 1e-2


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_w4a16_kernel_in_a_cuda_graph(m):
    """The table's kernel for M (split-K partial sums included) captured once, replayed with other inputs."""
    from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

    x, qweight, scales, zeros, g_idx, group = _w4_case(m, 4096, 4096, 128, False, torch.bfloat16, seed=1)
    w4a16_matmul(x, qweight, scales, zeros, g_idx, group)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_matmul(x, qweight, scales, zeros, g_idx, group)
    for seed in (2, 3):
        x.copy_(torch.randn(m, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
        assert (y.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item() + 1e-2


@pytest.mark.parametrize("quantization", ["fp8", "int8", "gptq", "awq"])
def test_engine_with_cuda_graphs(tiny_model_dir, quantization):
    """A tiny model per method on CUDA in bf16, decode CUDA graphs on: runs, and (fp8/int8, whose float
    checkpoint is the same) its first greedy token agrees with the unquantized engine's."""
    from pagellm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16)
    prompts = [{"prompt_token_ids": list(range(10 + i, 40 + i))} for i in range(4)]
    opts = dict(dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3, max_model_len=256,
                device="cuda")
    if quantization in ("gptq", "awq"):
        opts["load_format"] = "dummy"
    llm = LLM(tiny_model_dir("llama"), quantization=quantization, **opts)
    try:
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert all(len(o) == 16 for o in outs)
    if quantization in ("fp8", "int8"):
        ref_llm = LLM(tiny_model_dir("llama"), **opts)
        try:
            ref = [o.outputs[0] for o in ref_llm.generate(
                prompts, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5), use_tqdm=False)]
        finally:
            ref_llm.shutdown()
        # The first greedy token is the unquantized engine's, or a near-tie of it there (the tiny random model's
        # top logits can be close enough for 8-bit rounding to swap them; on one H200, 1 prompt of 4 under
        # fp8). Later tokens may drift apart.
        for out, r in zip(outs, ref):
            top = r.logprobs[0]
            assert out[0] in top and top[out[0]].logprob >= top[r.token_ids[0]].logprob - 0.25, (out, top)
