"""Attention backends by device. The torch reference serves the CPU and is what GPU kernels are checked against;
CUDA devices get the Triton kernels (imported lazily, so the CPU path never imports triton).
PAGELLM_ATTENTION_BACKEND=torch forces the reference on any device (debugging)."""

from __future__ import annotations

import os
from types import ModuleType

import torch


def get_attention_backend(device: torch.device) -> ModuleType:
    """A module with `forward(q, k, v, kv_cache, attn_metadata, scale)` for this device."""
    if torch.device(device).type == "cuda" and os.environ.get("PAGELLM_ATTENTION_BACKEND", "") != "torch":
        from pagellm.attention.backends import triton_attn

        return triton_attn
    from pagellm.attention.backends import torch_ref

    return torch_ref
