"""AWQ checkpoints (AutoAWQ "gemm" version, 4-bit with zero points).

Tensors of a layer with K inputs and N outputs, group size G:

    qweight [K, N / 8] int32   output channels packed along dim 1, eight to an element in AWQ's interleaved
                               order: bits 4i..4i+3 of element c hold column 8c + AWQ_ORDER[i]
    qzeros  [K / G, N / 8] int32  zero points, packed the same way (stored as they are, no offset)
    scales  [K / G, N]         float16

w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]; the layer computes x @ w.
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
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # element bits 4i.. hold column AWQ_ORDER[i] of its eight
AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(PACK))  # column j sits in field AWQ_UNDO[j]


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[R, N / 8] int32 in AWQ's order -> [R, N] int32 in 0..15, columns in their natural order."""
    fields = unpack_cols(packed)
    n = fields.shape[1]
    index = (torch.arange(0, n, PACK, device=packed.device).view(-1, 1)
             + torch.tensor(AWQ_UNDO, device=packed.device).view(1, -1)).reshape(-1)
    return fields[:, index]


class AWQLinearMethod(W4A16LinearMethod):
    def create_weights(self, layer, input_size, output_sizes, full_input_size, dtype, device) -> None:
        self.check_sizes(input_size, output_sizes)
        out = sum(output_sizes)
        _group, groups, group_dim = self.groups_of(input_size, full_input_size)
        make_param(layer, "qweight", (input_size, out // PACK), torch.int32, device, input_dim=0, output_dim=1,
                   packed_dim=1, pack_factor=PACK, fill_dummy=fill_random_packed)
        make_param(layer, "qzeros", (groups, out // PACK), torch.int32, device, input_dim=group_dim, output_dim=1,
                   packed_dim=1, pack_factor=PACK, fill_dummy=fill_packed_const(8))
        make_param(layer, "scales", (groups, out), SCALE_DTYPE, device, input_dim=group_dim, output_dim=1,
                   fill_dummy=fill_scales)

    def unpacked(self, layer):
        q = awq_unpack(layer.qweight.data)
        zeros = awq_unpack(layer.qzeros.data)
        drop(layer, "qweight", "qzeros")
        return q, zeros, None


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, bits: int = 4, group_size: int = 128, zero_point: bool = True) -> None:
        if bits != 4:
            raise ValueError(f"quantization: AWQ with {bits} bits is not supported (4 only)")
        if not zero_point:
            raise ValueError("quantization: AWQ without zero points is not supported")
        if group_size != -1 and (group_size < PACK or group_size % PACK):
            raise ValueError(f"quantization: AWQ group_size must be -1 or a multiple of {PACK}, got {group_size}")
        self.bits, self.group_size = bits, group_size

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> "AWQConfig":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization: AWQ version {version!r} is not supported (gemm)")
        bits = qc.get("bits", qc.get("w_bit", 4))
        group = qc.get("group_size", qc.get("q_group_size", 128))
        return cls(int(bits), int(group), bool(qc.get("zero_point", True)))

    def linear_method(self, prefix: str) -> AWQLinearMethod:
        return AWQLinearMethod(self.group_size)
