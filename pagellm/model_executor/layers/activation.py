"""Activations of gated MLPs."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x [..., 2*I] holds [gate | up] (as a merged gate_up projection writes it); returns silu(gate) * up [..., I].
    With `out_qdtype` set (layers/quant_fusion.py: the output feeds only a W8A8 linear), returns it as a
    w8a8.QuantizedActivation of that type, quantized per token in the same kernel on CUDA."""

    supports_quant_output = True
    out_qdtype: Optional[torch.dtype] = None

    def forward(self, x: torch.Tensor):
        if self.out_qdtype is None:
            return self._forward(x)
        from pagellm.model_executor.layers.quantization.w8a8 import QuantizedActivation, quantize_activations

        if x.is_cuda:
            from pagellm.model_executor.layers.quantization.triton_quant import silu_and_mul_quant_triton

            q, scale = silu_and_mul_quant_triton(x, self.out_qdtype)
        else:
            y = self._forward(x)
            q, scale = quantize_activations(y.reshape(-1, y.shape[-1]), self.out_qdtype)
        return QuantizedActivation(q, scale, x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused pass instead of three
            from pagellm.model_executor.layers import triton_ops

            return triton_ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluTanhAndMul(nn.Module):
    """x [..., 2*I] holds [gate | up]; returns gelu_tanh(gate) * up [..., I] (Gemma's gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


_GATED = {"silu": SiluAndMul, "swish": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act in _GATED:
        return _GATED[hidden_act]()
    raise NotImplementedError(f"hidden_act {hidden_act!r} is not supported for gated MLPs (supported: "
                              f"{', '.join(sorted(_GATED))})")
