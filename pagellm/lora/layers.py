"""LoRALinear: a base linear layer plus, for each token, the delta of the adapter its request runs with.

The adapters live in stacked buffers, one slot per adapter the engine may hold at once (max_loras):
    lora_a [L, S * r, in]    the A of each of the layer's S slices (q/k/v, gate/up) one above the other
    lora_b [L, out, S * r]   each slice's scaled B in its own output rows and its own r columns (block diagonal)
so a merged layer's delta is one shrink (x @ A^T) and one expand (u @ B^T) whatever its slices, and an
adapter of rank below max_lora_rank is zero-padded (the zeros add nothing). Slot -1 is the base model.

Which slot each token uses is the step's `LoRAStepState` (manager.py): on CUDA the kernels of triton_lora.py
read its per-token slot tensor; on the CPU the tokens come as runs of one slot (a request's tokens are
contiguous) and each run is two small matmuls on views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pagellm.lora.triton_lora import lora_expand_, lora_shrink  # usable only where triton is (CUDA)


@dataclass
class LoRAStepState:
    """The current step's adapter per token, shared by every LoRA layer of the model."""

    token_slots: torch.Tensor  # int32 [2, max_tokens] on the device: each token's slot (-1: the base model), then
    # the token indices sorted by slot (triton_lora.slot_order), both written by LoRAManager.set_step
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, start, end), slot >= 0 only
    use_kernels: bool = False  # the Triton path (CUDA)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, slice_sizes: list[int], max_loras: int, max_rank: int,
                 state: LoRAStepState, dtype: torch.dtype) -> None:
        """`dtype`: the model's activations' (a quantized base layer's weights say nothing about it)."""
        super().__init__()
        self.base = base
        self.slice_sizes = list(slice_sizes)
        self.slice_offsets = [sum(slice_sizes[:i]) for i in range(len(slice_sizes))]
        self.max_rank = max_rank
        self.state = state
        dev = next(base.parameters()).device
        r_total = max_rank * len(slice_sizes)
        self.register_buffer("lora_a", torch.zeros(max_loras, r_total, base.input_size, dtype=dtype, device=dev),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, sum(slice_sizes), r_total, dtype=dtype, device=dev),
                             persistent=False)

    @property
    def input_size(self) -> int:
        return self.base.input_size

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def set_slice(self, slot: int, index: int, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        """Place one slice's A [r, in] and scaled B [out, r] into `slot` (ValueError on a shape the layer has not)."""
        r = a.shape[0]
        if a.shape[1] != self.input_size or b.shape[0] != self.slice_sizes[index]:
            raise ValueError(f"lora_path: {where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                             f"model's projection (in {self.input_size}, out {self.slice_sizes[index]})")
        rows = slice(index * self.max_rank, index * self.max_rank + r)
        out = slice(self.slice_offsets[index], self.slice_offsets[index] + self.slice_sizes[index])
        self.lora_a[slot, rows].copy_(a)
        self.lora_b[slot, out, rows].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        state = self.state
        if state.use_kernels:
            slots, order = state.token_slots[:, : x.shape[0]]
            return lora_expand_(y, lora_shrink(x, self.lora_a, slots, order), self.lora_b, slots, order,
                                self.slice_sizes)
        for slot, start, end in state.runs:
            xs = x[start:end].to(self.lora_a.dtype)
            y[start:end] += ((xs @ self.lora_a[slot].T) @ self.lora_b[slot].T).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"slices={self.slice_sizes}, max_loras={self.lora_a.shape[0]}, max_rank={self.max_rank}"


def slice_sizes_of(base: nn.Module) -> Optional[list[int]]:
    """The output slices of a linear layer (merged layers' projections), or None if it is not one of ours."""
    sizes = getattr(base, "output_sizes", None)
    if sizes is not None:
        return list(sizes)
    out = getattr(base, "output_size", None)
    return None if out is None else [out]
