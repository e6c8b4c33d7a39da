"""GPTQ checkpoints (AutoGPTQ / GPTQModel "gptq" format, 4-bit, symmetric or not, with or without act-order).

Tensors of a layer with K inputs and N outputs, group size G (K when -1):

    qweight [K / 8, N] int32   input channels packed along dim 0: k = 8 * row + j in bits 4j..4j+3
    qzeros  [K / G, N / 8] int32  zero points packed along dim 1, stored minus one (the "v1" format: a
                               symmetric checkpoint stores 7 for the zero point 8)
    scales  [K / G, N]         float16
    g_idx   [K] int32          group of each input channel: k // G, or any assignment with act-order
                               (desc_act), where q, k, v (and gate, up) share it as they share their input

w[k, n] = (q[k, n] - (qzeros[g_idx[k], n] + 1)) * scales[g_idx[k], n]; the layer computes x @ w.
"""

from __future__ import annotations

from typing import Any

import torch

from pagellm.model_executor.layers.quantization.base import QuantizationConfig, make_param
from pagellm.model_executor.layers.quantization.w4a16 import (
    PACK,
    SCALE_DTYPE,
    W4A16LinearMethod,
    drop,
    fill_packed_const,
    fill_random_packed,
    fill_scales,
    unpack_cols,
    unpack_rows,
)


class GPTQLinearMethod(W4A16LinearMethod):
    def create_weights(self, layer, input_size, output_sizes, full_input_size, dtype, device) -> None:
        self.check_sizes(input_size, output_sizes)
        out = sum(output_sizes)
        group, groups, group_dim = self.groups_of(input_size, full_input_size)
        make_param(layer, "qweight", (input_size // PACK, out), torch.int32, device, input_dim=0, output_dim=1,
                   packed_dim=0, pack_factor=PACK, fill_dummy=fill_random_packed)
        make_param(layer, "qzeros", (groups, out // PACK), torch.int32, device, input_dim=group_dim, output_dim=1,
                   packed_dim=1, pack_factor=PACK, fill_dummy=fill_packed_const(7))
        make_param(layer, "scales", (groups, out), SCALE_DTYPE, device, input_dim=group_dim, output_dim=1,
                   fill_dummy=fill_scales)
        # Without act-order g_idx is k // G and unused; checkpoints carry it anyway, and may leave it out.
        g_idx = make_param(layer, "g_idx", (input_size,), torch.int32, device, input_dim=0,
                           has_default=not self.desc_act, fill_dummy=self._fill_g_idx(group, input_size))
        if not self.desc_act:
            self._fill_g_idx(group, input_size)(g_idx.data, None, 0.0)

    @staticmethod
    def _fill_g_idx(group: int, input_size: int):
        def fill(param: torch.Tensor, gen, std: float) -> None:
            param.copy_(torch.arange(input_size, dtype=torch.int32, device=param.device) // group)
        return fill

    def unpacked(self, layer):
        q = unpack_rows(layer.qweight.data)
        zeros = unpack_cols(layer.qzeros.data) + 1  # v1 format: stored minus one
        g_idx = layer.g_idx.data.clone() if self.desc_act else None
        drop(layer, "qweight", "qzeros", "g_idx")
        return q, zeros, g_idx


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True) -> None:
        if bits != 4:
            raise ValueError(f"quantization: GPTQ with {bits} bits is not supported (4 only)")
        if group_size != -1 and (group_size < PACK or group_size % PACK):
            raise ValueError(f"quantization: GPTQ group_size must be -1 or a multiple of {PACK}, got {group_size}")
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> "GPTQConfig":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", None):
            raise ValueError(f"quantization: GPTQ checkpoint_format {fmt!r} is not supported (gptq)")
        return cls(int(qc.get("bits", 4)), int(qc.get("group_size", 128)), bool(qc.get("desc_act", False)),
                   bool(qc.get("sym", True)))

    def linear_method(self, prefix: str) -> GPTQLinearMethod:
        return GPTQLinearMethod(self.group_size, self.desc_act)
