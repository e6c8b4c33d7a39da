"""Activations of gated MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x [..., 2*I] holds [gate | up] (as a merged gate_up projection writes it); returns silu(gate) * up [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
