"""A PEFT LoRA adapter folder, read and checked: adapter_config.json (r, lora_alpha, target_modules) and
adapter_model.safetensors (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...).

The delta of a target projection W is scale * B @ A (A [r, in], B [out, r]), scale = lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora), exactly what PEFT adds. The scale is folded into B once, here.
Checkpoint projections map onto pagellm's merged layers: q/k/v onto qkv_proj's three slices, gate/up onto
gate_up_proj's two; o_proj and down_proj are single.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

# checkpoint projection -> (our layer name, slice index within it)
TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
# our layer name -> its number of slices
LAYER_SLICES = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}

_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class AdapterConfig:
    rank: int
    scale: float
    target_modules: list[str]


@dataclass
class LoRAWeights:
    """One adapter's tensors: (layer index, our layer name) -> per slice (A [r, in], B scaled [out, r]) or
    None where the adapter leaves that slice alone."""

    rank: int
    layers: dict[tuple[int, str], list[Optional[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)


def read_adapter_config(path: str, max_rank: int) -> AdapterConfig:
    """The adapter's config, checked against what the engine serves (ValueError naming the field)."""
    if not os.path.isdir(path):
        raise ValueError(f"lora_path: {path!r} is not a folder")
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"lora_path: {path!r} has no adapter_config.json")
    if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        raise ValueError(f"lora_path: {path!r} has no adapter_model.safetensors")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"lora_path: adapter_config.json of {path!r} is not readable JSON ({e})") from None
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"peft_type: only LORA adapters are served, got {peft_type!r}")
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"r: the adapter's rank must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"r: the adapter's rank {rank} exceeds max_lora_rank {max_rank} (raise --max-lora-rank)")
    alpha = raw.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"lora_alpha: must be a number, got {alpha!r}")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        targets = [t for t in TARGETS if re.fullmatch(targets, t) or targets.endswith(t)]
    targets = [t.split(".")[-1] for t in targets]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"target_modules: LoRA applies to {', '.join(TARGETS)}; the adapter targets "
                         f"{unknown or 'nothing'}")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"bias: adapters with trained biases are not served (bias {raw.get('bias')!r})")
    if raw.get("modules_to_save"):
        raise ValueError(f"modules_to_save: adapters that replace whole modules ({raw['modules_to_save']}) are "
                         "not served")
    scale = alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank
    return AdapterConfig(rank, float(scale), targets)


def load_adapter(path: str, max_rank: int, num_layers: int) -> LoRAWeights:
    """Reads and checks the adapter's tensors (shapes are checked against the model when they are placed)."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path, max_rank)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _NAME.search(name)
        if m is None or m.group(2) not in TARGETS:
            raise ValueError(f"lora_path: adapter tensor {name!r} is not a LoRA weight of a projection pagellm "
                             f"serves ({', '.join(TARGETS)})")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ValueError(f"lora_path: adapter tensor {name!r} names layer {layer}; the model has {num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t
    out = LoRAWeights(cfg.rank)
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"lora_path: layer {layer} {proj} has lora_{'A' if 'A' not in ab else 'B'} missing")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise ValueError(f"r: layer {layer} {proj}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             f"have the config's rank {cfg.rank}")
        ours, index = TARGETS[proj]
        slots = out.layers.setdefault((layer, ours), [None] * LAYER_SLICES[ours])
        slots[index] = (a, b * cfg.scale)
    if not out.layers:
        raise ValueError(f"lora_path: {path!r} holds no LoRA weights")
    return out
