"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a 2-layer GELU projector, pagellm's Llama.

An image's embeddings are the projected hidden states of the vision tower's `vision_feature_layer` (-2 for
LLaVA-1.5), without the class token under the "default" select strategy: one row per patch, one placeholder
token each in the prompt. The model runner calls `get_image_embeddings` when a step first reaches an
image's placeholder span and `embed_input_ids` to place its rows (worker/mm_embeds.py); the front end's facts
(placeholder, token counts) are in multimodal/families.py; everything else is the Llama of models/llama.py, paged
KV cache included.

Checkpoint names: llava-hf's (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`) and transformers 5's (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagellm.model_executor.layers.linear import materialize
from pagellm.model_executor.models.clip_vision import CLIPVisionTower, activation
from pagellm.model_executor.models.interface import ImageTokenLM
from pagellm.model_executor.models.llama import LlamaForCausalLM
from pagellm.multimodal.families import image_family


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool, dtype=None, device=None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias, dtype=dtype, device=device)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _feature_layer(config: Any) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only one layer (an integer) is supported")
    return layer


class LlavaForConditionalGeneration(ImageTokenLM):
    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None,
                 quant_config: Any = None) -> None:
        super().__init__()
        self.config = config
        dtype = dtype or torch.get_default_dtype()
        vc, tc = config.vision_config, config.text_config
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                             "supported (default, full)")
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.image_token_id = image_family("LlavaForConditionalGeneration").token_id(config)
        self.vision_tower = CLIPVisionTower(vc, _feature_layer(config), dtype, device)
        self.multi_modal_projector = LlavaProjector(vc.hidden_size, tc.hidden_size, config.projector_hidden_act,
                                                    bool(getattr(config, "multimodal_projector_bias", True)),
                                                    dtype, device)
        # The language model reads the text config (quantization applies to it alone).
        self.language_model = LlamaForCausalLM(tc, dtype, device, quant_config)
        self.arch = self.language_model.arch
        self.model = self.language_model.model  # the decoder stack, where the runner's helpers look for it

    # ---- what the model runner calls ---------------------------------------------------------------------
    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_images, 3, H, W] -> their image-token rows [n_images * tokens, hidden], in order."""
        hidden = self.vision_tower(pixel_values.to(self.vision_tower.pre_layrnorm.weight.device))
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return self.multi_modal_projector(hidden).flatten(0, 1)

    # ---- weights ----------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        num_layers = len(self.vision_tower.encoder.layers)

        def text_weights():
            for name, tensor in weights:
                kind, rest = _route(name)
                if kind == "text":
                    yield rest, tensor
                    continue
                if kind == "vision":
                    m = re.match(r"encoder\.layers\.(\d+)\.", rest)
                    if rest.startswith("post_layernorm.") or (m and int(m.group(1)) >= num_layers):
                        continue  # past the selected layer: never computed
                    target = f"vision_tower.{rest}"
                else:
                    target = f"multi_modal_projector.{rest}"
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter ({target})")
                param.data.copy_(materialize(tensor))
                loaded.add(target)

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(text_weights())}
        return loaded

    def required_params(self) -> dict[str, set[str]]:
        return {name: {name} for name, _ in self.named_parameters()}


def _route(name: str) -> tuple[str, str]:
    """A checkpoint name -> ("text" | "vision" | "projector", the name inside that part)."""
    name = name.removeprefix("model.") if not name.startswith("model.layers.") else name
    if name.startswith("vision_tower."):
        return "vision", name.removeprefix("vision_tower.").removeprefix("vision_model.")
    if name.startswith("multi_modal_projector."):
        return "projector", name.removeprefix("multi_modal_projector.")
    if name.startswith("language_model.model.") or name.startswith("language_model.lm_head."):
        return "text", name.removeprefix("language_model.")
    if name.startswith("language_model."):  # transformers 5: model.language_model.layers... (the decoder)
        return "text", "model." + name.removeprefix("language_model.")
    return "text", name  # lm_head.weight
