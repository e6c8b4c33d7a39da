"""(name, tensor) pairs from the *.safetensors of an HF model folder, one tensor at a time."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(folder: str) -> list[str]:
    """The checkpoint files: those the index names when there is one (sharded), else every *.safetensors."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} in {folder} names shards that are not there: {', '.join(missing)}")
        return [os.path.join(folder, name) for name in files]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        others = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(sorted(others))}: only safetensors checkpoints are supported)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
    return files


class LazySafetensor:
    """A checkpoint tensor not read yet: `narrow` reads only the slice asked for (a tensor-parallel rank's
    shard), `materialize` the whole tensor. Valid only while the iteration is on its file."""

    def __init__(self, f, name: str) -> None:
        self._f = f
        self.name = name
        self._slice = f.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        dim = dim % len(self.shape)
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]

    def materialize(self) -> torch.Tensor:
        return self._f.get_tensor(self.name)


def iterate_safetensors_weights(folder: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields each tensor of the checkpoint as it is read (memory-mapped), never the whole state dict.

    lazy=True (tensor/pipeline parallelism) yields LazySafetensor instead: a rank reads only its shards, and
    nothing of the layers of other pipeline stages.
    """
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (LazySafetensor(f, name) if lazy else f.get_tensor(name))
