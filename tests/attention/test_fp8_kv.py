"""The FP8 KV cache on the CPU: its storage rule, the checkpoint scale names, and torch_ref reading an FP8 cache
against float32 attention over the same (dequantized) values, on the shapes of the Triton tests."""

from __future__ import annotations

import pytest
import torch

from pagellm.attention import fp8_kv
from pagellm.attention.backends import torch_ref
from tests.attention.test_triton_attention import ALL_CASES, run_case

# The FP8 cases of the Triton tests that are short enough for a 2-core CPU: every kind (decode, mixed with
# prefill chunks, chunked over cached prefixes with padded tokens), bf16/fp16/fp32 queries, all scale choices.
CPU_CASES = [c for c in ALL_CASES if c.kv_fp8 and sum(q + k for q, k in zip(c.q_lens, c.ctx_lens)) <= 3000][:16]


def test_quantize_saturates_and_rounds_to_e4m3():
    x = torch.tensor([0.0, 1.0, -3.3, 1000.0, -1e6, 0.001, 447.0])
    q = fp8_kv.quantize(x, torch.tensor(1.0))
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [0.0, 1.0, -3.25, 448.0, -448.0, 2.0**-9, 448.0]  # 2**-9: the smallest subnormal
    # x / scale: a scale of 0.5 doubles the values; -200 lies halfway between the codes -192 and -208 and goes
    # to the even one.
    half = fp8_kv.quantize(torch.tensor([1.5, -100.0]), torch.tensor(0.5))
    assert half.float().tolist() == [3.0, -192.0]
    assert torch.isnan(fp8_kv.quantize(torch.tensor([float("nan")]), None).float()).all()


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_torch_ref_reads_fp8_cache_like_float_attention(case):
    """torch_ref.forward over an FP8 cache (quantized writes, scaled reads) == torch_ref in float32 over the
    dequantized cache, and the cache holds torch's quantization of this step's K/V."""
    assert len(CPU_CASES) >= 12
    result = run_case(case, "cpu", torch_ref.forward, poison=False)
    assert result["rel_norm"] < 1e-2


def test_scales_ignored_by_a_cache_in_the_model_dtype():
    """Scales only mean something to an FP8 cache: a float cache stores and reads K/V as they are."""
    cache = torch.zeros((2, 2, 4, 1, 8))
    k, v = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    torch_ref.write_kv(k, v, cache, torch.tensor([0, 5, 7]), torch.tensor([0.01]), torch.tensor([7.0]))
    assert torch.equal(cache[0].view(-1, 1, 8)[[0, 5, 7]], k)
    assert torch.equal(cache[1].view(-1, 1, 8)[[0, 5, 7]], v)


def test_checkpoint_scale_names():
    p = "model.layers.3.self_attn"
    assert fp8_kv.checkpoint_scale_targets(f"{p}.k_scale") == [f"{p}.attn.k_scale"]
    assert fp8_kv.checkpoint_scale_targets(f"{p}.v_scale") == [f"{p}.attn.v_scale"]
    assert fp8_kv.checkpoint_scale_targets(f"{p}.k_proj.output_scale") == [f"{p}.attn.k_scale"]
    assert fp8_kv.checkpoint_scale_targets(f"{p}.v_proj.output_scale") == [f"{p}.attn.v_scale"]
    assert fp8_kv.checkpoint_scale_targets(f"{p}.kv_scale") == [f"{p}.attn.k_scale", f"{p}.attn.v_scale"]
    for other in (f"{p}.q_proj.output_scale", f"{p}.k_proj.weight_scale", f"{p}.k_proj.input_scale",
                  f"{p}.q_scale", "model.layers.3.mlp.down_proj.output_scale", f"{p}.k_proj.weight"):
        assert fp8_kv.checkpoint_scale_targets(other) is None, other


def test_load_kv_scale_fills_buffers_and_rejects_bad_scales():
    p = "model.layers.0.self_attn"
    buffers = {f"{p}.attn.k_scale": torch.ones(1), f"{p}.attn.v_scale": torch.ones(1)}
    assert fp8_kv.load_kv_scale(buffers, f"{p}.k_proj.output_scale", torch.tensor(0.25, dtype=torch.bfloat16))
    assert fp8_kv.load_kv_scale(buffers, f"{p}.v_scale", torch.tensor([3.0]))
    assert buffers[f"{p}.attn.k_scale"].item() == 0.25 and buffers[f"{p}.attn.v_scale"].item() == 3.0
    assert not fp8_kv.load_kv_scale(buffers, f"{p}.k_proj.weight", torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"k_scale.*per-tensor"):
        fp8_kv.load_kv_scale(buffers, f"{p}.k_scale", torch.ones(4))
    with pytest.raises(ValueError, match=r"v_scale.*positive finite"):
        fp8_kv.load_kv_scale(buffers, f"{p}.v_scale", torch.tensor(0.0))
