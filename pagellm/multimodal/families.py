"""What the front end must know about a vision family's image tokens, by HF architecture name (no model code is
imported): the placeholder text a chat image part becomes, the token that the processor repeats for each of
the image's rows, which image-processor outputs the vision tower reads, and how many rows an image gives.

The model side (the runner's interface) is the model class's: `get_image_embeddings(**tensors)` on the named
tensors of several images concatenated -> their rows [sum(counts), hidden], images in order, and
`embed_input_ids(input_ids, image_embeds)` placing those rows at the image tokens. An M-RoPE model adds
`mrope_positions(prompt_token_ids, image_grid_thw)` (worker/mm_embeds.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ImageFamily:
    placeholder: str  # the text an image part becomes in a chat message
    token_id: Callable[[Any], int]  # config -> the image token (the placeholder holds it once)
    input_names: tuple[str, ...]  # the image processor's outputs the vision tower reads
    num_tokens: Callable[[Any, dict], int]  # (config, one image's tensors) -> its image tokens


def _llava_tokens(config: Any, tensors: dict) -> int:
    """(image_size / patch_size)^2 patches, plus the class token under the "full" select strategy."""
    vc = config.vision_config
    height, width = tensors["pixel_values"].shape[-2:]
    if height != vc.image_size or width != vc.image_size:
        raise ValueError(f"the image processor gave {height}x{width} pixels; the vision tower takes "
                         f"{vc.image_size}x{vc.image_size}")
    patches = (height // vc.patch_size) * (width // vc.patch_size)
    return patches + (0 if config.vision_feature_select_strategy == "default" else 1)


def _llava_token_id(config: Any) -> int:
    token_id = getattr(config, "image_token_index", None)
    return int(config.image_token_id if token_id is None else token_id)


def _qwen2_vl_tokens(config: Any, tensors: dict) -> int:
    """t * h * w patches (the processor's image_grid_thw), merged spatial_merge_size^2 to one token."""
    t, h, w = (int(v) for v in tensors["image_grid_thw"].reshape(-1))
    return t * h * w // config.vision_config.spatial_merge_size ** 2


FAMILIES: dict[str, ImageFamily] = {
    "LlavaForConditionalGeneration": ImageFamily("<image>", _llava_token_id, ("pixel_values",), _llava_tokens),
    "Qwen2VLForConditionalGeneration": ImageFamily(
        "<|vision_start|><|image_pad|><|vision_end|>", lambda c: int(c.image_token_id),
        ("pixel_values", "image_grid_thw"), _qwen2_vl_tokens),
}


def image_family(architecture: str) -> ImageFamily:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ValueError(f"model: {architecture} is marked multimodal but pagellm/multimodal/families.py does not "
                         "know its image tokens") from None
