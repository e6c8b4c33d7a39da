"""The fixed, seeded workloads of shared/BENCHMARKS.md, so two runs differ only by the engine."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Workload:
    name: str
    model: Optional[str]  # a model path, or None: the embedded model / a dummy model of `shape`
    shape: Optional[dict[str, Any]]  # an HF config for dummy weights
    num_requests: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    dtype: Optional[str]
    load_format: str = "auto"
    images: bool = False  # one random image per request (a vision model's shape: bench/vision.py)


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}

QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
    "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16",
}

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (layer -2, CLS dropped: 576 tokens an image) + Vicuna-7B (Llama-2-7B).
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768},
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False},
}

# Qwen2-VL-7B-Instruct: a 675M-parameter ViT (14 px patches, 2x2 merged into one token) + Qwen2-7B with M-RoPE.
QWEN2_VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "image_token_id": 151655,
    "video_token_id": 151654, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "vision_config": {"model_type": "qwen2_vl", "depth": 32, "embed_dim": 1280, "hidden_size": 3584,
                      "num_heads": 16, "mlp_ratio": 4, "hidden_act": "quick_gelu", "in_channels": 3,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "text_config": {"model_type": "qwen2_vl_text", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu"},
}


WORKLOADS: dict[str, Workload] = {
    "llama8b-mixed": Workload("llama8b-mixed", None, LLAMA_8B, 256, (128, 1024), (64, 512), "bfloat16", "dummy"),
    "qwen06b-nano": Workload("qwen06b-nano", None, QWEN3_06B, 256, (100, 1024), (100, 1024), "bfloat16", "dummy"),
    "qwen3moe-mixed": Workload("qwen3moe-mixed", None, QWEN3_30B_A3B, 256, (128, 1024), (64, 512), "bfloat16",
                               "dummy"),
    "llava7b-image": Workload("llava7b-image", None, LLAVA_15_7B, 128, (32, 256), (64, 256), "bfloat16", "dummy",
                              images=True),
    "qwen2vl-image": Workload("qwen2vl-image", None, QWEN2_VL_7B, 128, (32, 256), (64, 256), "bfloat16", "dummy",
                              images=True),
    "smollm-cpu": Workload("smollm-cpu", None, None, 64, (32, 256), (16, 128), None, "auto"),
}


def make_requests(workload: Workload, vocab_size: int) -> list[BenchRequest]:
    """For each request, in this order: input length, output length, then the prompt's token ids."""
    rng = random.Random(0)
    requests = []
    for _ in range(workload.num_requests):
        in_len = rng.randint(*workload.input_len)
        out_len = rng.randint(*workload.output_len)
        ids = [rng.randrange(1000, vocab_size - 1000) for _ in range(in_len)]
        requests.append(BenchRequest(ids, out_len))
    return requests


def write_dummy_model(shape: dict[str, Any], folder: str) -> str:
    """A folder with only config.json: enough for load_format='dummy' (and for the transformers peer)."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape, f)
    return folder
