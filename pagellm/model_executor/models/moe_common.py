"""What the MoE families share: the sparse MoE block (router -> routed experts, optionally a gated shared
expert) and the loading of per-expert checkpoint tensors into FusedMoE's stacked weights."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model_executor.layers.fused_moe import FusedMoE, moe_sizes_of
from pagellm.model_executor.layers.fused_moe.layer import EXPERT_SHARDS
from pagellm.model_executor.layers.linear import Linear
from pagellm.model_executor.layers.quantization.base import QuantizationConfig
from pagellm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP

# model.layers.L.mlp.experts.N.gate_proj.weight (Qwen) / ...experts.N.w1.weight (Mixtral)
_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


class SparseMoeBlock(nn.Module):
    """gate (router, replicated) -> top-k experts (FusedMoE); with a shared expert (Qwen2-MoE) its output,
    scaled by sigmoid(shared_expert_gate(x)), is added. Names are the checkpoint's."""

    def __init__(self, config: Any, dtype=None, device=None, quant_config: Optional[QuantizationConfig] = None,
                 prefix: str = "", shared_expert: bool = False) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError(f"quantization: {quant_config.name} is not supported for Mixture-of-Experts layers yet "
                             f"({prefix}); load the model unquantized")
        sizes = moe_sizes_of(config)
        hidden = config.hidden_size
        self.gate = Linear(hidden, sizes.num_experts, False, dtype, device)
        self.experts = FusedMoE(sizes, hidden, dtype, device)
        if shared_expert:
            self.shared_expert = LlamaMLP(hidden, config.shared_expert_intermediate_size,
                                          getattr(config, "hidden_act", "silu"), False, dtype, device,
                                          prefix=f"{prefix}.shared_expert")
            self.shared_expert_gate = Linear(hidden, 1, False, dtype, device)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule: a layer is MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return config.num_experts > 0 and (layer_idx + 1) % step == 0


class MoEForCausalLM(LlamaForCausalLM):
    """The Llama stack with MoE blocks (chosen by `make_mlp`); loads per-expert checkpoint tensors."""

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint name in our module's terms (Mixtral renames its block)."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        filled: Counter[str] = Counter()

        def the_rest():
            """Expert tensors go to their FusedMoE here; everything else to Llama's loader."""
            for name, tensor in weights:
                name = self.checkpoint_name(name)
                match = _EXPERT_TENSOR.match(name)
                if match is None:
                    yield name, tensor
                    continue
                if self._other_stages and name.startswith(self._other_stages):
                    continue
                prefix, expert, proj = match.groups()
                shard = EXPERT_SHARDS[proj]
                target = f"{prefix}.{'w2_weight' if shard == 'w2' else 'w13_weight'}"
                param = params.get(target)
                if param is None:
                    yield name, tensor  # reported as unknown there
                    continue
                try:
                    if param.weight_loader(param, tensor, shard, int(expert)):
                        filled[target] += 1
                except ValueError as e:
                    raise ValueError(f"loading checkpoint tensor {name!r} into {target!r}: {e}") from None

        loaded = super().load_weights(the_rest())
        for target, count in filled.items():
            module_name, param_name = target.rsplit(".", 1)
            if count == self.get_submodule(module_name).expected_shards()[param_name]:
                loaded.add(target)
        return loaded
