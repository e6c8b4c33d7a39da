"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), computed in float32 and cast back to x's dtype before the weight
    is applied (the order HF Llama/Qwen use, so low-precision results agree with theirs).

    `forward(x)` returns the normed x. `forward(x, residual)` first adds the residual (in x's dtype, as the
    unfused block would) and returns `(normed, x + residual)`: the sum is the next block's residual.
    With `out_qdtype` set (layers/quant_fusion.py: the output feeds only a W8A8 linear), "normed" is a
    w8a8.QuantizedActivation of that type, quantized per token in the same kernel on CUDA.
    """

    supports_quant_output = True
    out_qdtype: Optional[torch.dtype] = None

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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self.out_qdtype is not None:
            return self._forward_quantized(x, residual)
        return self._forward(x, residual)

    def _forward_quantized(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        from pagellm.model_executor.layers.quantization.w8a8 import QuantizedActivation, quantize_activations

        if x.is_cuda and (residual is None or residual.is_contiguous()):
            from pagellm.model_executor.layers.quantization.triton_quant import rms_norm_quant_triton

            q, scale = rms_norm_quant_triton(x, self.weight, self.eps, self.out_qdtype, residual)
        else:
            out = self._forward(x, residual)
            normed = out if residual is None else out[0]
            q, scale = quantize_activations(normed.reshape(-1, normed.shape[-1]), self.out_qdtype)
            residual = None if residual is None else out[1]
        quantized = QuantizedActivation(q, scale, x.dtype)
        return quantized if residual is None else (quantized, residual)

    def _forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.is_cuda:  # one fused pass (the sum goes into `residual` in place)
            from pagellm.model_executor.layers import triton_ops

            if residual is None:
                return triton_ops.rms_norm(x, self.weight, self.eps)
            if residual.is_contiguous():
                return triton_ops.rms_norm(x, self.weight, self.eps, residual), residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = (x / sqrt(mean(x^2) + eps)) * (1 + weight), all in float32, then cast to x's dtype.
    The weight is stored as the checkpoint holds it (zero-centred); a GGUF's 1 + w is turned back by the loader.
    Same residual-fused `forward(x, residual)` as RMSNorm (never the Triton kernel, which applies w, not 1 + w)."""

    supports_quant_output = False

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

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
