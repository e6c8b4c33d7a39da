"""Pieces the model classes share for pipeline parallelism."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class PPMissingLayer(nn.Module):
    """Stands where a module of another pipeline stage would be: no parameters, keeps the names' indices."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("this module lives on another pipeline stage")


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: the hidden states and the residual stream, both [T, H]."""

    hidden: torch.Tensor
    residual: torch.Tensor
