"""Images of one prompt -> the prompt's token ids with each image's placeholder expanded into the model's image
tokens, and one MultiModalFeature per image (its processed tensors, span and hash).

The image processor is the model folder's own (transformers' AutoImageProcessor, read from the local folder,
never downloaded). What differs between families (the placeholder text, its token id, how many tokens an image
becomes, which processor outputs the encoder reads) is in multimodal/families.py, for the architectures the
registry marks as multimodal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pagellm.multimodal.families import ImageFamily, image_family
from pagellm.multimodal.inputs import MultiModalFeature, make_feature
from pagellm.multimodal.media import MediaRules, load_image

DEFAULT_IMAGES_PER_PROMPT = 4


def parse_limit_mm_per_prompt(value: Any) -> dict[str, int]:
    """vLLM's --limit-mm-per-prompt: JSON text or a dict like {"image": 2} (ValueError naming the option)."""
    if value is None:
        return {"image": DEFAULT_IMAGES_PER_PROMPT}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError('limit_mm_per_prompt: must be JSON like {"image": 2}') from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError('limit_mm_per_prompt: must be an object like {"image": 2}')
    unknown = sorted(set(value) - {"image"})
    if unknown:
        raise ValueError(f"limit_mm_per_prompt: {unknown[0]!r} is not a modality pagellm reads (image)")
    n = value.get("image", DEFAULT_IMAGES_PER_PROMPT)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"limit_mm_per_prompt: the image limit must be a non-negative integer, got {n!r}")
    return {"image": n}


@dataclass(frozen=True)
class MultiModalConfig:
    """The engine's multimodal options (EngineArgs: limit_mm_per_prompt, allowed_local_media_path,
    allowed_media_domains)."""

    limit_per_prompt: dict
    media: MediaRules


class MultiModalProcessor:
    """Per engine: the model's image processor and the family's facts about image tokens."""

    def __init__(self, family: ImageFamily, hf_config: Any, image_processor: Any, config: MultiModalConfig) -> None:
        self.family = family
        self.hf_config = hf_config
        self.image_processor = image_processor
        self.config = config
        self.placeholder = family.placeholder
        self.image_token_id = family.token_id(hf_config)

    @classmethod
    def for_model(cls, model_config: Any, config: Optional[MultiModalConfig]) -> Optional["MultiModalProcessor"]:
        """The processor of a multimodal model, None for a text-only one."""
        from pagellm.model_executor.models.registry import is_multimodal, spec_for

        if not is_multimodal(model_config.hf_config):
            return None
        spec = spec_for(model_config.hf_config)
        source = model_config.source
        if source is None or source.kind != "hf":
            raise ValueError(f"model: {spec.name} needs an HF model folder with its image processor "
                             "(preprocessor_config.json)")
        from transformers import AutoImageProcessor

        try:
            image_processor = AutoImageProcessor.from_pretrained(source.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"model: cannot load the image processor of {source.path} "
                             f"(preprocessor_config.json): {e}") from None
        return cls(image_family(spec.name), model_config.hf_config, image_processor,
                   config or MultiModalConfig(parse_limit_mm_per_prompt(None), MediaRules()))

    @property
    def max_images(self) -> int:
        return int(self.config.limit_per_prompt.get("image", DEFAULT_IMAGES_PER_PROMPT))

    def load_image(self, url: Any, field: str) -> Any:
        return load_image(url, self.config.media, field)

    def check_count(self, num_images: int, field: str) -> None:
        if num_images > self.max_images:
            raise ValueError(f"{field}: {num_images} images in one prompt, more than this server takes "
                             f"({self.max_images}, --limit-mm-per-prompt)")

    def process(self, prompt_token_ids: Sequence[int], images: Sequence[Any], field: str = "multi_modal_data"
                ) -> tuple[list[int], list[MultiModalFeature]]:
        """(token ids with each placeholder expanded, one feature per image in prompt order)."""
        self.check_count(len(images), field)
        ids = list(prompt_token_ids)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise ValueError(f"{field}: the prompt has {len(slots)} image placeholder(s) ({self.placeholder}) "
                             f"for {len(images)} image(s)")
        out: list[int] = []
        features: list[MultiModalFeature] = []
        prev = 0
        for slot, image in zip(slots, images):
            tensors = self._image_tensors(image, field)
            n = int(self.family.num_tokens(self.hf_config, tensors))
            out.extend(ids[prev:slot])
            features.append(make_feature("image", len(out), n, tensors))
            out.extend([self.image_token_id] * n)
            prev = slot + 1
        out.extend(ids[prev:])
        return out, features

    def _image_tensors(self, image: Any, field: str) -> dict[str, Any]:
        if not hasattr(image, "convert") or not hasattr(image, "size"):
            raise ValueError(f"{field}: an image must be a PIL.Image, got {type(image).__name__}")
        rules = self.config.media
        width, height = image.size
        if width * height > rules.max_image_pixels:
            raise ValueError(f"{field}: the image is {width}x{height} pixels, more than "
                             f"{rules.max_image_pixels:,} in all")
        processed = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        return {name: processed[name] for name in self.family.input_names}


def images_of(multi_modal_data: Any, field: str = "multi_modal_data") -> list[Any]:
    """vLLM's {"image": image | [images]} -> the list of images."""
    if not isinstance(multi_modal_data, dict):
        raise ValueError(f'{field}: must be a dict like {{"image": <PIL.Image or list>}}')
    unknown = sorted(set(multi_modal_data) - {"image"})
    if unknown:
        raise ValueError(f"{field}: {unknown[0]!r} is not a modality pagellm reads (image)")
    images = multi_modal_data.get("image", [])
    return list(images) if isinstance(images, (list, tuple)) else [images]
