"""W8A8: 8-bit weights with one scale per output channel, 8-bit activations with one scale per token, computed
at run time. Two element types share all of it: float8 e4m3 ("fp8") and int8 ("int8").

    w[n, k] ~ wq[n, k] * ws[n]        x[m, k] ~ xq[m, k] * xs[m]
    y[m, n] = (sum_k xq[m, k] * wq[n, k]) * xs[m] * ws[n]

The sum runs in float32 (fp8) or int32 (int8), then one rescale: on CUDA `torch._scaled_mm` (fp8, compute
capability >= 8.9; row-wise scaled for large batches, unscaled into float32 plus one Triton rescale for small
ones, where cuBLASLt's kernel is faster) or `torch._int_mm` (int8), with the per-token quantization in one Triton
pass; on the CPU (and older GPUs for fp8) the same sum in float32 / torch's CPU int8 matmul, so CI checks the
numerics the GPU runs.

Weights come either from a float checkpoint, quantized once after loading (`quantization="fp8"` or "int8"),
or already quantized in a compressed-tensors checkpoint (`weight` + `weight_scale`, per channel or per tensor).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from pagellm.model_executor.layers.quantization.base import LinearMethod, make_param, replace_param

FP8 = torch.float8_e4m3fn
QMAX = {FP8: torch.finfo(FP8).max, torch.int8: 127.0}
MIN_SCALE = 1e-10  # an all-zero row gets this scale (and zeros), not a division by zero
# An fp8 GEMM whose output has at most this many elements runs unscaled in cuBLASLt (float32 out) and is rescaled
# by a Triton pass: on an H200 that beats torch's row-wise scaled GEMM at decode batch sizes, until the float32
# intermediate costs more than it gains (Llama-8B's projections, `benchmarks/fp8_gemm.py`, h200-tp1-fp8-gemm.json:
# faster for o and down up to 256 rows, qkv up to 128, gate_up up to 16-64).
FP8_UNSCALED_MAX_OUTPUTS = 1 << 20


def quantize_per_row(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of each row of a 2-D tensor: (q [M, K] qdtype, scale [M, 1] float32).

    scale = max|row| / qmax; q = x / scale, rounded to nearest even (int8) or cast (fp8, itself round to
    nearest even), clamped to +-qmax. The torch reference of the Triton kernel in triton_quant.py."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / QMAX[qdtype]).clamp(min=MIN_SCALE)
    return round_to_scale(xf, scale, qdtype), scale


def round_to_scale(x: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """x / scale on the qdtype grid: rounded to nearest even (int8) or cast (fp8), clamped to +-qmax."""
    qmax = QMAX[qdtype]
    q = x.float() / scale
    if qdtype == torch.int8:
        q = q.round()
    return q.clamp(-qmax, qmax).to(qdtype)


class QuantizedActivations(NamedTuple):
    """Activations already quantized per token for a W8A8 linear, by the norm or activation before it (one pass
    instead of two): q [M, K] fp8/int8, scale [M, 1] float32, and the dtype and leading dims the linear's output
    takes (those of the 16-bit activations they stand for)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    lead: tuple[int, ...]


def quantized(y: torch.Tensor, qdtype: torch.dtype) -> QuantizedActivations:
    """y quantized per token (the unfused way: the CPU, or a layer without a fused kernel)."""
    q, scale = quantize_activations(y.reshape(-1, y.shape[-1]), qdtype)
    return QuantizedActivations(q, scale, y.dtype, tuple(y.shape[:-1]))


def quantize_activations(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization; one fused Triton pass on CUDA."""
    if x.is_cuda:
        from pagellm.model_executor.layers.quantization.triton_quant import quantize_per_row_triton

        return quantize_per_row_triton(x, qdtype)
    return quantize_per_row(x, qdtype)


@functools.lru_cache(maxsize=None)
def _unit_scale(device: torch.device) -> torch.Tensor:
    """The scalar 1.0 that an unscaled torch._scaled_mm takes as both scales (one per device, made once)."""
    return torch.ones((), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _fp8_capable(index: int) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_mm_supported(device: torch.device) -> bool:
    """torch._scaled_mm's fp8 GEMM runs here (CUDA, compute capability 8.9 or later)."""
    if device.type != "cuda":
        return False
    return _fp8_capable(device.index if device.index is not None else torch.cuda.current_device())


def w8a8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] @ wq [N, K]^T) * xs [M, 1] * ws [1, N], in out_dtype."""
    m, k = xq.shape
    n = wq.shape[0]
    if wq.dtype == FP8:
        if fp8_mm_supported(xq.device) and k % 16 == 0 and n % 16 == 0:
            if m * n <= FP8_UNSCALED_MAX_OUTPUTS:
                from pagellm.model_executor.layers.quantization.triton_quant import rescale_rows_cols_triton

                one = _unit_scale(xq.device)
                acc = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
                return rescale_rows_cols_triton(acc, xs, ws, out_dtype)
            # Row-wise scaled fp8 GEMM (float32 accumulation); its row-wise form writes bfloat16.
            y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
            return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
        acc = xq.float() @ wq.float().t()
    else:
        if xq.is_cuda:
            # cuBLASLt's int8 GEMM wants more than 16 rows, in multiples of 8: pad small batches.
            rows = max(32, -(-m // 8) * 8)
            xp = F.pad(xq, (0, 0, 0, rows - m)) if rows != m else xq
            acc = torch._int_mm(xp, wq.t())[:m].float()
        else:
            acc = torch._int_mm(xq, wq.t()).float()
    return (acc * xs * ws).to(out_dtype)


def w8a8_linear(x: Union[torch.Tensor, QuantizedActivations], wq: torch.Tensor, ws: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x W^T (+ bias) with W = wq * ws (ws [1, N] float32) and x quantized per token like wq (here, unless
    the layer before did it)."""
    if not isinstance(x, QuantizedActivations):
        x = quantized(x, wq.dtype)
    elif x.q.dtype != wq.dtype:
        raise ValueError(f"activations quantized to {x.q.dtype} for weights of {wq.dtype}")
    y = w8a8_matmul(x.q, x.scale, wq, ws, x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.lead, wq.shape[0])


def _fill_q(qdtype: torch.dtype):
    """Dummy 8-bit weights: standard normal (fp8) or uniform over [-127, 127] (int8)."""
    def fill(param: torch.Tensor, gen: torch.Generator, std: float) -> None:
        if qdtype == FP8:
            param.copy_(torch.randn(param.shape, generator=gen, device=param.device).to(FP8))
        else:
            param.copy_(torch.randint(-127, 128, param.shape, generator=gen, device=param.device))
    return fill


def _fill_scale(qdtype: torch.dtype):
    """Dummy scales: q * scale has the spread `std` of a float dummy weight."""
    q_std = 1.0 if qdtype == FP8 else math.sqrt((255 ** 2 - 1) / 12)  # N(0, 1); uniform integers in [-127, 127]

    def fill(param: torch.Tensor, gen: torch.Generator, std: float) -> None:
        param.fill_(std / q_std)
    return fill


def rotate_blocks(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ block_diag(block, block, ...) in float32: a checkpoint's online input rotation (R2 of
    pagellm/quantize/rotation.py), whose weight already holds W R2."""
    b = block.shape[0]
    return (x.float().reshape(-1, x.shape[-1] // b, b) @ block).reshape(x.shape)


class W8A8LinearMethod(LinearMethod):
    """qdtype: FP8 or torch.int8. serialized: the checkpoint holds the quantized weight and its scale (per output
    channel, or per tensor: one per merged projection), else it holds a float weight that is quantized after
    loading. Activations are always quantized per token at run time. rotation_block: the checkpoint rotates this
    layer's input at run time by an orthogonal block of that size (an `input_rotation` tensor), before the
    quantization (so no norm or activation may quantize for it)."""

    def __init__(self, qdtype: torch.dtype, serialized: bool, weight_strategy: str = "channel",
                 rotation_block: Optional[int] = None) -> None:
        if weight_strategy not in ("channel", "tensor"):
            raise ValueError(f"quantization: weight strategy {weight_strategy!r} is not supported (channel, tensor)")
        self.qdtype = qdtype
        self.input_quant_dtype = qdtype if rotation_block is None else None
        self.serialized = serialized
        self.weight_strategy = weight_strategy
        self.rotation_block = rotation_block

    def create_weights(self, layer, input_size, output_sizes, full_input_size, dtype, device) -> None:
        rows = sum(output_sizes)
        layer.output_partition_sizes = list(output_sizes)
        if self.rotation_block is not None:
            b = self.rotation_block
            if input_size % b:
                raise ValueError(f"quantization: an input rotation of blocks of {b} needs this layer's input size "
                                 f"({input_size} on this rank) to be a multiple of it")
            make_param(layer, "input_rotation", (b, b), torch.float32, device,
                       fill_dummy=lambda param, gen, std: param.copy_(torch.eye(b)))
        if not self.serialized:
            make_param(layer, "weight", (rows, input_size), dtype, device, input_dim=1, output_dim=0)
            return
        make_param(layer, "weight", (rows, input_size), self.qdtype, device, input_dim=1, output_dim=0,
                   fill_dummy=_fill_q(self.qdtype))
        if self.weight_strategy == "channel":
            make_param(layer, "weight_scale", (rows, 1), torch.float32, device, output_dim=0,
                       fill_dummy=_fill_scale(self.qdtype))
        else:
            make_param(layer, "weight_scale", (len(output_sizes),), torch.float32, device, shard_scalar=True,
                       fill_dummy=_fill_scale(self.qdtype))

    def process_weights_after_loading(self, layer) -> None:
        if not self.serialized:
            q, scale = quantize_per_row(layer.weight.data, self.qdtype)
            replace_param(layer, "weight", q)
            layer.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
        scale = layer.weight_scale.data.float()
        if self.weight_strategy == "tensor" and self.serialized:  # one scale per projection -> per row
            sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
            scale = scale.repeat_interleave(sizes)
        replace_param(layer, "weight_scale", scale.reshape(1, -1).contiguous())

    def apply(self, layer, x, bias):
        if self.rotation_block is not None:
            x = quantized(rotate_blocks(x, layer.input_rotation), self.qdtype)._replace(dtype=x.dtype)
        return w8a8_linear(x, layer.weight, layer.weight_scale, bias)
