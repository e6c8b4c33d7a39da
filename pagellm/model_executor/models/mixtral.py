"""Mixtral: Llama's attention and layer stack with a sparse MoE block (8 experts, top 2, renormalized) in
place of the MLP. The checkpoint names the block `block_sparse_moe` and the experts' projections w1/w3/w2
(gate/up/down); they load into `mlp.gate` and `mlp.experts` (layers/fused_moe).

Same constructor convention and interface as models/llama.py.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.models.moe_common import MoEForCausalLM, SparseMoeBlock


def mixtral_mlp(config: Any, layer_idx: int, dtype=None, device=None,
                quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> nn.Module:
    return SparseMoeBlock(config, dtype, device, quant_config, prefix)


class MixtralForCausalLM(MoEForCausalLM):
    make_mlp = staticmethod(mixtral_mlp)

    def checkpoint_name(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.", 1)
