"""compressed-tensors checkpoints (llm-compressor): FP8 and INT8 W8A8 with dynamic per-token activations.

config.json's quantization_config names schemes in `config_groups`; each says how `weights` and
`input_activations` are quantized. Supported here: 8-bit symmetric weights (float -> fp8 e4m3, int -> int8),
one scale per output channel (`strategy: channel`, weight_scale [N, 1]) or per tensor (`tensor`, one scalar
per checkpoint projection), with activations quantized per token at run time (`dynamic: true, strategy:
token`) in the same type. Layers named in `ignore` (names or "re:REGEX", the checkpoint's module names; a
merged qkv/gate-up layer when all its projections are) stay in float. Anything else is refused by name.
pagellm's own `pagellm_input_rotation` entry (from `pagellm quantize --rotate`) names layers whose input is
rotated at run time by their checkpoint's `input_rotation` block before it is quantized.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from pagellm.model_executor.layers.quantization.base import UNQUANTIZED, LinearMethod, QuantizationConfig
from pagellm.model_executor.layers.quantization.w8a8 import FP8, W8A8LinearMethod


def _refuse(what: str) -> ValueError:
    return ValueError(f"quantization: this compressed-tensors checkpoint uses {what}, which pagellm does not "
                      f"support (8-bit symmetric weights per channel or tensor, dynamic per-token activations)")


# Our merged layers -> the checkpoint projections they hold (an `ignore` list names the checkpoint's modules).
MERGED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def name_is_ignored(ignore: list[str], name: str) -> bool:
    """`name` (a module name, e.g. "model.layers.0.mlp.down_proj") is in the ignore list: equal to an entry, or
    fully matched by an entry "re:REGEX" (llm-compressor's convention)."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.fullmatch(entry[3:], name):
                return True
        elif entry == name:
            return True
    return False


def layer_is_ignored(ignore: list[str], prefix: str) -> bool:
    """Whether the layer `prefix` stays in float. A merged layer (qkv_proj, gate_up_proj) is ignored when the
    checkpoint projections it holds all are; only some of them is a ValueError naming `ignore`, since they are
    computed as one matmul in one format."""
    if name_is_ignored(ignore, prefix):
        return True
    parent, _, last = prefix.rpartition(".")
    shards = MERGED_SHARDS.get(last)
    if shards is None:
        return False
    names = [f"{parent}.{shard}" if parent else shard for shard in shards]
    hits = [name_is_ignored(ignore, n) for n in names]
    if any(hits) and not all(hits):
        raise ValueError(f"ignore: {', '.join(n for n, h in zip(names, hits) if h)} stay in float but "
                         f"{', '.join(n for n, h in zip(names, hits) if not h)} do not; pagellm computes "
                         f"{' and '.join(shards)} as one layer, so ignore all of them or none")
    return all(hits)


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, qdtype: torch.dtype, weight_strategy: str, ignore: list[str],
                 rotation: Optional[dict[str, Any]] = None) -> None:
        self.qdtype = qdtype
        self.weight_strategy = weight_strategy
        self.ignore = list(ignore)
        self.rotation = rotation  # ROTATION_KEY's entry: {"block_size": B, "targets": [names or "re:REGEX"]}

    @classmethod
    def from_dict(cls, qc: dict[str, Any]) -> "CompressedTensorsConfig":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            raise _refuse("no config_groups")
        schemes = {repr((g.get("weights"), g.get("input_activations"))) for g in groups}
        if len(schemes) > 1:
            raise _refuse("several schemes in one model")
        group = groups[0]
        targets = group.get("targets") or []
        if targets != ["Linear"]:
            raise _refuse(f"targets {targets}")
        w, a = group.get("weights") or {}, group.get("input_activations")
        kind = w.get("type")
        if w.get("num_bits") != 8 or kind not in ("float", "int") or not w.get("symmetric", True):
            raise _refuse(f"weights {w}")
        if w.get("dynamic"):
            raise _refuse("dynamic weight scales")
        strategy = w.get("strategy", "tensor")
        if strategy not in ("channel", "tensor"):
            raise _refuse(f"weight strategy {strategy!r}")
        if a is None:
            raise _refuse("weight-only 8-bit quantization (no input_activations)")
        if (a.get("num_bits") != 8 or a.get("type") != kind or not a.get("dynamic")
                or a.get("strategy") != "token" or not a.get("symmetric", True)):
            raise _refuse(f"input_activations {a} (only dynamic per-token is supported)")
        return cls(FP8 if kind == "float" else torch.int8, strategy, qc.get("ignore") or [],
                   _check_rotation(qc.get(ROTATION_KEY)))

    def is_ignored(self, prefix: str) -> bool:
        return layer_is_ignored(self.ignore, prefix)

    def linear_method(self, prefix: str) -> LinearMethod:
        if self.is_ignored(prefix):
            return UNQUANTIZED
        rotated = self.rotation is not None and name_is_ignored(self.rotation["targets"], prefix)
        return W8A8LinearMethod(self.qdtype, serialized=True, weight_strategy=self.weight_strategy,
                                rotation_block=self.rotation["block_size"] if rotated else None)


# pagellm's own entry in quantization_config (written by `pagellm quantize --rotate`; not llm-compressor's): the
# layers whose input the engine rotates at run time by the checkpoint's `input_rotation` block before quantizing.
ROTATION_KEY = "pagellm_input_rotation"


def _check_rotation(entry: Any) -> Optional[dict[str, Any]]:
    if entry is None:
        return None
    block, targets = (entry.get("block_size"), entry.get("targets")) if isinstance(entry, dict) else (None, None)
    if (isinstance(block, bool) or not isinstance(block, int) or block < 2 or not isinstance(targets, list)
            or not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"quantization: {ROTATION_KEY} must be {{'block_size': int >= 2, 'targets': [names]}}; "
                         f"got {entry!r}")
    return {"block_size": block, "targets": list(targets)}


class OnlineW8A8Config(QuantizationConfig):
    """quantization="fp8" or "int8" on a float checkpoint (safetensors or the dequantized GGUF): every linear
    layer's weight is quantized per output channel once, after loading."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.qdtype: Optional[torch.dtype] = {"fp8": FP8, "int8": torch.int8}[name]

    def linear_method(self, prefix: str) -> LinearMethod:
        return W8A8LinearMethod(self.qdtype, serialized=False)
