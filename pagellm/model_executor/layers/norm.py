"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block, and with
the per-token quantization of a W8A8 linear after it."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pagellm.model_executor.layers.quantization.w8a8 import QuantizedActivations, quantized

Normed = Union[torch.Tensor, QuantizedActivations]


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), computed in float32 and cast back to x's dtype before the weight
    is applied (the order HF Llama/Qwen use, so low-precision results agree with theirs).

    `forward(x)` returns the normed x. `forward(x, residual)` first adds the residual (in x's dtype, as the
    unfused block would) and returns `(normed, x + residual)`: the sum is the next block's residual. With
    `quant_dtype` (the 8-bit dtype of the W8A8 linear that reads it), `normed` comes quantized per token
    (w8a8.QuantizedActivations), in the same pass on CUDA.
    """

    fused_kernel = True  # the Triton kernel computes this class's formula (GemmaRMSNorm's differs)

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, quant_dtype: Optional[torch.dtype] = None
    ) -> Union[Normed, tuple[Normed, torch.Tensor]]:
        if x.is_cuda and self.fused_kernel and (residual is None or residual.is_contiguous()):
            # one fused pass (the sum goes into `residual` in place)
            from pagellm.model_executor.layers import triton_ops

            out = triton_ops.rms_norm(x, self.weight, self.eps, residual, quant_dtype)
            if quant_dtype is not None:
                out = QuantizedActivations(*out, x.dtype, tuple(x.shape[:-1]))
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
        out = self._norm(x)
        if quant_dtype is not None:
            out = quantized(out, quant_dtype)
        return out if residual is None else (out, x)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = (x / sqrt(mean(x^2) + eps)) * (1 + weight), all in float32, then cast to x's dtype.
    The weight is stored as the checkpoint holds it (zero-centred); a GGUF's 1 + w is turned back by the loader.
    Same `forward(x, residual, quant_dtype)` as RMSNorm, always in torch (the Triton kernel applies w, not 1 + w)."""

    fused_kernel = False

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(hidden_size, eps, dtype, device)
        with torch.no_grad():
            self.weight.zero_()
        # Dummy weights (loader/dummy_loader.py) give norms a scale of 1: w = 0 here, not the ones of RMSNorm.
        self.weight.fill_dummy = lambda param, gen, std: param.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
