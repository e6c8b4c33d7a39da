"""One record per architecture: everything the engine must know about a family besides its model file.

Adding a Llama-like family is one model file (a subclass that swaps the blocks that differ) and one `ArchSpec`
in `ARCHITECTURES` below: its HF architecture name and model_type(s), where its class lives (imported only when
a model of that family is built), and its GGUF facts (llama.cpp's architecture name, whether llama.cpp permuted
the q/k rows, tensor names that differ from the common table, a constant llama.cpp added to norm weights).
The loader (loader/source.py, loader/gguf_loader.py) reads these records and nothing else.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str  # HF `architectures[0]`
    module: str  # the model file, under pagellm.model_executor.models
    class_name: str
    model_types: tuple[str, ...]  # HF `model_type`s (the first is the one a GGUF config is built with)
    gguf_arch: Optional[str] = None  # llama.cpp's `general.architecture`; None: no GGUF support
    # llama.cpp's converter interleaves the two rotary halves of each head's q/k rows for llama-arch files.
    gguf_permute_qk: bool = False
    # GGUF per-layer tensor names (without `blk.N.` and `.weight`) that differ from gguf_loader's common table.
    gguf_layer_names: dict[str, str] = field(default_factory=dict)
    # llama.cpp stores Gemma's RMSNorm weights as 1 + w: this is added back to every `*norm.weight` read.
    gguf_norm_offset: float = 0.0
    # The GGUF's `{arch}.attention.sliding_window` is the model's window (llama.cpp attends fully otherwise).
    gguf_sliding_window: bool = False
    # Takes images: the class follows models/interface.py's VisionLanguageModel; its front-end facts are in
    # multimodal/families.py.
    multimodal: bool = False

    def model_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(f"pagellm.model_executor.models.{self.module}"), self.class_name)


_GEMMA3_GGUF_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("LlamaForCausalLM", "llama", "LlamaForCausalLM", ("llama",), "llama", gguf_permute_qk=True),
    ArchSpec("MistralForCausalLM", "llama", "MistralForCausalLM", ("mistral",), gguf_permute_qk=True),
    ArchSpec("Qwen2ForCausalLM", "llama", "Qwen2ForCausalLM", ("qwen2",), "qwen2"),
    ArchSpec("Qwen3ForCausalLM", "qwen3", "Qwen3ForCausalLM", ("qwen3",), "qwen3"),
    ArchSpec("Phi3ForCausalLM", "phi3", "Phi3ForCausalLM", ("phi3",)),
    ArchSpec("Gemma3ForCausalLM", "gemma3", "Gemma3ForCausalLM", ("gemma3_text",), "gemma3",
             gguf_layer_names=_GEMMA3_GGUF_NAMES, gguf_norm_offset=-1.0, gguf_sliding_window=True),
    ArchSpec("MixtralForCausalLM", "mixtral", "MixtralForCausalLM", ("mixtral",)),
    ArchSpec("Qwen2MoeForCausalLM", "qwen_moe", "Qwen2MoeForCausalLM", ("qwen2_moe",)),
    ArchSpec("Qwen3MoeForCausalLM", "qwen_moe", "Qwen3MoeForCausalLM", ("qwen3_moe",)),
    ArchSpec("LlavaForConditionalGeneration", "llava", "LlavaForConditionalGeneration", ("llava",),
             multimodal=True),
    ArchSpec("Qwen2VLForConditionalGeneration", "qwen2_vl", "Qwen2VLForConditionalGeneration", ("qwen2_vl",),
             multimodal=True),
)

_BY_NAME = {spec.name: spec for spec in ARCHITECTURES}
_BY_MODEL_TYPE = {t: spec for spec in ARCHITECTURES for t in spec.model_types}
_BY_GGUF_ARCH = {spec.gguf_arch: spec for spec in ARCHITECTURES if spec.gguf_arch}


def supported_architectures() -> list[str]:
    return sorted(_BY_NAME)


def spec_for(config_or_arch: Any) -> ArchSpec:
    """The record of a config (its architectures[0], else its model_type) or of an architecture name."""
    if isinstance(config_or_arch, str):
        arch = config_or_arch
    else:
        arch = architecture_of(config_or_arch)
    try:
        return _BY_NAME[arch]
    except KeyError:
        raise ValueError(f"model architecture {arch!r} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}") from None


def architecture_of(config: Any) -> str:
    """config.architectures[0], else the architecture of its model_type (configs built in code, GGUFs)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type].name
    raise ValueError(f"the model config names no architecture (model_type {model_type!r}); supported "
                     f"architectures: {', '.join(supported_architectures())}")


def is_multimodal(config: Any) -> bool:
    """Whether the config's architecture takes images (False for one the registry does not know)."""
    try:
        return spec_for(config).multimodal
    except ValueError:
        return False


def spec_for_gguf(gguf_arch: str) -> ArchSpec:
    """The record of a GGUF file's `general.architecture`."""
    try:
        return _BY_GGUF_ARCH[gguf_arch]
    except KeyError:
        raise ValueError(f"GGUF architecture {gguf_arch!r} is not supported (supported: "
                         f"{', '.join(sorted(_BY_GGUF_ARCH))})") from None


def get_model_class(config_or_arch: Any) -> type[nn.Module]:
    """The class for a config (its architectures[0], else its model_type) or for an architecture name."""
    return spec_for(config_or_arch).model_class()
