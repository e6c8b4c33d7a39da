"""Which implementation runs a model: pagellm's own file for its architecture, or the transformers fallback.

`model_impl` (vLLM's option name): "auto" takes pagellm's file when the registry has one, else the fallback;
"pagellm" insists on ours (an unknown architecture is an error); "transformers" forces the fallback.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagellm.model_executor.models.registry import get_model_class

MODEL_IMPLS = ("auto", "pagellm", "transformers")


def resolve_model_impl(config: Any, model_impl: str = "auto") -> str:
    """"pagellm" or "transformers" for this config; ValueError naming the option when neither can serve it."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}; got {model_impl!r}")
    if model_impl == "transformers":
        _check_transformers_can_build(config)
        return "transformers"
    try:
        get_model_class(config)
        return "pagellm"
    except ValueError as e:
        if model_impl == "pagellm":
            raise ValueError(f"model_impl='pagellm': {e}") from None
    _check_transformers_can_build(config)
    return "transformers"


def model_class_for(config: Any, model_impl: str = "auto") -> type[nn.Module]:
    """The class that builds the model, by `resolve_model_impl`."""
    if resolve_model_impl(config, model_impl) == "transformers":
        from pagellm.model_executor.models.transformers_fallback import TransformersForCausalLM

        return TransformersForCausalLM
    return get_model_class(config)


def _check_transformers_can_build(config: Any) -> None:
    """The fallback serves decoder-only models that transformers maps to a CausalLM class."""
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model type {model_type!r} is an encoder-decoder: neither pagellm nor its transformers "
                         "fallback (decoder-only models) serves it")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"model type {model_type!r} soft-caps its attention logits, which pagellm's attention "
                         "does not implement: the transformers fallback cannot serve it")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        archs = getattr(config, "architectures", None) or [model_type]
        raise ValueError(f"model architecture {archs[0]!r} is not supported: pagellm has no file for it and "
                         f"transformers has no causal-LM class for model type {model_type!r}")
