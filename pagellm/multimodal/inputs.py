"""What an image becomes on its way to the engine core: a MultiModalFeature (msgspec, so it crosses the process
boundaries with the request, never as a pickle).

A feature holds the processed tensors of one image (pixel values, and for some models a grid shape) as raw bytes
+ dtype + shape, where its placeholder tokens sit in the prompt (`offset`, `length`), and a content hash. The
hash goes into the prefix-cache key of every KV block the image's tokens occupy, so two different images never
share blocks while the same image (and text) hits the cache.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

import msgspec

if TYPE_CHECKING:  # torch is imported where tensors are made: the scheduler (core/) imports this file too
    import torch

# The dtypes a feature's tensors may travel in (names as torch spells them) -> numpy's (bfloat16 travels as int16).
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "int16", "int64": "int64", "int32": "int32",
           "uint8": "uint8"}


class TensorData(msgspec.Struct, array_like=True):
    """A tensor as bytes: what msgpack can carry."""

    data: bytes
    dtype: str
    shape: list[int]

    @classmethod
    def from_tensor(cls, t: "torch.Tensor") -> "TensorData":
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"a multimodal tensor of dtype {name} cannot be sent to the engine")
        return cls(_raw_bytes(t), name, list(t.shape))

    def to_tensor(self) -> "torch.Tensor":
        import numpy as np
        import torch

        np_dtype = _DTYPES.get(self.dtype)
        if np_dtype is None:
            raise ValueError(f"a multimodal tensor of dtype {self.dtype!r} is not supported")
        t = torch.from_numpy(np.frombuffer(self.data, dtype=np_dtype).copy())
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.reshape(self.shape)


def _raw_bytes(t: "torch.Tensor") -> bytes:
    """A tensor's bytes (bfloat16 through an int16 view: numpy has no bfloat16)."""
    import torch

    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


class MultiModalFeature(msgspec.Struct, array_like=True):
    """One image of a prompt: its tensors, its placeholder span in the prompt token ids, its content hash."""

    modality: str  # "image"
    offset: int  # index of the image's first placeholder token in the prompt
    length: int  # number of placeholder tokens (the rows of its embeddings)
    hash: str  # hex digest of the processed tensors
    tensors: dict[str, TensorData]  # e.g. {"pixel_values": ...} (Qwen2-VL adds "image_grid_thw")

    @property
    def end(self) -> int:
        return self.offset + self.length

    def torch_tensors(self) -> dict[str, "torch.Tensor"]:
        return {name: t.to_tensor() for name, t in self.tensors.items()}


def content_hash(tensors: dict[str, "torch.Tensor"]) -> str:
    """sha256 over the processed tensors (names, dtypes, shapes and bytes): equal hashes mean equal inputs to
    the vision encoder."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def make_feature(modality: str, offset: int, length: int, tensors: dict[str, "torch.Tensor"]) -> MultiModalFeature:
    return MultiModalFeature(modality, offset, length, content_hash(tensors),
                             {name: TensorData.from_tensor(t) for name, t in tensors.items()})


def block_mm_keys(features: Sequence[MultiModalFeature], start: int, end: int) -> tuple[Any, ...]:
    """The (hash, offset) of every image whose placeholder tokens overlap positions [start, end): part of that
    block's prefix-cache key."""
    return tuple((f.hash, f.offset) for f in features if f.offset < end and f.end > start)


def check_features(features: Any, num_prompt_tokens: int) -> None:
    """The core's admission check of a request's features (ValueError naming the field)."""
    if not isinstance(features, list):
        raise ValueError("mm_features must be a list")
    last_end = 0
    for f in features:
        if not isinstance(f, MultiModalFeature):
            raise ValueError("mm_features: each entry must be a MultiModalFeature")
        if f.offset < last_end or f.length < 1 or f.end > num_prompt_tokens:
            raise ValueError(f"mm_features: the image span [{f.offset}, {f.end}) is outside the prompt or overlaps "
                             "another")
        last_end = f.end
