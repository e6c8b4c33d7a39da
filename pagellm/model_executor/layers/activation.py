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


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act in ("silu", "swish"):
        return SiluAndMul()
    raise NotImplementedError(f"hidden_act {hidden_act!r} is not supported for gated MLPs (supported: silu)")
