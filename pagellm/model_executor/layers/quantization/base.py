"""The `quant_method` seam: how a linear layer's weights are made, loaded, prepared and multiplied.

Every linear layer (layers/linear.py) owns one method object:

- `create_weights(layer, ...)` registers the tensors this format keeps in a checkpoint (a float `weight`; or
  `qweight`/`qzeros`/`scales`/`g_idx`; or an fp8/int8 `weight` and its `weight_scale`). Each parameter is
  tagged with which of its dims is the layer's input dim and which its output dim (`input_dim`,
  `output_dim`), and for a packed dim how many values one element holds (`packed_dim`, `pack_factor`).
  A parameter holding one value per merged projection (a per-tensor scale) is tagged `shard_scalar`. The
  layer's `weight_loader` reads only these tags to cut a tensor-parallel rank's slice or a merged
  projection's rows, so sharding and the loaders work unchanged whatever the method.
- `process_weights_after_loading(layer)` turns the loaded tensors into what `apply` wants, once (quantize a
  float weight, unpack and repack 4-bit weights, lay out scales).
- `apply(layer, x, bias)` computes y = x W^T (+ bias) in x's dtype.

A parameter may carry `fill_dummy(param, generator, std)` (load_format="dummy": random weights of the
format, with sane scales) and `has_default = True` (the checkpoint may omit it, e.g. GPTQ's trivial g_idx).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def make_param(layer: nn.Module, name: str, shape: Sequence[int], dtype: torch.dtype, device, **attrs: Any
               ) -> nn.Parameter:
    """An uninitialized, frozen parameter registered on `layer`, with the loader tags in `attrs`."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    for key, value in attrs.items():
        setattr(param, key, value)
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    """Swap a parameter for a new tensor after loading (another dtype or layout): the old storage is freed."""
    delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


class LinearMethod:
    """Base of the methods; also the float (unquantized) one's interface.

    `input_quant_dtype`: where a method quantizes its input per token (W8A8), the 8-bit dtype; the norm or
    activation before such a layer may then hand `apply` its output already quantized (a
    w8a8.QuantizedActivations), saving a pass over it. None: `apply` takes the activations as they are."""

    input_quant_dtype: Optional[torch.dtype] = None

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], full_input_size: int,
                       dtype: torch.dtype, device) -> None:
        """`input_size`, `output_sizes`: this rank's (output_sizes one per merged projection);
        `full_input_size`: the checkpoint's input size (differs from input_size in a row-parallel layer)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """A float weight [out, in] and F.linear: exactly the layers as they were before the seam."""

    def create_weights(self, layer, input_size, output_sizes, full_input_size, dtype, device) -> None:
        make_param(layer, "weight", (sum(output_sizes), input_size), dtype, device, input_dim=1, output_dim=0)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedLinearMethod()


class QuantizationConfig:
    """One checkpoint format or on-the-fly scheme. Subclasses set `name` and build their method for a layer."""

    name: str = ""

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named `prefix` (e.g. "model.layers.0.self_attn.qkv_proj")."""
        raise NotImplementedError

    def check_dtype(self, dtype: torch.dtype, device: str) -> None:
        """ValueError naming `quantization` when the method cannot run with these activations."""
