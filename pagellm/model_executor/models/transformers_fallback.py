"""The transformers fallback: a decoder-only architecture pagellm has no file for runs through transformers' own
modules, with pagellm's paged attention plugged in through transformers' attention interface.

How it fits (the shape vLLM's transformers backend has; the code is ours):
- `AttentionInterface.register("pagellm", ...)` adds our attention function to transformers' table; the model is
  built with `attn_implementation="pagellm"`, so every attention layer calls it with q/k/v [1, heads, T, D]
  after its own projections, norms and rotary embedding. transformers builds no mask for an implementation it
  does not know: causality and the request boundaries come from our AttentionMetadata.
- The engine's flat ragged batch (input_ids [T], positions [T]) goes through the decoder as a batch of one
  (1 x T); each token's position is its own, so rotary or learned positions are right per request. Only the
  attention mixes tokens, and ours mixes only tokens of one request.
- The step's KV caches and metadata reach the attention function through a small holder the model shares with
  every attention layer (`_StepState`), read there by `module.layer_idx`: nothing is global, and it does not
  depend on a modeling file passing its **kwargs through.
- Weights load by the model's own state-dict names (a `save_pretrained` checkpoint's names).

Limits (refused with a clear error): tensor/pipeline parallelism, quantized weights, attention logit
soft-capping and attention sinks. The runner runs this model eagerly (no CUDA graphs: EngineArgs forces
enforce_eager); its speed is transformers' layers' speed, the point is coverage.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagellm.attention import Attention, AttentionMetadata
from pagellm.attention.backends import get_attention_backend
from pagellm.attention.fp8_kv import load_kv_scale
from pagellm.model_executor.layers.linear import materialize

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "pagellm"

# Attention options of some transformers models that our backends do not implement.
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux")


class _StepState:
    """What the attention function needs of the current step: set by forward, read per layer."""

    def __init__(self) -> None:
        self.kv_caches: Optional[list[torch.Tensor]] = None
        self.meta: Optional[AttentionMetadata] = None


def pagellm_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, Hq, T, D], key/value [1, Hk, T, D] -> ([1, T, Hq, D], None).

    Writes this step's K/V into layer `module.layer_idx`'s paged cache and attends over each request's blocks
    with the device's backend (torch reference on the CPU, Triton on CUDA).
    """
    state: Optional[_StepState] = getattr(module, "_pagellm_step", None)
    if state is None or state.meta is None:
        raise RuntimeError("pagellm attention called outside a TransformersForCausalLM step")
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"the transformers fallback does not implement attention option {name!r} "
                             f"({type(module).__name__})")
    layer: Attention = module._pagellm_attn
    if query.shape[0] != 1:
        raise ValueError(f"the transformers fallback runs one flat batch (batch 1), got batch {query.shape[0]}")
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    scale = layer.scale if scaling is None else float(scaling)
    backend = get_attention_backend(q.device)
    out = backend.forward(q, k, v, state.kv_caches[module.layer_idx], state.meta, scale, layer.k_scale,
                          layer.v_scale)
    return out[None], None


def register_attention() -> None:
    """Add our function to transformers' attention table (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, pagellm_attention_forward)


def _scaled_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """What some CausalLM heads do after the projection (their forward is not run here): Cohere's
    `logit_scale`, Granite's `logits_scaling`, Gemma-style `final_logit_softcapping`."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _no_init():
    """Skip transformers' random init: the loader fills every weight."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


class TransformersForCausalLM(nn.Module):
    """pagellm's model interface around any transformers decoder-only CausalLM.

    forward(input_ids [T], positions [T], kv_caches, attn_metadata) -> hidden [T, H] (after the final norm);
    compute_logits(hidden [N, H]) -> float32 logits; load_weights((name, tensor)...) -> names loaded.
    """

    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None, quant_config: Any = None) -> None:
        super().__init__()
        from pagellm.distributed.parallel_state import get_pp_group, get_tp_group
        from transformers import AutoModelForCausalLM

        if get_tp_group().world_size > 1 or get_pp_group().world_size > 1:
            raise ValueError("the transformers fallback runs on one device: tensor_parallel_size and "
                             "pipeline_parallel_size must be 1")
        if quant_config is not None:
            raise ValueError("the transformers fallback runs float weights only (no quantization)")
        register_attention()
        self.config = config
        dtype = dtype or torch.get_default_dtype()
        hf_config = copy.deepcopy(config)  # from_config writes the attention choice into the config it gets
        with torch.device(device or "cpu"), _no_init():
            self.hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION,
                                                       dtype=dtype)
        self.hf.tie_weights()  # skipped with the init: ties the head to the embedding where the config says so
        self.hf.eval()
        # Views into self.hf, kept out of the module tree so that every parameter has one name ("hf." + HF's).
        object.__setattr__(self, "_decoder", self.hf.base_model)
        object.__setattr__(self, "_lm_head", self.hf.get_output_embeddings())
        self.tie_word_embeddings = self._lm_head.weight is self.hf.get_input_embeddings().weight
        self._step = _StepState()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        # The FP8 KV-cache scale buffers by the names load_kv_scale gives a checkpoint's scales
        # ("<attention module>.attn.k_scale", as in pagellm's own models).
        self._kv_scales: dict[str, torch.Tensor] = {}
        for path, module in self.hf.named_modules():
            if type(module).__name__.endswith("Attention") and getattr(module, "layer_idx", None) is not None:
                # An attention layer: it gets the step holder and its own scale buffers (FP8 KV caches).
                scale = float(getattr(module, "scaling", head_dim**-0.5))
                module._pagellm_attn = Attention(num_heads, head_dim, num_kv_heads, scale, device)
                object.__setattr__(module, "_pagellm_step", self._step)
                self._kv_scales[f"{path}.attn.k_scale"] = module._pagellm_attn.k_scale
                self._kv_scales[f"{path}.attn.v_scale"] = module._pagellm_attn.v_scale
        layers = len(self._kv_scales) // 2
        if layers != config.num_hidden_layers:
            raise ValueError(f"the transformers fallback found {layers} attention layers in "
                             f"{type(self.hf).__name__}, expected num_hidden_layers={config.num_hidden_layers}")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate: Any = None) -> torch.Tensor:
        self._step.kv_caches, self._step.meta = kv_caches, attn_metadata
        try:
            out = self._decoder(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            self._step.kv_caches = self._step.meta = None
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _scaled_logits(self.config, self._lm_head(hidden)).float()

    # ---- weights ----------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (the transformers model's state-dict names) into the model; returns our
        parameter names ("hf." + the checkpoint's) that were filled."""
        params = dict(self.hf.named_parameters())
        buffers = dict(self.hf.named_buffers())
        loaded: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if load_kv_scale(self._kv_scales, name, tensor):
                continue  # an FP8 KV-cache scale
            target = params.get(name)
            if target is None:
                target = buffers.get(name)
            if target is None:
                unknown.append(name)
                continue
            tensor = materialize(tensor)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(f"hf.{name}")
        if unknown:
            shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
            logger.warning("checkpoint tensors with no matching parameter were skipped: %s", shown)
        return loaded

    def required_params(self) -> dict[str, set[str]]:
        """Our parameter name -> the checkpoint name that fills it (for error messages)."""
        return {name: {name.removeprefix("hf.")} for name, _ in self.named_parameters()}
