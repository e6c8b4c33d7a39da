"""Per-token activation quantization fused into the op before a W8A8 linear.

Why: an fp8/int8 linear quantizes its input per token in a pass of its own (read 16-bit, write 8-bit), after
the op before it (RMSNorm, SiLU-and-mul) wrote that 16-bit input. When the op's output goes only to the linear,
the op can write it quantized instead: one kernel and one 16-bit tensor fewer per pair, three pairs per Llama
layer. The numerics are the unfused pair's (the op's output rounded to the activations' dtype, then
quantize_per_row), on the CPU as on CUDA.

A module declares its pairs with `quant_input_pairs() -> [(op, linear), ...]`, each op's output being only
that linear's input. `fuse_activation_quant` sets `op.out_qdtype` where the linear is one of ours (not wrapped,
e.g. by LoRA) and its method takes quantized input (`LinearMethod.input_qdtype`), and the op can write it.
"""

from __future__ import annotations

from torch import nn

from pagellm.model_executor.layers.linear import Linear


def fuse_activation_quant(model: nn.Module) -> int:
    """Turn on every declared pair that can be fused; returns how many. Run after anything that wraps layers."""
    fused = 0
    for module in model.modules():
        declare = getattr(module, "quant_input_pairs", None)
        if declare is None:
            continue
        for op, linear in declare():
            qdtype = linear.quant_method.input_qdtype if isinstance(linear, Linear) else None
            if qdtype is not None and getattr(op, "supports_quant_output", False):
                op.out_qdtype = qdtype
                fused += 1
    return fused
