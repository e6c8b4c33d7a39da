"""A tiny random Qwen2-VL config and image-bearing prompts, shared by the M-RoPE, vision-tower and model tests."""

from __future__ import annotations

import torch

IMAGE_TOKEN, VISION_START, VISION_END = 250, 251, 252
MERGE = 2


def tiny_qwen2_vl_config(tie_word_embeddings: bool = False):
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, bos_token_id=0, eos_token_id=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=MERGE, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                           video_token_id=253, tie_word_embeddings=tie_word_embeddings)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    return config


def image_prompt(grids: list[tuple[int, int, int]], seed: int = 0, text_lens=None) -> list[int]:
    """Text, then per image [vision-start, image tokens (t*h*w/merge^2), vision-end, text]."""
    g = torch.Generator().manual_seed(seed)
    text_lens = text_lens or [5 + i for i in range(len(grids) + 1)]

    def text(n: int) -> list[int]:
        return torch.randint(2, 240, (n,), generator=g).tolist()

    ids = text(text_lens[0])
    for i, (t, h, w) in enumerate(grids):
        ids += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // MERGE**2) + [VISION_END] + text(text_lens[i + 1])
    return ids


def pixel_values_for(grids: list[tuple[int, int, int]], config, seed: int = 0) -> torch.Tensor:
    """Random pixel rows [sum(t*h*w), C*T*P*P], one row per patch, as the image processor lays them out."""
    v = config.vision_config
    per_patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, per_patch, generator=torch.Generator().manual_seed(seed))


def token_type_kwargs(fn, input_ids: torch.Tensor) -> dict:
    """`mm_token_type_ids` (text 0, image 1) for a transformers call that takes it (newer 5.x releases need it to
    place images; older ones find images by their vision-start token and take no such argument)."""
    import inspect

    if "mm_token_type_ids" in inspect.signature(fn).parameters:
        return {"mm_token_type_ids": (input_ids == IMAGE_TOKEN).int()}
    return {}


def merged_output(out) -> torch.Tensor:
    """The merged image embeddings of transformers' vision tower (a tensor in older releases, `pooler_output`
    of its output in newer ones)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out
