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


def iterate_safetensors_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields each tensor of the checkpoint as it is read (memory-mapped), never the whole state dict."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
