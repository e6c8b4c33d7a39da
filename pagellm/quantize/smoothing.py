"""SmoothQuant: move the activations' outlier channels into the weights before W8A8 quantization.

Per-token activation scales lose the small channels of a token whose row has a few huge channels. For a
linear layer that reads x, y = x W^T = (x / s) (W * s)^T for any per-input-channel s > 0; with

    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)

(max|x_j| over calibration tokens, max|W[:, j]| over every layer reading x) the activation's channels are
flattened and the weights' grown by the same factor: alpha = 0 leaves activations as they are, 1 moves all of
their range into the weights. The division by s is folded into whatever writes x, so the float model computes
the same function and nothing runs at inference time:

    qkv      q/k/v_proj (or a fused qkv_proj) read input_layernorm's output: its weight / s
    gate_up  gate/up_proj (or gate_up_proj) read post_attention_layernorm's output: its weight / s
    down     down_proj reads silu(gate) * up: up_proj's rows (and bias) / s
    o        o_proj reads the attention output, a mix of v: v_proj's rows (and bias) / s; with grouped-query
             attention an o_proj channel of every query head of a group shares one v row, so s is taken over
             the group (max of x and of W over those channels)

Works on a checkpoint's state dict under HF names, for the families whose norms are `x * weight` and whose MLP
is gated (Llama, Mistral, Qwen2, Qwen3, Phi-3).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

SMOOTHABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
MAPPINGS = ("qkv", "gate_up", "down", "o")  # what `mappings` may name; see the module's docstring
DEFAULT_MAPPINGS = ("qkv", "gate_up")  # the two SmoothQuant folds into norms (llm-compressor's default)
MIN_SCALE = 1e-5

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def _first(state: dict[str, torch.Tensor], *names: str) -> list[str]:
    """The module names (without `.weight`) among `names` whose weight is in the state dict."""
    return [n for n in names if f"{n}.weight" in state]


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] of the layers `weights` ([out, in] each) reading an input whose channels reach `act_max` [in]."""
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0)
    s = act_max.float().clamp(min=MIN_SCALE).pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=MIN_SCALE)


def check_smoothing_args(alpha: Any, mappings: tuple[str, ...], config: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"smoothquant: alpha must be a number in [0, 1]; got {alpha!r}")
    unknown = [m for m in mappings if m not in MAPPINGS]
    if unknown or not mappings:
        raise ValueError(f"smooth_mappings must name some of {', '.join(MAPPINGS)}; got {list(mappings)}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SMOOTHABLE_MODEL_TYPES:
        raise ValueError(f"smoothquant: smoothing knows the layers of {', '.join(SMOOTHABLE_MODEL_TYPES)}, not "
                         f"{model_type!r}; quantize without --smoothquant")


def _scale_rows(state: dict[str, torch.Tensor], module: str, divisor: torch.Tensor) -> None:
    """Divide the output rows of `module` (weight and bias) by `divisor`."""
    w = state[f"{module}.weight"]
    state[f"{module}.weight"] = (w.float() / divisor[:, None]).to(w.dtype)
    bias = state.get(f"{module}.bias")
    if bias is not None:
        state[f"{module}.bias"] = (bias.float() / divisor).to(bias.dtype)


def _scale_columns(state: dict[str, torch.Tensor], modules: list[str], s: torch.Tensor) -> None:
    for m in modules:
        w = state[f"{m}.weight"]
        state[f"{m}.weight"] = (w.float() * s[None, :]).to(w.dtype)


def _fold_into_norm(state, norm: str, readers: list[str], act_max, alpha) -> Optional[torch.Tensor]:
    weights = [state[f"{m}.weight"] for m in readers]
    s = smoothing_scales(act_max, weights, alpha)
    w = state[f"{norm}.weight"]
    state[f"{norm}.weight"] = (w.float() / s).to(w.dtype)
    _scale_columns(state, readers, s)
    return s


def _smooth_o(state, layer: str, v: str, o: str, act_max: torch.Tensor, alpha: float, config: Any) -> None:
    """o_proj's input channels, their division folded into v_proj's rows (shared by a GQA group)."""
    from pagellm.arch_config import ArchConfig

    arch = ArchConfig.from_hf(config)
    heads, kv_heads, head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
    channel = torch.arange(heads * head_dim)
    v_row = (channel // head_dim) // (heads // kv_heads) * head_dim + channel % head_dim  # o channel -> v row
    rows = kv_heads * head_dim
    x_row = torch.zeros(rows).scatter_reduce(0, v_row, act_max.float(), "amax")
    w_row = torch.zeros(rows).scatter_reduce(0, v_row, state[f"{o}.weight"].float().abs().amax(dim=0), "amax")
    s_row = (x_row.clamp(min=MIN_SCALE).pow(alpha) / w_row.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
    _scale_rows(state, v, s_row)
    _scale_columns(state, [o], s_row[v_row])


def smooth_state_dict(state: dict[str, torch.Tensor], config: Any, act_max: dict[str, torch.Tensor],
                      alpha: float, mappings: tuple[str, ...] = DEFAULT_MAPPINGS) -> dict[str, torch.Tensor]:
    """A copy of the state dict with the smoothing scales folded in (the float model's function unchanged).
    `act_max`: module name -> per-input-channel max |x| from calibration (calibration.collect_input_absmax)."""
    check_smoothing_args(alpha, tuple(mappings), config)
    alpha = float(alpha)
    state = dict(state)
    layers = sorted({m.group(1) for name in state if (m := _LAYER.match(name))})
    for layer in layers:
        attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        qkv = _first(state, f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj") or _first(state, f"{attn}.qkv_proj")
        gate_up = _first(state, f"{mlp}.gate_proj", f"{mlp}.up_proj") or _first(state, f"{mlp}.gate_up_proj")
        for name, norm, readers in (("qkv", f"{layer}.input_layernorm", qkv),
                                    ("gate_up", f"{layer}.post_attention_layernorm", gate_up)):
            if name in mappings:
                if not readers or f"{norm}.weight" not in state:
                    raise ValueError(f"smoothquant: {layer} lacks {norm}.weight or the projections reading it")
                _fold_into_norm(state, norm, readers, _act_max(act_max, readers[0]), alpha)
        if "down" in mappings:
            if f"{mlp}.up_proj.weight" not in state:
                raise ValueError(f"smooth_mappings: 'down' needs a separate up_proj ({mlp}.up_proj.weight)")
            down = f"{mlp}.down_proj"
            s = smoothing_scales(_act_max(act_max, down), [state[f"{down}.weight"]], alpha)
            _scale_rows(state, f"{mlp}.up_proj", s)
            _scale_columns(state, [down], s)
        if "o" in mappings:
            if f"{attn}.v_proj.weight" not in state:
                raise ValueError(f"smooth_mappings: 'o' needs a separate v_proj ({attn}.v_proj.weight)")
            _smooth_o(state, layer, f"{attn}.v_proj", f"{attn}.o_proj", _act_max(act_max, f"{attn}.o_proj"), alpha,
                      config)
    return state


def _act_max(act_max: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    if module not in act_max:
        raise ValueError(f"smoothquant: calibration saw no input of {module}")
    return act_max[module]
