"""The fused Triton kernels (RMSNorm + residual, SiLU-and-mul, rotary) against the torch code of the same layers,
on random inputs of many shapes and dtypes (CUDA only); the norm and activation ending in the W8A8 per-token
quantization against the unfused kernels."""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.layers.activation import SiluAndMul
from pagellm.model_executor.layers.norm import RMSNorm
from pagellm.model_executor.layers.rotary import RotaryEmbedding

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 must match to rounding; half types to one or two units in the last place of the output dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (300, 1024), (33, 4096), (5, 5120), (2, 8192)])
def test_rms_norm(dtype, rows, hidden):
    torch.manual_seed(rows * hidden)
    norm = RMSNorm(hidden, 1e-5, dtype=dtype, device="cuda")
    norm.weight.data.normal_(1.0, 0.2)
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda") * 3
    res = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    ref = norm._norm(x)
    _close(norm(x), ref, dtype)
    ref_out, ref_res = norm._norm(x + res), x + res
    res_in = res.clone()
    out, new_res = norm(x, res_in)
    assert new_res.data_ptr() == res_in.data_ptr()  # the sum went into the residual in place
    _close(out, ref_out, dtype)
    _close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 128), (9, 1536), (257, 3072), (64, 14336), (3, 17)])
def test_silu_and_mul(dtype, rows, inter):
    torch.manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, dtype=dtype, device="cuda") * 4
    d = inter
    ref = torch.nn.functional.silu(x[:, :d]) * x[:, d:]
    _close(SiluAndMul()(x), ref, dtype)


QDTYPES = [torch.float8_e4m3fn, torch.int8]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8) if
                       b.element_size() == 1 else b)


def _same_quantization(fused, q: torch.Tensor, scale: torch.Tensor) -> None:
    """The fused kernel's (q, scale) against quantizing the unfused kernel's 16-bit output. The two are compiled
    apart, so a sum of squares may contract into FMAs differently and move a normed value by one unit of the 16-bit
    dtype: then a scale moves by as much and a few values land on the next 8-bit code. Anything more is a bug."""
    assert fused.q.dtype == q.dtype and fused.q.shape == q.shape
    torch.testing.assert_close(fused.scale, scale, rtol=2e-3, atol=0)
    codes_a, codes_b = fused.q.view(torch.int8).int(), q.view(torch.int8).int()
    off = codes_a != codes_b
    assert off.float().mean() < 1e-3
    assert ((codes_a - codes_b).abs()[off] <= 1).all()


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (300, 4096), (2, 8192)])
def test_rms_norm_quantized_is_the_norm_then_quantization(qdtype, dtype, rows, hidden):
    """The fused norm + per-token quantization gives the bits of the norm, then quantize_per_row_triton."""
    from pagellm.model_executor.layers.quantization.triton_quant import quantize_per_row_triton

    torch.manual_seed(rows + hidden)
    norm = RMSNorm(hidden, 1e-5, dtype=dtype, device="cuda")
    norm.weight.data.normal_(1.0, 0.2)
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda") * 3
    x[0, 0] = 40.0  # an outlier, as real activations have
    res = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    for residual in (None, res):
        r_fused, r_plain = (None, None) if residual is None else (residual.clone(), residual.clone())
        fused = norm(x, r_fused, qdtype) if residual is not None else norm(x, quant_dtype=qdtype)
        plain = norm(x, r_plain) if residual is not None else norm(x)
        if residual is not None:
            (fused, fused_res), (plain, plain_res) = fused, plain
            _same_bits(fused_res, plain_res)
        _same_quantization(fused, *quantize_per_row_triton(plain, qdtype))
        assert fused.dtype == dtype and fused.lead == (rows,)


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,inter", [(1, 128), (9, 1536), (257, 3072), (16, 14336), (3, 17), (2, 20000)])
def test_silu_and_mul_quantized_is_the_activation_then_quantization(qdtype, dtype, rows, inter):
    from pagellm.model_executor.layers.quantization.triton_quant import quantize_per_row_triton

    torch.manual_seed(rows * inter)
    x = torch.randn(rows, 2 * inter, dtype=dtype, device="cuda") * 4
    _same_quantization(SiluAndMul()(x, qdtype), *quantize_per_row_triton(SiluAndMul()(x), qdtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 2, 64), (37, 32, 8, 128), (300, 16, 8, 128),
                                                             (5, 9, 3, 64), (8, 8, 1, 256)])
def test_rotary_in_place_on_fused_qkv_views(dtype, tokens, heads, kv_heads, head_dim):
    torch.manual_seed(tokens * heads)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 1024}, device="cuda")
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    rope_cpu = RotaryEmbedding(head_dim, 4096, 500000.0, rope.scaling)
    ref_q, ref_k = rope_cpu(positions.cpu(), q.cpu().contiguous(), k.cpu().contiguous())
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr()
    _close(out_q.cpu(), ref_q, dtype)
    _close(out_k.cpu(), ref_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched
