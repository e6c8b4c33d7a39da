"""LoRA test helpers: PEFT-format adapters made by the test, and the reference they must match (transformers in
float32 with each adapter's delta merged into the weights, which is what PEFT computes)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(folder: str, base_dir: str, rank: int, seed: int, alpha: Optional[float] = None,
                 targets: Optional[list[str]] = None, rslora: bool = False) -> str:
    """A PEFT LoRA adapter of the tiny model in `base_dir`, with random (non-zero) A and B."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    targets = targets or ALL_TARGETS
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dims = {  # projection -> (in, out)
        "q_proj": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
        "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
        "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
        "o_proj": (cfg.num_attention_heads * head_dim, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for proj in targets:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fan_in, fan_out = dims[proj]
            prefix = f"base_model.model.model.layers.{layer}.{part}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.15
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.15
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": rslora,
              "base_model_name_or_path": base_dir, "fan_in_fan_out": False, "modules_to_save": None}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def merged_reference(base_dir: str, adapter_dir: Optional[str]):
    """transformers' float32 model of base_dir with the adapter's scale * B @ A added to each target weight."""
    import math

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            params[target] += scale * (b @ a)
    return model
