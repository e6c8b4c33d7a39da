"""Gemma 3 (text, `Gemma3ForCausalLM`): the Llama stack with Gemma's blocks swapped in.

What differs from Llama, each in one place:
- RMSNorm scales by (1 + w) (layers/norm.py GemmaRMSNorm), also on the per-head q/k norms;
- four norms per layer: input, post-attention, pre-feedforward, post-feedforward (the sub-blocks' outputs are
  normed before they join the residual);
- embeddings are multiplied by sqrt(hidden_size) (in the model dtype, as transformers does);
- the softmax scale is query_pre_attn_scalar ** -0.5, and the MLP's activation is gelu (tanh);
- layers alternate sliding-window (local rope base) and global attention (ArchConfig.layer_types);
- logits are soft-capped, tanh(x / cap) * cap, when the config sets final_logit_softcapping.
Attention-logit soft-capping (Gemma 2) is refused: no Gemma 3 config sets it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagellm.arch_config import ArchConfig
from pagellm.attention import AttentionMetadata
from pagellm.model_executor.layers.norm import GemmaRMSNorm
from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.layers.rotary import RotaryEmbedding
from pagellm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, dtype=None, device=None,
                 rotary_emb: Optional[RotaryEmbedding] = None, quant_config: Optional[QuantizationConfig] = None,
                 prefix: str = "", attention_bias: bool = False) -> None:
        super().__init__()
        scale = float(arch.query_pre_attn_scalar or arch.head_dim) ** -0.5
        self.self_attn = LlamaAttention(arch, layer, attention_bias, attention_bias, True, dtype, device, rotary_emb,
                                        quant_config, f"{prefix}.self_attn", norm_cls=GemmaRMSNorm, scale=scale)
        self.mlp = LlamaMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act, False, dtype, device,
                            quant_config, f"{prefix}.mlp")
        norm = lambda: GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Same (hidden, residual) contract as LlamaDecoderLayer: the returned hidden is not yet added to the
        residual (the next layer's input norm, or the final norm, adds it)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        return self.post_feedforward_layernorm(hidden), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None,
                 quant_config: Optional[QuantizationConfig] = None) -> None:
        if getattr(config, "attn_logit_softcapping", None):
            raise NotImplementedError("attention-logit soft-capping (attn_logit_softcapping) is not supported")
        super().__init__(config, dtype, device, quant_config)
        self.final_logit_softcapping = self.arch.final_logit_softcapping

    def build_model(self, arch: ArchConfig, dtype, device, quant_config, need_embedding: bool) -> nn.Module:
        bias = bool(getattr(self.config, "attention_bias", False))

        def make_layer(i: int, rotary_emb: RotaryEmbedding, prefix: str) -> nn.Module:
            return Gemma3DecoderLayer(arch, i, dtype, device, rotary_emb, quant_config, prefix, bias)

        model = LlamaModel(arch, make_layer, dtype, device, need_embedding, norm_cls=GemmaRMSNorm)
        model.embed_scale = arch.hidden_size**0.5
        return model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping:
            cap = float(self.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return logits
