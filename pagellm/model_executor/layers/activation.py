"""Activations of gated MLPs. Each takes an optional `quant_dtype`: the 8-bit dtype the linear after it
quantizes its input to (W8A8), in which case it returns its output quantized per token
(w8a8.QuantizedActivations), fused into its own pass on CUDA where a kernel exists."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model_executor.layers.quantization.w8a8 import QuantizedActivations, quantized

Activations = Union[torch.Tensor, QuantizedActivations]


class SiluAndMul(nn.Module):
    """x [..., 2*I] holds [gate | up] (as a merged gate_up projection writes it); returns silu(gate) * up [..., I]."""

    def forward(self, x: torch.Tensor, quant_dtype: Optional[torch.dtype] = None) -> Activations:
        if x.is_cuda:  # one fused pass instead of three (and the quantization's two)
            from pagellm.model_executor.layers import triton_ops

            if quant_dtype is None:
                return triton_ops.silu_and_mul(x)
            return QuantizedActivations(*triton_ops.silu_and_mul(x, quant_dtype), x.dtype, tuple(x.shape[:-1]))
        d = x.shape[-1] // 2
        y = F.silu(x[..., :d]) * x[..., d:]
        return y if quant_dtype is None else quantized(y, quant_dtype)


class GeluTanhAndMul(nn.Module):
    """x [..., 2*I] holds [gate | up]; returns gelu_tanh(gate) * up [..., I] (Gemma's gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor, quant_dtype: Optional[torch.dtype] = None) -> Activations:
        d = x.shape[-1] // 2
        y = F.gelu(x[..., :d], approximate="tanh") * x[..., d:]
        return y if quant_dtype is None else quantized(y, quant_dtype)


_GATED = {"silu": SiluAndMul, "swish": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act in _GATED:
        return _GATED[hidden_act]()
    raise NotImplementedError(f"hidden_act {hidden_act!r} is not supported for gated MLPs (supported: "
                              f"{', '.join(sorted(_GATED))})")
