"""Phi-3 (`Phi3ForCausalLM`): Llama's layers; the checkpoint already holds q/k/v fused as `qkv_proj` and
gate/up as `gate_up_proj`, which are our merged parameters' own names, so the merged layers' weight_loader
takes each tensor whole (and slices it per rank under tensor parallelism). A config's sliding_window applies
to every layer (ArchConfig).

Not supported, and refused when the model is built: su/longrope rope scaling (Phi-3 128k variants: two
per-frequency factor lists switched by sequence length) and partial rotary embeddings (Phi-4-mini).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from pagellm.arch_config import ArchConfig
from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None,
                 quant_config: Optional[QuantizationConfig] = None) -> None:
        arch = ArchConfig.from_hf(config)
        rope_type = arch.rope_scaling.get("rope_type")
        if rope_type in ("su", "longrope"):
            raise NotImplementedError(
                f"Phi-3 with {rope_type!r} rope scaling (the 128k-context variants) is not supported; the 4k/8k "
                "variants without rope scaling are")
        if arch.partial_rotary_factor != 1.0:
            raise NotImplementedError(f"Phi-3 with partial_rotary_factor {arch.partial_rotary_factor} is not "
                                      "supported (only full rotary embeddings)")
        super().__init__(config, dtype, device, quant_config)
