"""Model loading: build the architecture's module on the device in the requested dtype, then fill it from
the checkpoint (safetensors folder or GGUF file) or with random weights (load_format="dummy").

    load_model(model_config, device) -> nn.Module in eval mode

Every parameter must come from the checkpoint: a missing one is an error naming it.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

import torch
from torch import nn

from pagellm.model_executor.layers.quantization import get_quant_config
from pagellm.model_executor.loader.source import ModelSource, load_hf_config, resolve_model_source
from pagellm.model_executor.models.model_impl import model_class_for
from pagellm.model_executor.models.transformers_fallback import TransformersForCausalLM

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def resolve_load_format(load_format: str, source: Optional[ModelSource]) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    if load_format == "auto":
        if source is None:
            raise ValueError("load_format='auto' needs a model source")
        return "gguf" if source.kind == "gguf" else "safetensors"
    if load_format == "gguf" and (source is None or source.kind != "gguf"):
        raise ValueError("load_format='gguf' needs a .gguf model")
    if load_format == "safetensors" and (source is None or source.kind != "hf"):
        raise ValueError("load_format='safetensors' needs an HF model folder (config.json + *.safetensors)")
    return load_format


def weights_iterator(source: ModelSource, load_format: str, config) -> Iterable[tuple[str, torch.Tensor]]:
    if load_format == "gguf":
        from pagellm.model_executor.loader.gguf_loader import iterate_gguf_weights

        return iterate_gguf_weights(source.file_path, config)
    from pagellm.distributed.parallel_state import get_pp_group, get_tp_group
    from pagellm.model_executor.loader.safetensors_loader import iterate_safetensors_weights

    # Sharded (TP) or split (PP) models read only their part of each file; a single device reads it all.
    lazy = get_tp_group().world_size > 1 or get_pp_group().world_size > 1
    return iterate_safetensors_weights(source.path, lazy=lazy)


def build_model(config, dtype: torch.dtype, device: torch.device, quant_config=None,
                model_impl: str = "auto") -> nn.Module:
    """The architecture's module with uninitialized weights (no loading): pagellm's own, or the transformers
    fallback (models/model_impl.py says which)."""
    cls = model_class_for(config, model_impl)
    if quant_config is None:
        return cls(config, dtype=dtype, device=device)
    return cls(config, dtype=dtype, device=device, quant_config=quant_config)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer's quant_method turn the loaded tensors into its compute layout (a no-op in float)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


@torch.no_grad()
def load_model(model_config, device: torch.device | str) -> nn.Module:
    device = torch.device(device)
    config = model_config.hf_config
    source = model_config.source
    if config is None:
        source = source or resolve_model_source(model_config.model)
        config = load_hf_config(source)
    load_format = resolve_load_format(model_config.load_format, source if model_config.load_format != "dummy"
                                      else None)
    quant_config = get_quant_config(model_config.quantization, config, load_format)
    start = time.perf_counter()
    model = build_model(config, model_config.dtype, device, quant_config, model_config.model_impl)
    if load_format == "dummy":
        from pagellm.model_executor.loader.dummy_loader import load_dummy_weights

        load_dummy_weights(model, config, model_config.seed)
    else:
        loaded = model.load_weights(weights_iterator(source, load_format, config))
        # A parameter with a default value (GPTQ's trivial g_idx) may be absent.
        missing = [name for name, p in model.named_parameters()
                   if name not in loaded and not getattr(p, "has_default", False)]
        if missing:
            raise ValueError(f"weights missing from the checkpoint {source.file_path}: {_describe(model, missing)}")
    process_weights_after_loading(model)
    model.eval()
    path = "the transformers fallback" if isinstance(model, TransformersForCausalLM) else "pagellm's own model"
    logger.info("loaded %s through %s (%s, %s%s) on %s in %.1fs", architecture_name(config), path, load_format,
                model_config.dtype, f", quantization {quant_config.name}" if quant_config is not None else "",
                device, time.perf_counter() - start)
    return model


def architecture_name(config) -> str:
    archs = getattr(config, "architectures", None) or [getattr(config, "model_type", "?")]
    return archs[0]


def _describe(model: nn.Module, missing: list[str]) -> str:
    """Missing parameter names, each with the checkpoint names that would have filled it when they differ."""
    required = model.required_params() if hasattr(model, "required_params") else {}
    parts = []
    for name in missing[:10]:
        sources = sorted(required.get(name, {name}))
        parts.append(name if sources == [name] else f"{name} (from {', '.join(sources)})")
    if len(missing) > 10:
        parts.append(f"... ({len(missing)} in all)")
    return ", ".join(parts)


__all__ = ["load_model", "build_model", "process_weights_after_loading", "resolve_load_format"]
