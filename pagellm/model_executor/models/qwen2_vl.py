"""Qwen2-VL: the vision tower (qwen2_vl_vision.py) and Qwen2's decoder with M-RoPE (layers/mrope.py).

The language side is pagellm's Qwen2 (llama.py) unchanged: the ArchConfig of a Qwen2-VL config carries its
mrope_section, so rotary.get_rope gives every layer M-RoPE and `positions` may be [3, T] (temporal, height, width
rows; mrope_positions gives a prompt's) or [T] for plain text. The runner's part (worker/mm_embeds.py), not this
file's: compute image embeddings with `get_image_embeddings`, put them at the prompt's image tokens with
`embed_input_ids`, and pass the result as `inputs_embeds` with [3, T] positions; later tokens sit at index + delta
in all three rows (mrope_decode_positions).

Config: transformers' Qwen2VLConfig, read through ArchConfig (text facts in `text_config` in transformers 5, at
the top level in older configs; `tie_word_embeddings` at the top level). Checkpoint names: original Qwen2-VL
(`visual.*`, `model.*`, `lm_head.*`) and transformers 5 (`model.visual.*`, `model.language_model.*`, `lm_head.*`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from pagellm.model_executor.layers.mrope import MRotaryEmbedding, mrope_positions
from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.models.interface import ImageTokenLM
from pagellm.model_executor.models.llama import Qwen2ForCausalLM
from pagellm.model_executor.models.qwen2_vl_vision import VISION_PREFIXES, Qwen2VisionTransformer


class Qwen2VLForConditionalGeneration(ImageTokenLM):
    """The tower (`visual`) and the language model (`language_model`); same constructor as every model class."""

    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None,
                 quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        dtype = dtype or torch.get_default_dtype()
        self.image_token_id = int(config.image_token_id)
        self.vision_start_token_id = int(config.vision_start_token_id)
        self.spatial_merge_size = int(config.vision_config.spatial_merge_size)
        # The tower stays unquantized: checkpoints quantize only the language model.
        self.visual = Qwen2VisionTransformer(config.vision_config, dtype, device)
        # Qwen2 with M-RoPE: its ArchConfig reads the text facts and the mrope_section from this config.
        self.language_model = Qwen2ForCausalLM(config, dtype, device, quant_config)
        self.arch = self.language_model.arch
        self.model = self.language_model.model  # the decoder stack, where the runner's helpers look for it

    @property
    def rotary_emb(self) -> MRotaryEmbedding:
        return self.language_model.model.rotary_emb

    # ---- inputs ------------------------------------------------------------------------------------------
    def mrope_positions(self, input_ids, image_grid_thw) -> tuple[torch.Tensor, int]:
        """A prompt's [3, T] positions and delta, with this model's token ids and merge size."""
        return mrope_positions(input_ids, image_grid_thw, self.spatial_merge_size, self.image_token_id,
                               self.vision_start_token_id)

    def get_image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N_patches, C*T*P*P], image_grid_thw [n_images, 3] -> [sum(t*h*w/m^2), hidden], the rows
        of the prompt's image tokens, images in order (see qwen2_vl_vision.image_token_counts)."""
        return self.visual(pixel_values, image_grid_thw)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named checkpoint tensors (either layout) -> parameters; returns our parameter names filled. A tower
        tensor is copied as it streams past: a lazy checkpoint tensor can be read only while its file is open."""
        vision: set[str] = set()

        def text_weights():
            for name, tensor in weights:
                if name.startswith(VISION_PREFIXES):
                    vision.update(self.visual.load_weights([(name, tensor)]))
                elif name.startswith("model.language_model."):
                    yield "model." + name[len("model.language_model."):], tensor
                else:
                    yield name, tensor

        loaded = {"language_model." + n for n in self.language_model.load_weights(text_weights())}
        return loaded | {"visual." + n for n in vision}

    def required_params(self) -> dict[str, set[str]]:
        """Our parameter name -> the checkpoint names that fill it (original layout), for error messages."""
        out = {"language_model." + k: v for k, v in self.language_model.required_params().items()}
        out.update({"visual." + n: {"visual." + n} for n, _ in self.visual.named_parameters()})
        return out
