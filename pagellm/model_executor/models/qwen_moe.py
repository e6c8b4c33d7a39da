"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 attention (q/k/v bias; per-head q/k norm) with sparse MoE
blocks on the layers the config makes sparse (every `decoder_sparse_step`-th, except `mlp_only_layers`, which
keep a dense MLP of `intermediate_size`). Routing renormalizes the top-k weights when `norm_topk_prob`.
Qwen2-MoE adds a shared expert to every MoE block, gated by sigmoid(shared_expert_gate(x)).

Same constructor convention and interface as models/llama.py.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.models.llama import dense_mlp
from pagellm.model_executor.models.moe_common import MoEForCausalLM, SparseMoeBlock, is_sparse_layer


def qwen2_moe_mlp(config: Any, layer_idx: int, dtype=None, device=None,
                  quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return dense_mlp(config, layer_idx, dtype, device, quant_config, prefix)
    return SparseMoeBlock(config, dtype, device, quant_config, prefix, shared_expert=True)


def qwen3_moe_mlp(config: Any, layer_idx: int, dtype=None, device=None,
                  quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return dense_mlp(config, layer_idx, dtype, device, quant_config, prefix)
    return SparseMoeBlock(config, dtype, device, quant_config, prefix)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    make_mlp = staticmethod(qwen2_moe_mlp)

    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        return bool(getattr(config, "qkv_bias", True)), False


class Qwen3MoeForCausalLM(MoEForCausalLM):
    qk_norm = True
    make_mlp = staticmethod(qwen3_moe_mlp)
