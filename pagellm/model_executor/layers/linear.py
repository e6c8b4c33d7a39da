"""Linear layers, tensor-parallel (Megatron style) when the TP group has more than one rank.

- `Linear`: replicated (every rank holds the whole weight).
- `MergedLinear` / `QKVLinear`: column-parallel. Each projection's output rows are split across the TP
  ranks, so every rank computes its own heads / its own slice of the MLP with no communication.
- `RowParallelLinear`: the input dim is split; each rank's partial product is summed by an all-reduce
  (o_proj, down_proj). The bias is added once, after the sum.

At TP size 1 (the default) these are exactly the single-device layers: same shapes, same names, no
collective anywhere.

Every parameter carries a `weight_loader(param, loaded_tensor, shard_id=None)` attribute: a model's
`load_weights` never copies into a parameter itself, it calls that hook, so a sharded layer can later pick its
slice of the checkpoint tensor without the model code changing. Merged layers (QKV, gate/up) take a shard_id
naming which checkpoint projection the tensor is, and copy it into that projection's rows.

Parameters are created uninitialized (torch.empty) in the requested dtype on the requested device: the loader
fills them, and a missing checkpoint tensor is an error, not a silently random weight.

Which parameters a layer has, and how it multiplies, is its `quant_method`'s business
(layers/quantization/base.py): the float `weight` by default, or a quantized format's tensors. The loaders
below never look at the method: they cut slices by the tags each parameter carries (`input_dim`,
`output_dim`, `packed_dim`/`pack_factor`, `shard_scalar`), so tensor parallelism works for every format.

A loaded tensor may be a lazy one (the safetensors loader under TP/PP): anything with `.shape`,
`.narrow(dim, start, length) -> Tensor` (reads only that slice) and `.materialize() -> Tensor`. Sharded
loaders narrow first, so a rank reads only its own shard from the file.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from pagellm.distributed.parallel_state import get_tp_group
from pagellm.model_executor.layers.quantization.base import UNQUANTIZED, LinearMethod, QuantizationConfig


def materialize(loaded) -> torch.Tensor:
    """A checkpoint tensor as a Tensor (reads a lazy one whole)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.materialize()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) with a shape check (converts dtype and device). A one-element tensor fits any
    one-element parameter (checkpoints store a scalar scale as [] or [1])."""
    if dst.numel() == 1 and src.numel() == 1:
        src = src.reshape(dst.shape)
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(src.shape)}, parameter expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a whole checkpoint tensor into the parameter. When the tensor already has the parameter's dtype,
    device and layout, the parameter adopts its storage instead: no copy, and the parameter's own (never
    touched) allocation is freed. Loaders hand over fresh tensors, never views of memory still in use."""
    if shard_id is not None:
        raise ValueError(f"this parameter is not merged, but shard {shard_id!r} was given")
    loaded = materialize(loaded)
    if (isinstance(param, torch.nn.Parameter) and loaded.dtype == param.dtype and loaded.device == param.device
            and tuple(loaded.shape) == tuple(param.shape) and loaded.is_contiguous()
            and not loaded.requires_grad and loaded.storage_offset() == 0
            and loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()):
        param.data = loaded
        return
    copy_weight(param.data, loaded)


def packed_size(param: torch.Tensor, dim: int, size: int) -> int:
    """`size` values along `dim` of the layer, in elements of `param` (a packed dim holds pack_factor a piece)."""
    if getattr(param, "packed_dim", None) != dim:
        return size
    factor = param.pack_factor
    if size % factor:
        raise ValueError(f"{size} values do not pack into whole elements of {factor}")
    return size // factor


def input_quant_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The 8-bit dtype a module quantizes its input to per token, for the layer before it to do instead: a W8A8
    `Linear`'s (or a block's that says so); None for anything else (a float linear, a LoRA wrapper, MoE)."""
    return getattr(module, "input_quant_dtype", None)


def quant_method_for(quant_config: Optional[QuantizationConfig], prefix: str) -> LinearMethod:
    return UNQUANTIZED if quant_config is None else quant_config.linear_method(prefix)


class Linear(nn.Module):
    """y = x @ W^T (+ b), W [output_size, input_size] (or its quantized form, see `quant_method`)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        if not hasattr(self, "full_input_size"):
            self.full_input_size = input_size
        self.quant_method = quant_method_for(quant_config, prefix)
        self.quant_method.create_weights(self, input_size, self.partition_sizes(), self.full_input_size,
                                         dtype or torch.get_default_dtype(), device)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype, device=device), requires_grad=False)
            self.bias.output_dim = 0
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    @property
    def input_quant_dtype(self) -> Optional[torch.dtype]:
        """The 8-bit dtype this layer quantizes its input to per token (W8A8), else None: see LinearMethod."""
        return self.quant_method.input_quant_dtype

    def partition_sizes(self) -> list[int]:
        """This rank's output rows of each merged projection (one projection here)."""
        return [self.output_size]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class RowParallelLinear(Linear):
    """y = sum over TP ranks of x_r @ W_r^T (+ b): W [output_size, input_size / tp] on each rank, x already
    split along its last dim (the output of a column-parallel layer). At TP size 1 it is `Linear`."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.full_input_size = input_size
        super().__init__(divide(input_size, self.tp_size, "input size of a row-parallel layer"), output_size, bias,
                         dtype, device, quant_config, prefix)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        dim = getattr(param, "input_dim", None)
        if self.tp_size == 1 or dim is None:  # the bias (and anything without an input dim) is not split
            default_weight_loader(param, loaded, shard_id)
            return
        if shard_id is not None:
            raise ValueError(f"this parameter is not merged, but shard {shard_id!r} was given")
        n = param.shape[dim]  # this rank's share, in the parameter's own (maybe packed) elements
        copy_weight(param.data, loaded.narrow(dim, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        y = get_tp_group().all_reduce(self.quant_method.apply(self, x, None))
        return y if self.bias is None else y + self.bias


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, computed as one matmul.

    output_sizes[i] rows belong to shard i; shard_id is the index, or a name from shard_names. Column-parallel:
    with TP, each rank holds rows [rank * n/tp, (rank + 1) * n/tp) of every shard, and `output_sizes` are
    these per-rank sizes (`full_output_sizes` the checkpoint's).
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 shard_names: Optional[Sequence[str]] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.full_output_sizes = list(output_sizes)
        self.output_sizes = self._rank_sizes(list(output_sizes))
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        super().__init__(input_size, sum(self.output_sizes), bias, dtype, device, quant_config, prefix)
        self.shard_names = list(shard_names) if shard_names is not None else None

    def partition_sizes(self) -> list[int]:
        return list(self.output_sizes)

    def _rank_sizes(self, full: list[int]) -> list[int]:
        return [divide(n, self.tp_size, "output size of a column-parallel layer") for n in full]

    def shard_index(self, shard_id: Union[int, str]) -> int:
        if isinstance(shard_id, str):
            if self.shard_names is None or shard_id not in self.shard_names:
                raise ValueError(f"unknown shard {shard_id!r} (shards: {self.shard_names})")
            return self.shard_names.index(shard_id)
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard index {shard_id} out of range ({len(self.output_sizes)} shards)")
        return shard_id

    def shard_start(self, i: int) -> int:
        """First row of shard i, in the checkpoint tensor of that shard, that this rank holds."""
        return self.tp_rank * self.output_sizes[i]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if getattr(param, "shard_scalar", False):  # one value per projection (a per-tensor scale)
            if shard_id is None:
                copy_weight(param.data, materialize(loaded))
            else:
                copy_weight(param.data[self.shard_index(shard_id)], materialize(loaded))
            return
        dim = getattr(param, "output_dim", None)
        if dim is None:  # no output dim: the same tensor for every projection (GPTQ's g_idx of a shared input)
            copy_weight(param.data, materialize(loaded))
            return
        if shard_id is None:  # the whole merged tensor at once (e.g. a checkpoint already merged)
            if self.tp_size == 1:
                copy_weight(param.data, materialize(loaded))
                return
            full_sizes = [packed_size(param, dim, n) for n in self.full_output_sizes]
            if tuple(loaded.shape)[dim] != sum(full_sizes):
                raise ValueError(f"shape mismatch: merged checkpoint tensor {tuple(loaded.shape)}, expected "
                                 f"{sum(full_sizes)} along dim {dim}")
            start = 0
            for i, n in enumerate(full_sizes):
                self._load_shard(param, loaded.narrow(dim, start, n), i)
                start += n
            return
        self._load_shard(param, loaded, self.shard_index(shard_id))

    def _load_shard(self, param: torch.Tensor, loaded, i: int) -> None:
        dim = param.output_dim
        n = packed_size(param, dim, self.output_sizes[i])
        if self.tp_size == 1:
            src = materialize(loaded)
        else:
            full = packed_size(param, dim, self.full_output_sizes[i])
            if tuple(loaded.shape)[dim] != full:
                raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded.shape)}, expected {full} "
                                 f"along dim {dim}")
            src = loaded.narrow(dim, packed_size(param, dim, self.shard_start(i)), n)
        copy_weight(param.data.narrow(dim, packed_size(param, dim, self.offsets[i]), n), src)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output of forward() split back into its shards (views)."""
        return y.split(self.output_sizes, dim=-1)


class QKVLinear(MergedLinear):
    """q, k, v projections as one matmul; shard ids "q", "k", "v".

    With TP, each rank holds num_heads / tp query heads and num_kv_heads / tp KV heads; when there are fewer
    KV heads than ranks, each KV head is replicated on tp / num_kv_heads ranks (each rank holds one).
    `num_heads` and `num_kv_heads` are this rank's; `total_num_heads`, `total_num_kv_heads` the model's.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        tp = get_tp_group()
        tp_size = tp.world_size
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp_size, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
        self._kv_sizes = [self.num_kv_heads * head_dim] * 2
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, dtype, device, shard_names=["q", "k", "v"],
                         quant_config=quant_config, prefix=prefix)

    def _rank_sizes(self, full: list[int]) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    def shard_start(self, i: int) -> int:
        if i == 0:
            return self.tp_rank * self.output_sizes[0]
        kv_head = self.tp_rank // self.kv_replicas * self.num_kv_heads
        return kv_head * self.head_dim
