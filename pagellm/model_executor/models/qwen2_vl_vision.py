"""Qwen2-VL's vision tower: image patches -> embeddings in the language model's hidden size.

Input, as transformers' Qwen2-VL image processor gives it: `pixel_values` [N_patches, C*T*P*P], one row per
patch (T = temporal_patch_size frames of a P x P patch; a still image is repeated T times), the patches of each
image in "block-major" order (every spatial_merge_size x spatial_merge_size block of neighbours together), and
`image_grid_thw` [n_images, 3], each image's (t, h, w) in patches. Output: [sum(t*h*w / m^2), hidden], one row
per image token of the prompt, images in order (each block of m x m patches is merged into one token).

Layers: a patch embedding (a Conv3d whose stride is its kernel, so a matrix product over the flattened rows),
then `depth` pre-LayerNorm blocks whose attention sees only the patches of the same frame of the same image and
rotates q/k by the patch's (row, column) (2-D rotary: half the frequencies from the row, half from the column),
then the patch merger (LayerNorm, m*m neighbours concatenated, two-layer GELU MLP).

The tower is small next to the language model (~0.6B of Qwen2-VL-7B's 8B) and runs once per image: it is plain
torch (nn.Linear; scaled_dot_product_attention, one call per run of equal-size frames), replicated on every
tensor-parallel rank.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from pagellm.model_executor.layers.linear import copy_weight, materialize
from pagellm.model_executor.layers.rotary import rotate_neox

logger = logging.getLogger(__name__)

# Checkpoint prefixes of the tower: original Qwen2-VL checkpoints, and transformers 5's layout.
VISION_PREFIXES = ("model.visual.", "visual.")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def image_token_counts(image_grid_thw: torch.Tensor | Sequence, spatial_merge_size: int) -> list[int]:
    """Image tokens (tower output rows) of each image: t * h * w / m^2."""
    grids = image_grid_thw.tolist() if isinstance(image_grid_thw, torch.Tensor) else list(image_grid_thw)
    return [int(t) * int(h) * int(w) // spatial_merge_size**2 for t, h, w in grids]


def _uninitialized(cls: type[nn.Module], *args, dtype=None, device=None, **kwargs) -> nn.Module:
    """A `cls` module whose weights the loader fills (never initialized first)."""
    device = device if device is not None else torch.get_default_device()
    return skip_init(cls, *args, dtype=dtype, device=device, **kwargs)


def _linear(in_features: int, out_features: int, bias: bool, dtype, device) -> nn.Linear:
    return _uninitialized(nn.Linear, in_features, out_features, bias=bias, dtype=dtype, device=device)


class VisionRotary2D(nn.Module):
    """cos/sin [N, head_dim/2] of each patch from its (row, column): the first half of the frequencies turn with
    the row, the second half (the same frequencies) with the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        dim = head_dim // 2
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [head_dim/4]

    def forward(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows_cols [N, 2] -> (cos, sin), each [N, head_dim/2] float32."""
        angles = rows_cols.float()[:, :, None] * self.inv_freq.to(rows_cols.device)  # [N, 2, head_dim/4]
        angles = angles.flatten(1)
        return angles.cos(), angles.sin()


def patch_rows_cols(image_grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """[N_patches, 2] (row, column) of every patch, in the processor's block-major order, frames repeated."""
    out = []
    m = spatial_merge_size
    for t, h, w in image_grid_thw.tolist():
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        # block-major: (block row, block col, row in block, col in block)
        rc = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out).to(image_grid_thw.device)


def attention_runs(image_grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """The attention segments (one per frame of each image, t * (h*w) rows each) as runs of equal-length
    neighbours: (first row, number of segments, segment length). A run is one batched attention call."""
    runs: list[tuple[int, int, int]] = []
    row = 0
    for t, h, w in image_grid_thw.tolist():
        if runs and runs[-1][2] == h * w:  # the same frame size as the image before: join its run
            runs[-1] = (runs[-1][0], runs[-1][1] + t, h * w)
        else:
            runs.append((row, t, h * w))
        row += t * h * w
    return runs


class VisionAttention(nn.Module):
    """Full (non-causal) attention within each segment (one frame of one image), segments of equal length
    batched (`runs` from attention_runs)."""

    def __init__(self, dim: int, num_heads: int, dtype=None, device=None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = _linear(dim, 3 * dim, True, dtype, device)
        self.proj = _linear(dim, dim, True, dtype, device)

    def forward(self, x: torch.Tensor, runs: list[tuple[int, int, int]], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)
        out = torch.empty_like(q)
        for start, count, length in runs:
            end = start + count * length
            # [count, H, L, D]: each segment attends within itself
            seg = [t[start:end].view(count, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*seg).transpose(1, 2).reshape(end - start, self.num_heads,
                                                                                           self.head_dim)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act, dtype=None, device=None) -> None:
        super().__init__()
        self.fc1 = _linear(dim, hidden, True, dtype, device)
        self.fc2 = _linear(hidden, dim, True, dtype, device)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str, dtype=None, device=None) -> None:
        super().__init__()
        if act not in _ACTS:
            raise NotImplementedError(f"vision hidden_act {act!r} is not supported (supported: {', '.join(_ACTS)})")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, dtype=dtype, device=device)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, dtype=dtype, device=device)
        self.attn = VisionAttention(dim, num_heads, dtype, device)
        self.mlp = VisionMLP(dim, mlp_hidden, _ACTS[act], dtype, device)

    def forward(self, x: torch.Tensor, runs: list[tuple[int, int, int]], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), runs, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm each patch, concatenate each m x m block (adjacent rows in block-major order), MLP to `out_dim`."""

    def __init__(self, out_dim: int, dim: int, merge: int, dtype=None, device=None) -> None:
        super().__init__()
        self.in_dim = dim * merge**2
        self.ln_q = nn.LayerNorm(dim, eps=1e-6, dtype=dtype, device=device)
        self.mlp = nn.Sequential(_linear(self.in_dim, self.in_dim, True, dtype, device), nn.GELU(),
                                 _linear(self.in_dim, out_dim, True, dtype, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.in_dim))


class PatchEmbed(nn.Module):
    """A Conv3d of stride = kernel over rows that each hold one whole kernel window: a matrix product with the
    flattened kernel. `proj.weight` is the checkpoint's [embed_dim, C, T, P, P]."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, embed_dim: int,
                 dtype=None, device=None) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.embed_dim = embed_dim
        self.proj = _uninitialized(nn.Conv3d, in_channels, embed_dim, kernel, stride=kernel, bias=False,
                                   dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(self.embed_dim, -1))


class Qwen2VisionTransformer(nn.Module):
    """forward(pixel_values [N_patches, C*T*P*P], image_grid_thw [n_images, 3]) -> [sum(t*h*w/m^2), hidden].

    `vision_config`: transformers' Qwen2VLVisionConfig (the `vision_config` of a Qwen2-VL config)."""

    def __init__(self, vision_config: Any, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        c = vision_config
        dtype = dtype or torch.get_default_dtype()
        self.embed_dim = int(c.embed_dim)
        self.spatial_merge_size = int(c.spatial_merge_size)
        self.in_channels, self.patch_size = int(c.in_channels), int(c.patch_size)
        self.temporal_patch_size = int(c.temporal_patch_size)
        self.patch_dim = self.in_channels * self.temporal_patch_size * self.patch_size**2
        self.patch_embed = PatchEmbed(self.in_channels, self.temporal_patch_size, self.patch_size, self.embed_dim,
                                      dtype, device)
        heads = int(c.num_heads)
        rope = getattr(c, "rope_parameters", None) or {}
        self.rotary = VisionRotary2D(self.embed_dim // heads, float(rope.get("rope_theta", 10000.0)))
        mlp_hidden = int(self.embed_dim * c.mlp_ratio)
        self.blocks = nn.ModuleList(VisionBlock(self.embed_dim, heads, mlp_hidden, c.hidden_act, dtype, device)
                                    for _ in range(int(c.depth)))
        self.merger = PatchMerger(int(c.hidden_size), self.embed_dim, self.spatial_merge_size, dtype, device)
        self.requires_grad_(False)  # inference only

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        grid = torch.as_tensor(image_grid_thw, dtype=torch.int64)
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be [n_images, 3], got {tuple(grid.shape)}")
        frames = grid[:, 1] * grid[:, 2]
        n_patches = int((grid[:, 0] * frames).sum())
        if tuple(pixel_values.shape) != (n_patches, self.patch_dim):
            raise ValueError(f"pixel_values must be [{n_patches}, {self.patch_dim}] for image_grid_thw "
                             f"{grid.tolist()}, got {tuple(pixel_values.shape)}")
        m = self.spatial_merge_size
        if bool(((grid[:, 1] % m) != 0).any() or ((grid[:, 2] % m) != 0).any()):
            raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size {m}")
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(patch_rows_cols(grid, m).to(x.device))
        cos, sin = cos[:, None, :], sin[:, None, :]
        runs = attention_runs(grid)
        for block in self.blocks:
            x = block(x, runs, cos, sin)
        return self.merger(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors named `visual.*` or `model.visual.*` (or already relative to the tower) into
        the parameters; returns the names (relative to the tower) of the parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            target = self.param_name(name)
            param = params.get(target)
            if param is None:
                unknown.append(name)
                continue
            try:
                copy_weight(param.data, materialize(tensor))
            except ValueError as e:
                raise ValueError(f"loading checkpoint tensor {name!r} into {target!r}: {e}") from None
            loaded.add(target)
        if unknown:
            logger.warning("vision checkpoint tensors with no matching parameter were skipped: %s",
                           ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else ""))
        return loaded

    @classmethod
    def param_name(cls, checkpoint_name: str) -> str:
        """Our parameter name of a checkpoint tensor of the tower."""
        name = checkpoint_name
        for prefix in VISION_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        return name
