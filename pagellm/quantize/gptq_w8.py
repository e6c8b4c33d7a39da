"""GPTQ rounding onto the W8A8 grids (fp8 e4m3 or int8, one scale per output channel).

Rounding each weight to its nearest grid value ignores that the errors of one row add up in the layer's
output. GPTQ (Frantar et al., 2022) quantizes the input columns one at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian H = X^T X of the layer's
calibration inputs, so the output error on those inputs shrinks. llm-compressor's W8A8 recipes run it after
SmoothQuant; here it keeps the per-channel scales max|W_n| / qmax of the plain rounding, so the checkpoint's
format is unchanged.
"""

from __future__ import annotations

import torch

from pagellm.model_executor.layers.quantization.w8a8 import MIN_SCALE, QMAX, round_to_scale

BLOCK = 128
DAMP = 0.01  # added to H's diagonal, as a share of its mean: keeps the inverse well conditioned


def gptq_quantize_w8(w: torch.Tensor, hessian: torch.Tensor, qdtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] in qdtype, scale [N, 1] float32) of w [N, K], rounded against `hessian` [K, K].

    Runs on one CPU thread: the column loop is thousands of small ops, which intra-op threads only slow down
    (20x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, hessian, qdtype)
    finally:
        torch.set_num_threads(threads)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weight = w.float().clone()
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian: expected [{k}, {k}] for a weight of {tuple(w.shape)}; got {tuple(hessian.shape)}")
    scale = (weight.abs().amax(dim=1, keepdim=True) / QMAX[qdtype]).clamp(min=MIN_SCALE)
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # channels calibration never excited: their weights do not matter
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h.diagonal().add_(DAMP * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(weight)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        block = weight[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i:i + 1]
            q = round_to_scale(col, scale, qdtype).float() * scale
            out[:, i1 + i:i1 + i + 1] = q
            err = (col - q) / hblock[i, i]
            block[:, i:] -= err * hblock[i:i + 1, i:]
            errors[:, i:i + 1] = err
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return round_to_scale(out, scale, qdtype), scale
