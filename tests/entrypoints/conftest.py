"""Fixtures of the server tests."""

from __future__ import annotations

import pytest
import torch


def save_tiny_llama(folder: str, max_position_embeddings: int = 512) -> str:
    """A 2-layer random Llama (vocab 4096, so the benchmark workloads' token ids fit) saved as safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=max_position_embeddings,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-served")))
