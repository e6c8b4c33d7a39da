"""config.architectures[0] -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagellm.model_executor.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from pagellm.model_executor.models.mixtral import MixtralForCausalLM
from pagellm.model_executor.models.qwen3 import Qwen3ForCausalLM
from pagellm.model_executor.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}

# For configs without `architectures` (built in code, or some GGUF conversions).
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def architecture_of(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(f"the model config names no architecture (model_type {model_type!r}); supported "
                     f"architectures: {', '.join(supported_architectures())}")


def get_model_class(config_or_arch: Any) -> type[nn.Module]:
    """The class for a config (its architectures[0], else its model_type) or for an architecture name."""
    arch = config_or_arch if isinstance(config_or_arch, str) else architecture_of(config_or_arch)
    try:
        return MODEL_REGISTRY[arch]
    except KeyError:
        raise ValueError(f"model architecture {arch!r} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}") from None
