"""The FP8 KV cache's storage rule and its per-layer scales, said once for the backends and the model loader.

With kv_cache_dtype="fp8" K and V are stored as float8 e4m3 (finite-only, largest value 448) with one float32
scale per layer for K and one for V, kept on each `Attention` module as buffers (`k_scale`, `v_scale`):

    write:  stored = e4m3(clamp(x / scale, -448, 448))        read:  x ~= stored * scale

The backends never materialize a dequantized cache: q . (k8 * s_k) = (q * s_k) . k8, and p . (v8 * s_v) =
(p . v8) * s_v, so reads fold s_k into the softmax scale and s_v into the output. With a cache in the model's
dtype the scales are ignored.

Scales come from the checkpoint when it has them (compressed-tensors / llm-compressor, and vLLM's older FP8
checkpoints), else they stay 1.0. Checkpoint names, for layer prefix P = `model.layers.N.self_attn`:
`P.k_scale`, `P.v_scale`, `P.k_proj.output_scale`, `P.v_proj.output_scale`, and `P.kv_scale` (one for both).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0

_SCALE_NAME = re.compile(r"^(?P<prefix>.*\.self_attn)\.(?:(?P<kv>[kv]|kv)_scale|(?P<proj>[kv])_proj\.output_scale)$")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def check_device_supports(kv_cache_dtype: torch.dtype, device: torch.device) -> None:
    """The Triton kernels convert e4m3 in hardware: CUDA needs compute capability 8.9 (Ada, Hopper) or newer."""
    if not is_fp8(kv_cache_dtype) or torch.device(device).type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer; "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}")


def quantize(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x in any float dtype -> e4m3 values of x / scale, saturated at +-448 (e4m3fn has no infinity)."""
    x = x.float()
    if scale is not None:
        x = x / scale
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def checkpoint_scale_targets(name: str) -> Optional[list[str]]:
    """Our buffer names that a checkpoint tensor named `name` fills, or None when it is no KV-cache scale."""
    m = _SCALE_NAME.match(name)
    if m is None:
        return None
    which = m.group("kv") or m.group("proj")
    kinds = ["k", "v"] if which == "kv" else [which]
    return [f"{m.group('prefix')}.attn.{kind}_scale" for kind in kinds]


def load_kv_scale(buffers: dict[str, torch.Tensor], name: str, tensor: Any) -> bool:
    """Copy checkpoint tensor `name` into the attention scale buffers it names; False when it names none.

    Only per-tensor scales exist here (one number per layer); anything else is a ValueError naming the tensor,
    as is a scale that is not a positive finite number. `tensor` may be lazy (a LazySafetensor)."""
    from pagellm.model_executor.layers.linear import materialize

    targets = checkpoint_scale_targets(name)
    if targets is None:
        return False
    tensor = materialize(tensor)
    if tensor.numel() != 1:
        raise ValueError(f"checkpoint tensor {name!r}: only per-tensor KV-cache scales (one number) are supported, "
                         f"got shape {tuple(tensor.shape)}")
    value = float(tensor.float().reshape(()))
    if not (value > 0.0 and value != float("inf")):
        raise ValueError(f"checkpoint tensor {name!r}: a KV-cache scale must be a positive finite number, got {value}")
    for target in targets:
        buf = buffers.get(target)
        if buf is None:  # e.g. a layer of another pipeline stage has no buffers here
            continue
        buf.fill_(value)
    return True


__all__ = ["FP8_DTYPE", "FP8_MAX", "is_fp8", "check_device_supports", "quantize", "checkpoint_scale_targets",
           "load_kv_scale"]
