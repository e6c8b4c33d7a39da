"""4-bit weights, 16-bit activations (GPTQ and AWQ checkpoints): the layout both become, and the matmul.

Both formats store w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n], with q and z 4-bit integers, one scale and
zero per group of input channels and output channel, g(k) = k // group_size (or GPTQ's g_idx[k] with
act-order). They differ only in packing (gptq.py, awq.py say how). After loading, each layer holds one layout:

    qweight [K / 8, N] int32   eight 4-bit q of consecutive input channels per element, k = 8 * row + j in
                               bits 4j..4j+3 (GPTQ's own packing)
    scales  [groups, N]        float16, as the checkpoints store them (bf16 would round them)
    zeros   [groups, N]        the zero points, unpacked, in float16 (exact: 0..16)
    g_idx   [K] int32 or None  group of each (permuted) input channel; None when it is k // group_size
    perm    [K] int64 or None  act-order: input channels sorted by group, so the kernel reads groups in
                               order; the activations are gathered by the same permutation

On CUDA (fp16/bf16) Triton kernels dequantize inside the product (triton_w4a16.py: a GEMV-like kernel for small
batches, a GEMM for large ones, picked by M from w4a16_configs.py): a decode step reads a quarter of a 16-bit
weight's bytes. Elsewhere the weight is dequantized, then multiplied (the reference).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pagellm.model_executor.layers.quantization.base import LinearMethod, replace_param

PACK = 8  # 4-bit values per int32
SCALE_DTYPE = torch.float16  # scales as GPTQ and AWQ checkpoints hold them, whatever the activation dtype
_SHIFTS = tuple(range(0, 32, 4))


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 -> [8R, C] int32 in 0..15: row 8r + j is bits 4j..4j+3 of row r."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    q = (packed.unsqueeze(1) >> shifts.view(1, PACK, 1)) & 0xF
    return q.reshape(packed.shape[0] * PACK, packed.shape[1])


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 -> [R, 8C] int32 in 0..15: column 8c + j is bits 4j..4j+3 of column c."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    q = (packed.unsqueeze(2) >> shifts.view(1, 1, PACK)) & 0xF
    return q.reshape(packed.shape[0], packed.shape[1] * PACK)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_rows: [K, C] ints in 0..15 (K a multiple of 8) -> [K / 8, C] int32."""
    k, c = q.shape
    q = q.to(torch.int32).reshape(k // PACK, PACK, c)
    out = torch.zeros(k // PACK, c, dtype=torch.int32, device=q.device)
    for j, shift in enumerate(_SHIFTS):
        out |= q[:, j] << shift
    return out


def pack_cols(q: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_cols: [R, N] ints in 0..15 (N a multiple of 8) -> [R, N / 8] int32."""
    return pack_rows(q.t().contiguous()).t().contiguous()


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: Optional[torch.Tensor],
                  group_size: int) -> torch.Tensor:
    """The float32 weight [K, N] of the layout above."""
    q = unpack_rows(qweight).float()
    groups = g_idx.long() if g_idx is not None else torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros.float()[groups]) * scales.float()[groups]


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """x [M, K] (already permuted) @ W: the weight rounded to x's dtype as the kernel does, float32 sums."""
    w = dequantize_w4(qweight, scales, zeros, g_idx, group_size).to(x.dtype)
    return (x.float() @ w.float()).to(x.dtype)


def w4a16_linear(x: torch.Tensor, layer, bias: Optional[torch.Tensor]) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if layer.perm is not None:
        x2 = x2.index_select(1, layer.perm)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

        y = w4a16_matmul(x2, layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.group_size)
    else:
        y = w4a16_reference(x2, layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.group_size)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


# ---- dummy weights (load_format="dummy") -----------------------------------------------------------------
# Random 4-bit values are uniform on 0..15; with the zero point at 8 they have a spread of sqrt((16**2-1)/12).
_Q_STD = math.sqrt((16 ** 2 - 1) / 12)


def fill_random_packed(param: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """Every bit random: eight uniform 4-bit values per int32."""
    param.copy_(torch.randint(0, 2 ** 32, param.shape, generator=gen, device=param.device).to(torch.int32))


def fill_packed_const(value: int):
    """Every 4-bit field of every element set to `value` (a zero point)."""
    word = sum(value << s for s in _SHIFTS)
    word = word - 2 ** 32 if word >= 2 ** 31 else word

    def fill(param: torch.Tensor, gen: torch.Generator, std: float) -> None:
        param.fill_(word)
    return fill


def fill_scales(param: torch.Tensor, gen: torch.Generator, std: float) -> None:
    param.fill_(std / _Q_STD)


class W4A16LinearMethod(LinearMethod):
    """Shared by GPTQ and AWQ: their create_weights and `unpacked` differ, the layout after loading does not."""

    def __init__(self, group_size: int, desc_act: bool = False) -> None:
        self.group_size = group_size
        self.desc_act = desc_act

    def groups_of(self, input_size: int, full_input_size: int) -> tuple[int, int, Optional[int]]:
        """(group size, number of scale rows this rank holds, their input dim for TP slicing or None).

        Scales are split with the input channels (a row-parallel layer) unless each rank needs all of them:
        one group over the whole input (group_size -1), or act-order, whose g_idx points anywhere."""
        group = self.group_size if self.group_size != -1 else full_input_size
        split = input_size != full_input_size
        if self.group_size != -1 and not (self.desc_act and split):
            if input_size % group and not split:  # a last, shorter group (an input smaller than one group)
                return group, -(-input_size // group), 0
            if input_size % group:
                raise ValueError(f"quantization: a rank's input size {input_size} is not a multiple of the group "
                                 f"size {group} (tensor_parallel_size too large for this checkpoint?)")
            return group, input_size // group, 0
        return group, -(-full_input_size // group), None

    @staticmethod
    def check_sizes(input_size: int, output_sizes: list[int]) -> None:
        if input_size % PACK or any(n % PACK for n in output_sizes):
            raise ValueError(f"quantization: 4-bit layers need input and output sizes that are multiples of {PACK} "
                             f"(got input {input_size}, outputs {output_sizes})")

    def unpacked(self, layer) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(q [K, N] 0..15, zeros [groups, N], g_idx [K] or None) from the loaded format's tensors, which this
        removes from the layer."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer) -> None:
        q, zeros, g_idx = self.unpacked(layer)
        layer.group_size = self.group_size if self.group_size != -1 else layer.full_input_size
        perm = None
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[perm], g_idx[perm]
            if torch.equal(g_idx, torch.arange(q.shape[0], device=q.device, dtype=torch.int32) // layer.group_size):
                g_idx = None  # act-order whose groups, once sorted, are plain blocks: the fast path
            if torch.equal(perm, torch.arange(q.shape[0], device=q.device)):
                perm = None
        scales = layer.scales.data
        if "qweight" in layer._parameters:
            delattr(layer, "qweight")
        layer.register_parameter("qweight", torch.nn.Parameter(pack_rows(q), requires_grad=False))
        replace_param(layer, "scales", scales.contiguous())
        layer.register_parameter("zeros", torch.nn.Parameter(zeros.to(scales.dtype).contiguous(),
                                                             requires_grad=False))
        layer.register_buffer("g_idx", g_idx, persistent=False)
        layer.register_buffer("perm", perm, persistent=False)

    def apply(self, layer, x, bias):
        return w4a16_linear(x, layer, bias)


def drop(layer, *names: str) -> None:
    for name in names:
        if name in layer._parameters:
            delattr(layer, name)


__all__ = ["W4A16LinearMethod", "dequantize_w4", "w4a16_reference", "pack_rows", "pack_cols", "unpack_rows",
           "unpack_cols"]
