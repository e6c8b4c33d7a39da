"""The interface every model class follows: what the model runner, the loader and the pipeline stages call.

Constructor: `cls(config, dtype=None, device=None, quant_config=None)`, with `config` the transformers config
(the class reads its facts through pagellm.arch_config.ArchConfig); parameters are built uninitialized on the
device in `dtype` and filled by `load_weights`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, runtime_checkable

import torch

from pagellm.attention import AttentionMetadata
from pagellm.model_executor.models.utils import IntermediateTensors


@runtime_checkable
class CausalLM(Protocol):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate: Optional[IntermediateTensors] = None,
                ) -> torch.Tensor | IntermediateTensors:
        """input_ids, positions [T]; one paged KV cache per layer of this pipeline stage. Returns the final
        hidden states [T, H] (after the final norm), or, on a stage that is not last, IntermediateTensors."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, vocab] in float32 (soft-capped where the family does)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into the parameters; returns the names of the parameters filled."""
        ...


@runtime_checkable
class VisionLanguageModel(CausalLM, Protocol):
    """A model that takes images (registry record multimodal=True; its front-end facts in multimodal/families.py).
    `forward` also takes `inputs_embeds` [T, H] instead of input_ids on steps that hold image tokens."""

    def get_image_embeddings(self, **tensors: torch.Tensor) -> torch.Tensor:
        """The image processor's outputs of several images, concatenated (families.py names them) -> the rows
        of their image tokens [sum of the images' token counts, H], images in order."""
        ...

    def embed_input_ids(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [T] -> [T, H], the image tokens' rows replaced by image_embeds (one row each, in order)."""
        ...

    # An M-RoPE model (Qwen2-VL) adds mrope_positions(prompt_token_ids, image_grid_thw) -> ([3, P], delta) and
    # takes positions [3, T] on steps with image tokens (worker/mm_embeds.py).



class ImageTokenLM(torch.nn.Module):
    """Base of a VisionLanguageModel whose text side is one of our causal LMs (`self.language_model`) and whose
    images fill the rows of `self.image_token_id` tokens: the three methods such a model only hands on."""

    language_model: torch.nn.Module
    image_token_id: int

    def embed_input_ids(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings [T, H], the image tokens' rows replaced by image_embeds in order (a prefill chunk
        passes the rows of the image tokens it holds). The front end refuses a prompt whose image tokens lack
        their images (engine/processor.py), so a count that differs here (image tokens without rows included) is
        a ValueError."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        n = int(is_image.sum())
        rows = 0 if image_embeds is None else image_embeds.shape[0]
        if rows != n:
            raise ValueError(f"input_ids hold {n} image tokens but {rows} image embedding rows were given")
        if n:
            embeds[is_image] = image_embeds.to(embeds.dtype)
        return embeds

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate: Optional[IntermediateTensors] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor | IntermediateTensors:
        """positions [T] ([3, T] for M-RoPE on steps with image tokens); inputs_embeds [T, H] when the step holds
        image tokens."""
        return self.language_model.model(input_ids, positions, kv_caches, attn_metadata, intermediate,
                                         inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
