"""The W4A16 kernels' config choice (pure Python, always run) and the kernels themselves under Triton's CPU
interpreter (skipped without triton, and with CUDA, where test_quantization_cuda.py checks the compiled ones),
against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.layers.kernel_configs import buckets_of
from pagellm.model_executor.layers.quantization import w4a16_configs as wc
from pagellm.model_executor.layers.quantization.w4a16 import pack_rows, w4a16_reference
from tests.triton_interpreter import interpreted as interpreted_module


def config(kernel, block_m, block_n, block_k, split_k=0, num_warps=4, num_stages=1):
    return dict(kernel=kernel, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                num_warps=num_warps, num_stages=num_stages)


# ---- the table and the launch parameters -----------------------------------------------------------------
def test_table_is_valid_and_covers_every_kernel_choice():
    wc.check_w4a16_table()
    default = wc.W4A16_CONFIGS["default"]
    assert default["1"]["kernel"] == "gemv"  # batch-1 decode: no tensor cores
    assert buckets_of(wc.W4A16_CONFIGS) == sorted(int(b) for b in default)


@pytest.mark.parametrize("m,bucket", [(1, "1"), (2, "4"), (4, "4"), (5, "16"), (16, "16"), (17, "64"),
                                      (256, "256"), (8192, "256")])
def test_lookup_takes_the_smallest_bucket_at_least_m(m, bucket):
    assert wc.w4a16_config(m, 4096, 4096) == wc.W4A16_CONFIGS["default"][bucket]


def test_a_shape_entry_overrides_the_default(monkeypatch):
    own = config("mma", 16, 128, 256, split_k=4)
    monkeypatch.setattr(wc, "W4A16_CONFIGS", {"default": wc.W4A16_CONFIGS["default"], "4096->6144": {"8": own}})
    assert wc.w4a16_config(3, 4096, 6144) == own
    assert wc.w4a16_config(300, 4096, 6144) == own  # past its last bucket: the last
    assert wc.w4a16_config(3, 6144, 4096) == wc.W4A16_CONFIGS["default"]["4"]  # K->N, not N->K


@pytest.mark.parametrize("bad,field", [
    (dict(kernel="mma", block_k=64), "block_k"),
    (dict(kernel="fma", block_n=96), "power of two"),
    (dict(kernel="gemm", block_m=8), "block_m"),
    (dict(kernel="fma", block_m=4, block_n=64), "block_m 1"),
    (dict(kernel="wmma"), "kernel"),
    (dict(split_k=-1), "split_k"),
    (dict(num_warps="4"), "num_warps"),
])
def test_bad_configs_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        wc.check_config({**config("mma", 16, 64, 128), **bad})
    with pytest.raises(ValueError, match="W4A16"):
        wc.check_w4a16_table({"default": {"1": {**config("mma", 16, 64, 128), **bad}}})
    with pytest.raises(ValueError, match="default"):
        wc.check_w4a16_table({"4096->4096": {"1": config("mma", 16, 64, 128)}})


def test_launch_params():
    # Batch 1 on Llama-8B's o_proj, 132 SMs: 32 column tiles, split 8 ways (256 programs), 4 K tiles each.
    assert wc.launch_params(1, 4096, 4096, 128, False, config("fma", 1, 128, 128), 132) == (128, 8, 512, True)
    # A config's own split wins; block_k drops to the group size (256 -> 128) to keep one group per tile.
    assert wc.launch_params(1, 4096, 4096, 128, False, config("fma", 1, 128, 256, split_k=2), 132) == (
        128, 2, 2048, True)
    # Group 32 is under the mma kernel's smallest block_k: tiles span groups, scales per weight.
    assert wc.launch_params(16, 4096, 4096, 32, False, config("mma", 16, 64, 128, 1), 132) == (128, 1, 4096, False)
    assert wc.launch_params(16, 4096, 4096, 128, True, config("mma", 16, 64, 128, 1), 132)[3] is False  # g_idx
    # No program starts past K: K = 576 in 128-tiles asked for 4 ways gets 3 programs of 256.
    assert wc.launch_params(1, 64, 576, 576, False, config("fma", 1, 64, 128, split_k=4), 132) == (128, 3, 256,
                                                                                                 False)
    # gemv: one K tile per program, or four when its loop is pipelined.
    assert wc.launch_params(1, 4096, 4096, 128, False, config("gemv", 1, 128, 256), 132) == (128, 32, 128, True)
    assert wc.launch_params(1, 28672, 14336, 128, False, config("gemv", 1, 128, 128), 132)[1:3] == (112, 128)
    assert wc.launch_params(1, 4096, 4096, 128, False, config("gemv", 1, 128, 128, num_stages=3), 132)[1:3] == (
        8, 512)
    # gemv_rows: two K tiles per program.
    assert wc.launch_params(1, 28672, 4096, 128, False, config("gemv_rows", 1, 128, 128), 132)[1:3] == (16, 256)
    # The table's large-M config is not split.
    assert wc.launch_params(256, 4096, 4096, 128, False, wc.w4a16_config(256, 4096, 4096), 132)[1] == 1


# ---- the kernels under the interpreter -------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    with interpreted_module("pagellm.model_executor.layers.quantization.triton_w4a16") as module:
        yield module


def make_case(m, n, k, group, act_order, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    group = group if group != -1 else k
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 16, (groups, n), generator=g).half()
    g_idx = None
    if act_order:  # sorted groups of uneven sizes (a tensor-parallel shard of an act-order checkpoint)
        g_idx = torch.sort(torch.randint(0, groups, (k,), generator=g)).values.to(torch.int32)
    return torch.randn(m, k, generator=g).to(dtype), pack_rows(q), scales, zeros, g_idx, group


CASES = [  # m, n, k, group, act_order
    (1, 64, 256, 128, False),   # one group per tile, split K
    (3, 40, 192, -1, False),    # one group over a K that tiles do not divide; N not a multiple of BLOCK_N
    (5, 32, 128, 32, False),    # groups smaller than the tile
    (2, 32, 256, 64, True),     # act-order g_idx
]
CONFIGS = [config("fma", 1, 32, 128), config("fma", 1, 64, 64, split_k=3), config("gemv", 1, 32, 128),
           config("gemv", 1, 64, 64, split_k=3), config("gemv_rows", 1, 32, 128), config("gemv_rows", 1, 64, 64, 3),
           config("mma", 16, 32, 128), config("gemm", 16, 32, 64, split_k=2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['kernel']}-m{c['block_m']}-k{c['block_k']}")
@pytest.mark.parametrize("m,n,k,group,act_order", CASES)
def test_interpreted_kernels_match_the_reference(kernels, cfg, m, n, k, group, act_order):
    x, qweight, scales, zeros, g_idx, group = make_case(m, n, k, group, act_order, torch.float16, seed=m)
    y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=cfg)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    assert (y.float() - ref.float()).abs().max().item() <= 2e-3 * ref.float().abs().max().item()


def test_interpreted_fma_kernel_in_bfloat16(kernels):
    """bf16 activations on the CUDA-core path (the interpreter's bf16 tl.dot is wrong with numpy 2.4 for every
    kernel, old and new: the dot paths are checked in bf16 on CUDA only)."""
    x, qweight, scales, zeros, g_idx, group = make_case(1, 64, 512, 128, False, torch.bfloat16, seed=7)
    y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config("fma", 1, 64, 128))
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item()


@pytest.mark.parametrize("kernel", ["gemv", "gemv_rows"])
@pytest.mark.parametrize("split_k", [0, 3])
def test_interpreted_gemv_kernel_in_bfloat16_pairs(kernels, split_k, kernel):
    """`gemv` with bf16 activations reads them two per int32, scaled by their exponent fields; large and tiny
    magnitudes (to 2**20 and 2**-60) and zeros come out as the reference's."""
    x, qweight, scales, zeros, g_idx, group = make_case(2, 64, 512, 128, False, torch.bfloat16, seed=3)
    x[0, :64] *= 2.0 ** 20
    x[0, 64:128] *= 2.0 ** -60
    x[1, ::3] = 0.0
    assert x.data_ptr() % 4 == 0
    y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config(kernel, 1, 32, 64, split_k))
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    for row in range(2):
        err = (y[row].float() - ref[row].float()).abs().max().item()
        assert err <= 1e-2 * ref[row].float().abs().max().item(), (row, err)


def test_interpreted_gemv_takes_fma_where_tiles_cross_groups_or_k(kernels, monkeypatch):
    """Act-order and a K that tiles do not divide go to `fma`, which masks them; groups smaller than the tile
    shrink the tile to the group (launch_params) and stay on `gemv`."""
    ran = []
    fma = kernels._KERNELS["fma"]

    class Spy:
        def __getitem__(self, grid):
            ran.append(grid)
            return fma[grid]
    monkeypatch.setitem(kernels._KERNELS, "fma", Spy())
    for m, n, k, group, act_order in CASES[1:]:
        x, qweight, scales, zeros, g_idx, group = make_case(m, n, k, group, act_order, torch.float16, seed=m)
        y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=config("gemv", 1, 32, 128))
        ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
        assert (y.float() - ref.float()).abs().max().item() <= 2e-3 * ref.float().abs().max().item()
    assert len(ran) == 2  # K = 192 in one group, and act-order


def test_interpreted_table_path_is_the_layer_path(kernels):
    """With no config the table's is used: M = 1 (fma) and M = 20 (mma) give the reference's result."""
    for m in (1, 20):
        x, qweight, scales, zeros, g_idx, group = make_case(m, 32, 256, 128, False, torch.float16, seed=m)
        y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group)
        ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
        assert (y.float() - ref.float()).abs().max().item() <= 2e-3 * ref.float().abs().max().item()


@pytest.mark.parametrize("kernel,block_m", [("fma", 1), ("mma", 16), ("gemm", 16)])
def test_interpreted_split_whose_last_tile_starts_past_k(kernels, kernel, block_m):
    """K = 640 in 128-tiles split 2 ways: the second program's tiles are 384, 512 and 640 (past K, all masked)."""
    cfg = config(kernel, block_m, 32, 128, split_k=2)
    assert wc.launch_params(2, 32, 640, 128, False, cfg, 4) == (128, 2, 384, True)
    x, qweight, scales, zeros, g_idx, group = make_case(2, 32, 640, 128, False, torch.float16, seed=11)
    y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=cfg)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    assert torch.isfinite(y).all()
    assert (y.float() - ref.float()).abs().max().item() <= 2e-3 * ref.float().abs().max().item()


def test_interpreted_split_k_ends_in_the_kernel_and_leaves_the_counters_at_zero(kernels, monkeypatch):
    """Split K: the last program of each tile writes the sum (the counters are back at 0 for the next call);
    past the counters' size the partials are summed after the kernel instead. Both give the reference."""
    cfg = config("fma", 1, 32, 64, split_k=4)
    x, qweight, scales, zeros, g_idx, group = make_case(3, 64, 512, 128, False, torch.float16, seed=5)
    ref = w4a16_reference(x, qweight, scales, zeros, g_idx, group)
    y = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=cfg)
    counters = kernels._COUNTERS[x.device]
    assert not counters.any()
    monkeypatch.setattr(kernels, "MAX_SPLIT_TILES", 1)  # 2 x 3 tiles: more than the buffer holds
    y_after = kernels.w4a16_matmul(x, qweight, scales, zeros, g_idx, group, config=cfg)
    for out in (y, y_after):
        assert (out.float() - ref.float()).abs().max().item() <= 2e-3 * ref.float().abs().max().item()
    assert (y.float() - y_after.float()).abs().max().item() <= 1e-3 * ref.float().abs().max().item()

