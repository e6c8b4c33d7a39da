"""Linear layers. Single-device for now: tensor-parallel variants will shard these same modules.

Every parameter carries a `weight_loader(param, loaded_tensor, shard_id=None)` attribute: a model's
`load_weights` never copies into a parameter itself, it calls that hook, so a sharded layer can later pick its
slice of the checkpoint tensor without the model code changing. Merged layers (QKV, gate/up) take a shard_id
naming which checkpoint projection the tensor is, and copy it into that projection's rows.

Parameters are created uninitialized (torch.empty) in the requested dtype on the requested device: the loader
fills them, and a missing checkpoint tensor is an error, not a silently random weight.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) with a shape check (converts dtype and device)."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(src.shape)}, parameter expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a whole checkpoint tensor into the parameter. When the tensor already has the parameter's dtype,
    device and layout, the parameter adopts its storage instead: no copy, and the parameter's own (never
    touched) allocation is freed. Loaders hand over fresh tensors, never views of memory still in use."""
    if shard_id is not None:
        raise ValueError(f"this parameter is not merged, but shard {shard_id!r} was given")
    if (isinstance(param, torch.nn.Parameter) and loaded.dtype == param.dtype and loaded.device == param.device
            and tuple(loaded.shape) == tuple(param.shape) and loaded.is_contiguous()
            and not loaded.requires_grad and loaded.storage_offset() == 0
            and loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()):
        param.data = loaded
        return
    copy_weight(param.data, loaded)


def _param(shape: Sequence[int], dtype, device, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader
    return p


class Linear(nn.Module):
    """y = x @ W^T (+ b), W [output_size, input_size]."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = _param((output_size, input_size), dtype, device, self.weight_loader)
        if bias:
            self.bias = _param((output_size,), dtype, device, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, computed as one matmul.

    output_sizes[i] rows belong to shard i; shard_id is the index, or a name from shard_names.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 shard_names: Optional[Sequence[str]] = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias, dtype, device)
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names) if shard_names is not None else None
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]

    def shard_index(self, shard_id: Union[int, str]) -> int:
        if isinstance(shard_id, str):
            if self.shard_names is None or shard_id not in self.shard_names:
                raise ValueError(f"unknown shard {shard_id!r} (shards: {self.shard_names})")
            return self.shard_names.index(shard_id)
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard index {shard_id} out of range ({len(self.output_sizes)} shards)")
        return shard_id

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # the whole merged tensor at once (e.g. a checkpoint already merged)
            copy_weight(param.data, loaded)
            return
        i = self.shard_index(shard_id)
        copy_weight(param.data.narrow(0, self.offsets[i], self.output_sizes[i]), loaded)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output of forward() split back into its shards (views)."""
        return y.split(self.output_sizes, dim=-1)


class QKVLinear(MergedLinear):
    """q, k, v projections as one matmul; shard ids "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, dtype, device, shard_names=["q", "k", "v"])
