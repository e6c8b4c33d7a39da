"""Rotary position embedding (RoPE), neox style ("rotate half", as HF Llama/Qwen apply it).

A float32 table of cos|sin for every position up to max_position is built once; forward() gathers rows by
each token's position, so a flat ragged batch needs nothing but its positions tensor.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept, and the band in
    between interpolated smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style ("rotate half") rotation of x [..., D] in float32 by cos/sin [..., D/2] (broadcast over the
    heads), cast back to x's dtype. RoPE, M-RoPE and the Qwen2-VL vision tower's 2-D rope all rotate this way."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq*D], k [T, Hk*D]) -> rotated (q, k), same shapes and dtypes.

    Supported rope types: default (also None/"none"), linear, llama3. Others raise NotImplementedError.
    """

    SUPPORTED = ("default", "linear", "llama3")

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: Optional[dict] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.scaling = dict(scaling or {})
        rope_type = self.scaling.get("rope_type") or self.scaling.get("type") or "default"
        if rope_type == "none":
            rope_type = "default"
        if rope_type not in self.SUPPORTED:
            raise NotImplementedError(
                f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(self.SUPPORTED)})")
        self.rope_type = rope_type
        self.freq_factors: Optional[torch.Tensor] = None
        self._build(device)

    def inv_freq(self) -> torch.Tensor:
        inv_freq = _base_inv_freq(self.head_dim, self.base)
        if self.rope_type == "linear":
            inv_freq = inv_freq / float(self.scaling["factor"])
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        if self.freq_factors is not None:
            inv_freq = inv_freq / self.freq_factors.float().cpu()
        return inv_freq

    def _build(self, device: Optional[torch.device]) -> None:
        inv_freq = self.inv_freq()
        t = torch.arange(self.max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_pos, D/2]
        # A plain attribute, not a buffer: it must stay float32 whatever dtype the module is cast to. forward()
        # moves it to the positions' device the first time it sees another one.
        self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """Divide each frequency by a per-frequency factor (llama.cpp's `rope_freqs` tensor, which is how a GGUF
        of Llama 3.1 carries its rope scaling), then rebuild the table."""
        if factors.numel() != self.head_dim // 2:
            raise ValueError(f"rope_freqs has {factors.numel()} factors, expected {self.head_dim // 2}")
        self.freq_factors = factors.detach().float().flatten().cpu()
        self._build(self.cos_sin_cache.device)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H*D] (heads flat) by cos/sin [T, 1, D/2]."""
        return rotate_neox(x.view(x.shape[0], -1, self.head_dim), cos, sin).view(x.shape)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos_sin_cache.device != positions.device:
            self.cos_sin_cache = self.cos_sin_cache.to(positions.device)
        if q.is_cuda and q.stride(-1) == 1 and k.stride(-1) == 1:  # in place, one kernel for q and k
            from pagellm.model_executor.layers import triton_ops

            triton_ops.rotary_neox_(positions, q, k, self.cos_sin_cache, self.head_dim)
            return q, k
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        half = self.head_dim // 2
        cos = cos_sin[:, None, :half]
        sin = cos_sin[:, None, half:]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}, base={self.base}, type={self.rope_type}"


def get_rope(arch: Any, head_dim: Optional[int] = None, device: Optional[torch.device] = None,
             max_position: Optional[int] = None, layer: Optional[int] = None) -> RotaryEmbedding:
    """The rotary embedding of an ArchConfig (pagellm/arch_config.py): its full layers', or `layer`'s (Gemma 3's
    sliding layers have their own base); an M-RoPE one (layers/mrope.py) when the config has an mrope_section."""
    theta, scaling = arch.layer_rope(layer) if layer is not None else (arch.rope_theta, dict(arch.rope_scaling))
    if arch.partial_rotary_factor != 1.0:
        raise NotImplementedError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if getattr(arch, "mrope_section", None):
        from pagellm.model_executor.layers.mrope import MRotaryEmbedding  # (mrope.py builds on this file)

        if scaling["rope_type"] != "default":
            raise NotImplementedError(f"M-RoPE with rope type {scaling['rope_type']!r} is not supported")
        return MRotaryEmbedding(head_dim or arch.head_dim, max_position or arch.max_position, theta,
                                arch.mrope_section, device)
    return RotaryEmbedding(head_dim or arch.head_dim, max_position or arch.max_position, theta, scaling,
                           device=device)
