"""The Attention module a model calls: picks the backend for the device once, then forwards to it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagellm.attention.backends import get_attention_backend
from pagellm.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends over each request's blocks.

    q: [T, num_heads * head_dim]; k, v: [T, num_kv_heads * head_dim]; kv_cache:
    [2, num_blocks, block_size, num_kv_heads, head_dim]. Returns [T, num_heads * head_dim].

    `k_scale` / `v_scale` (float32 [1] buffers, 1.0 unless the checkpoint has them) are this layer's FP8 KV-cache
    scales (attention/fp8_kv.py); the backends use them only when the cache is float8. They are buffers, not
    parameters: a checkpoint without them is complete, and the kernels read them from device memory, so a
    captured CUDA graph sees the loaded values.

    `sliding_window` (None: full attention): a query at position i sees only keys at positions > i - window,
    as transformers' sliding masks do. The cache still holds every block of the request.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 device: Optional[torch.device | str] = None, sliding_window: Optional[int] = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32, device=device), persistent=False)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        backend = get_attention_backend(q.device)
        out = backend.forward(q, k, v, kv_cache, attn_metadata, self.scale, self.k_scale, self.v_scale,
                              self.sliding_window)
        return out.reshape(t, self.num_heads * self.head_dim)
