"""Round-to-nearest (RTN) quantization of float weights into the published checkpoint formats.

Not a quantizer for production (GPTQ and AWQ choose their values with calibration data; RTN only rounds), but
the tensors it writes are laid out exactly as AutoGPTQ, AutoAWQ and llm-compressor write theirs, so a model
quantized here loads through the same code as a downloaded one. The tests make their tiny checkpoints with it
and benchmarks/quant_quality.py quantizes the embedded SmolLM2.

Each function takes a linear weight w [N, K] (HF layout: out x in) and returns the checkpoint tensors and the
float weight they dequantize to (the reference a quantized model is compared with).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from pagellm.model_executor.layers.quantization.awq import AWQ_ORDER
from pagellm.model_executor.layers.quantization.w4a16 import PACK
from pagellm.model_executor.layers.quantization.w8a8 import FP8, quantize_per_row

MAXQ = 15  # 4-bit


def _pack(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] ints in 0..15 -> [...] int32: field i in bits 4i..4i+3 (two's complement when bit 31 is set)."""
    word = torch.zeros(fields.shape[:-1], dtype=torch.int64)
    for i in range(PACK):
        word |= fields[..., i].long() << (4 * i)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def _group_params(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of each row of w [rows, G], as GPTQ's quantizer finds them (fp16 scales)."""
    if sym:
        xmax = w.abs().amax(dim=1)
        xmin = -xmax
    else:
        xmin = w.amin(dim=1).clamp(max=0)
        xmax = w.amax(dim=1).clamp(min=0)
    scale = ((xmax - xmin) / MAXQ).clamp(min=1e-8).half().float()
    zero = torch.full_like(scale, (MAXQ + 1) // 2) if sym else torch.round(-xmin / scale).clamp(0, MAXQ)
    return scale, zero


def gptq_quantize(w: torch.Tensor, group_size: int = 128, sym: bool = True,
                  perm: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ tensors (qweight, qzeros, scales, g_idx) of w [N, K], and the float32 weight they stand for.

    perm (act-order): the order in which input channels fill the groups; channel perm[j] is in group j // G."""
    n, k = w.shape
    g = group_size if group_size != -1 else k
    order = perm if perm is not None else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    wt = w.float().t()  # [K, N]
    groups = -(-k // g)
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n)
    for i in range(groups):
        scales[i], zeros[i] = _group_params(wt[order[i * g:(i + 1) * g]].t(), sym)
    s, z = scales[g_idx.long()], zeros[g_idx.long()]
    q = torch.clamp(torch.round(wt / s) + z, 0, MAXQ)
    deq = ((q - z) * s).t().contiguous()
    tensors = {
        "qweight": _pack(q.long().reshape(k // PACK, PACK, n).transpose(1, 2)),  # k = 8 * row + i
        "qzeros": _pack((zeros.long() - 1).reshape(groups, n // PACK, PACK)),  # v1: stored minus one
        "scales": scales.half(),
        "g_idx": g_idx,
    }
    return tensors, deq


def awq_quantize(w: torch.Tensor, group_size: int = 128) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AWQ GEMM tensors (qweight, qzeros, scales) of w [N, K] with zero points, and the float32 weight."""
    n, k = w.shape
    g = group_size if group_size != -1 else k
    wt = w.float().t()  # [K, N]
    scales, zeros = _group_params(wt.reshape(k // g, g, n).permute(0, 2, 1).reshape(-1, g), sym=False)
    scales, zeros = scales.reshape(k // g, n), zeros.reshape(k // g, n)
    s, z = scales.repeat_interleave(g, 0), zeros.repeat_interleave(g, 0)
    q = torch.clamp(torch.round(wt / s) + z, 0, MAXQ)
    deq = ((q - z) * s).t().contiguous()
    order = torch.tensor(AWQ_ORDER)

    def pack_awq(v: torch.Tensor) -> torch.Tensor:  # field i of element c holds column 8c + AWQ_ORDER[i]
        return _pack(v.long().reshape(v.shape[0], n // PACK, PACK)[:, :, order])

    return {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales.half()}, deq


def w8a8_quantize(w: torch.Tensor, qdtype: torch.dtype, strategy: str = "channel"
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors tensors (weight, weight_scale) of w [N, K] in fp8 or int8, and the float32 weight."""
    if strategy == "channel":
        q, scale = quantize_per_row(w, qdtype)
    else:
        q, scale = quantize_per_row(w.reshape(1, -1), qdtype)
        q, scale = q.reshape(w.shape), scale.reshape(1)
    return {"weight": q, "weight_scale": scale}, q.float() * scale.reshape(-1, 1)


# Decoder linear weights, by their HF names: what quantize_state_dict turns into a format's tensors.
LINEAR_WEIGHT = re.compile(r"^(.*\.layers\.(\d+)\.(?:self_attn|mlp)\.\w+_proj)\.weight$")


def quantization_config(method: str, **opts: Any) -> dict[str, Any]:
    """The quantization_config a checkpoint of that method carries in its config.json."""
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": opts.get("group_size", 128),
                "desc_act": opts.get("act_order", False), "sym": opts.get("sym", True), "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts.get("group_size", 128), "zero_point": True,
                "version": "gemm"}
    kind = "float" if opts.get("qdtype", FP8) == FP8 else "int"
    strategy = opts.get("strategy", "channel")
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if kind == "float" else "int-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": kind, "symmetric": True, "strategy": strategy, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "token",
                                  "dynamic": True},
        }},
        "ignore": list(opts.get("ignore") or ["lm_head"]),
        "quantization_status": "compressed",
    }


def quantize_state_dict(state: dict[str, torch.Tensor], method: str, seed: int = 0, **opts: Any
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(checkpoint tensors, float tensors they dequantize to) of a model's state dict, every decoder linear
    weight quantized with `method` (gptq, awq, compressed-tensors); the rest passes through.

    GPTQ act-order (`act_order=True`) draws one random channel order per layer and input size, so q/k/v (and
    gate/up), which read the same input, share their g_idx as in a real checkpoint."""
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    perms: dict[tuple[str, int], torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        match = LINEAR_WEIGHT.match(name)
        if match is None:
            quantized[name] = dequantized[name] = tensor
            continue
        module, layer = match.group(1), match.group(2)
        if method == "gptq":
            perm = None
            if opts.get("act_order"):
                key = (layer, tensor.shape[1])
                perm = perms.setdefault(key, torch.randperm(tensor.shape[1], generator=gen))
            tensors, deq = gptq_quantize(tensor, opts.get("group_size", 128), opts.get("sym", True), perm)
        elif method == "awq":
            tensors, deq = awq_quantize(tensor, opts.get("group_size", 128))
        elif method == "compressed-tensors":
            tensors, deq = w8a8_quantize(tensor, opts.get("qdtype", FP8), opts.get("strategy", "channel"))
        else:
            raise ValueError(f"quantization: RTN writes gptq, awq or compressed-tensors, not {method!r}")
        for key, value in tensors.items():
            quantized[f"{module}.{key}"] = value
        dequantized[name] = deq.to(tensor.dtype)
    return quantized, dequantized
