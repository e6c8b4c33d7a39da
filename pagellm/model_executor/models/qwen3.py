"""Qwen3: the Llama layer stack with an RMSNorm over each head of q and k (on head_dim, before RoPE), no qkv bias
(unless `attention_bias`), and an explicit head_dim that need not be hidden_size / num_heads.

Same constructor convention and interface as models/llama.py.
"""

from __future__ import annotations

from pagellm.model_executor.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
