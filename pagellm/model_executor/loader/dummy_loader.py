"""Random weights for any config (benchmarks, tests of shapes): no checkpoint is read.

Weights are drawn from N(0, initializer_range) (0.02 if the config has none), norm weights are ones; a
quantized format's tensors (packed 4-bit ints, fp8/int8 weights and their scales) are filled by the
`fill_dummy` their quant_method put on them, so that they dequantize to weights of about that spread;
everything is generated directly on the target device in the target dtype, from one seeded generator, so a
seed gives the same model on the same device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _is_norm(name: str) -> bool:
    return name.rsplit(".", 1)[0].endswith("norm")


@torch.no_grad()
def load_dummy_weights(model: nn.Module, config: Any, seed: int = 0) -> set[str]:
    """Fill every parameter of `model`; returns the names filled."""
    std = float(getattr(config, "initializer_range", None) or 0.02)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in params.items():
        fill = getattr(param, "fill_dummy", None)
        if fill is not None:
            fill(param, gen, std)
        elif _is_norm(name):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)
    # GGUF-style rope factors and similar non-parameter state keep their defaults.
    return set(params)
