"""Weight quantization: which format a model's linear layers use, chosen from the engine option
`quantization` and the checkpoint's own `quantization_config` (config.json).

    fp8                 float checkpoint -> fp8 e4m3 weights per channel at load; fp8 activations per token
    int8                float checkpoint -> int8 weights per channel at load; int8 activations per token
    compressed-tensors  FP8 or INT8 W8A8 checkpoints as llm-compressor writes them
    gptq                4-bit GPTQ checkpoints (group size any multiple of 8 or -1, act-order or not)
    awq                 4-bit AWQ checkpoints (GEMM packing, with zero points)

base.py is the seam every linear layer goes through; w8a8.py and w4a16.py the two kinds of compute.
"""

from __future__ import annotations

from typing import Any, Optional

from pagellm.model_executor.layers.quantization.base import QuantizationConfig

QUANTIZATION_METHODS = ("fp8", "int8", "compressed-tensors", "gptq", "awq")
ONLINE_METHODS = ("fp8", "int8")  # quantize a float checkpoint at load
CHECKPOINT_METHODS = ("compressed-tensors", "gptq", "awq")  # read a checkpoint quantized in that format


def checkpoint_quantization(hf_config: Any) -> Optional[dict[str, Any]]:
    """The checkpoint's quantization_config as a dict, or None for a float checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def resolve_quantization(quantization: Optional[str], hf_config: Any) -> Optional[str]:
    """The method to use: the option, checked against what the checkpoint says it is; None for float."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {quantization!r}")
    qc = checkpoint_quantization(hf_config)
    if qc is None:
        return quantization
    found = str(qc.get("quant_method", "")).lower()
    if found not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization: the checkpoint's quantization_config names {found!r}, which pagellm cannot "
                         f"load (it loads {', '.join(CHECKPOINT_METHODS)})")
    if quantization is None or quantization == found:
        return found
    raise ValueError(f"quantization={quantization!r} was asked for, but the checkpoint is quantized with {found!r} "
                     f"(its config.json's quantization_config): leave quantization unset or pass {found!r}")


def get_quant_config(quantization: Optional[str], hf_config: Any, load_format: str = "auto"
                     ) -> Optional[QuantizationConfig]:
    """The QuantizationConfig the model's layers are built with, or None (float)."""
    from pagellm.model_executor.layers.quantization.awq import AWQConfig
    from pagellm.model_executor.layers.quantization.compressed_tensors import (
        CompressedTensorsConfig,
        OnlineW8A8Config,
    )
    from pagellm.model_executor.layers.quantization.gptq import GPTQConfig

    name = resolve_quantization(quantization, hf_config)
    if name is None:
        return None
    if name in ONLINE_METHODS:
        return OnlineW8A8Config(name)
    qc = checkpoint_quantization(hf_config)
    if qc is None:
        if name != "compressed-tensors" and load_format == "dummy":
            # Random weights of the common layout (4-bit, group 128, no act-order): for benchmarks.
            return GPTQConfig() if name == "gptq" else AWQConfig()
        raise ValueError(f"quantization={name!r} needs a checkpoint quantized in that format (a quantization_config "
                         f"in its config.json); 'fp8' and 'int8' quantize a float checkpoint at load")
    classes = {"compressed-tensors": CompressedTensorsConfig, "gptq": GPTQConfig, "awq": AWQConfig}
    return classes[name].from_dict(qc)


__all__ = ["QUANTIZATION_METHODS", "QuantizationConfig", "checkpoint_quantization", "get_quant_config",
           "resolve_quantization"]
