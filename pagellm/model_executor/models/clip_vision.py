"""CLIP's vision transformer (the image encoder of LLaVA-1.5), as plain PyTorch with HF's parameter names.

Patches (a stride-p convolution) plus a class token and learned positions, a pre-norm, then pre-norm encoder
layers (bidirectional attention over the patches, an MLP with quick-GELU). Only the layers up to the one whose
output the caller selects are built: LLaVA reads the second-to-last layer, so the last layer and the
post-norm are never computed (nor loaded).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"vision hidden_act {name!r} is not supported ({', '.join(ACTIVATIONS)})") from None


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: Any, dtype=None, device=None) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size, dtype=dtype, device=device))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False, dtype=dtype, device=device)
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, patches, D]
        if patches.shape[1] + 1 != self.num_positions:
            raise ValueError(f"the image gives {patches.shape[1]} patches; the vision tower was trained on "
                             f"{self.num_positions - 1}")
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config: Any, dtype=None, device=None) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d, dtype=dtype, device=device)
        self.k_proj = nn.Linear(d, d, dtype=dtype, device=device)
        self.v_proj = nn.Linear(d, d, dtype=dtype, device=device)
        self.out_proj = nn.Linear(d, d, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: Any, dtype=None, device=None) -> None:
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any, dtype=None, device=None) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.self_attn = CLIPAttention(config, dtype, device)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.mlp = CLIPMLP(config, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: Any, num_layers: int, dtype=None, device=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, dtype, device) for _ in range(num_layers))


class CLIPVisionTower(nn.Module):
    """pixel_values [B, 3, H, W] -> the hidden states after layer `feature_layer` [B, 1 + patches, D] (HF's
    hidden_states[feature_layer]: 0 is the embeddings after the pre-norm, -1 the last layer's output)."""

    def __init__(self, config: Any, feature_layer: int, dtype=None, device=None) -> None:
        super().__init__()
        total = config.num_hidden_layers
        num_layers = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
        if not 0 <= num_layers <= total:
            raise ValueError(f"vision_feature_layer {feature_layer} is outside the vision tower's {total} layers")
        self.embeddings = CLIPVisionEmbeddings(config, dtype, device)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)
        self.encoder = CLIPEncoder(config, num_layers, dtype, device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.pre_layrnorm.weight.dtype)))
        for layer in self.encoder.layers:
            x = layer(x)
        return x
