"""Rotations for W8A8 int8 (QuaRot-style): spread the activations' outlier channels before per-token rounding.

int8's per-token error is absolute (a row's largest value sets its step), so a token with a few huge channels
loses its small ones. An orthogonal Q leaves a linear layer's function unchanged, y = (x Q)(W Q)^T, while x Q
spreads those channels over all of them. Two of them, on a checkpoint's state dict under HF names:

- R1, on the residual stream, folded offline: every RMSNorm's weight goes into the linears that read its output
  (norm weights become 1, so the norm commutes with Q); the embeddings become E Q, the readers of the stream
  (q/k/v, gate/up, the LM head) W Q, its writers (o_proj, down_proj) Q^T W. The LM head is written untied,
  since it carries the final norm's weight and the embeddings do not. Nothing runs at inference time.
- R2, on down_proj's input (silu(gate) * up, which no norm precedes), at run time: one random orthogonal block B
  (block_size x block_size) repeated along the input, folded into down_proj's weight offline (W R2) and applied
  to x by the engine before quantizing (`x.view(..., -1, block) @ B`; the checkpoint holds B as
  `...down_proj.input_rotation`). A block of 128 costs 128 multiply-adds per input value and token.

On the embedded SmolLM2-135M (benchmarks/quant_rotation_sim.py, then benchmarks/quant_quality.py on the real
checkpoint) both together take int8 W8A8 on every linear layer past the quality targets without calibration;
fp8, whose error is relative, gets worse under rotation, and quantize_model refuses it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

ROTATABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
INPUT_ROTATION = "input_rotation"  # the tensor name of R2's block on each down_proj

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.input_layernorm\.weight$")


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random n x n orthogonal matrix (float64 QR of a Gaussian one, signs fixed), float32."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r))).float()


def check_rotation_args(block_size: Any, config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in ROTATABLE_MODEL_TYPES:
        raise ValueError(f"rotate: rotations know the layers of {', '.join(ROTATABLE_MODEL_TYPES)}, not "
                         f"{model_type!r}; quantize without --rotate")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"rotate: the block size must be an integer >= 2; got {block_size!r}")
    if config.intermediate_size % block_size:
        raise ValueError(f"rotate: the block size {block_size} must divide the MLP's width "
                         f"{config.intermediate_size}")


def rotate_state_dict(state: dict[str, torch.Tensor], config: Any, block_size: int = 128, seed: int = 0
                      ) -> dict[str, torch.Tensor]:
    """A copy of the float state dict with R1 folded in and R2 folded into each down_proj (its block added as
    `...down_proj.input_rotation`). With R2 applied to down_proj's input at run time, the model computes the same
    function; `lm_head.weight` is always present (untied)."""
    check_rotation_args(block_size, config)
    gen = torch.Generator().manual_seed(seed)
    q = random_orthogonal(config.hidden_size, gen)
    block = random_orthogonal(block_size, gen)
    r2 = torch.block_diag(*[block] * (config.intermediate_size // block_size))
    state = dict(state)

    def fold(name: str, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
             col_scale: torch.Tensor | None = None) -> None:
        w = state[name]
        x = w.float()
        if col_scale is not None:
            x = x * col_scale[None, :]
        if right is not None:
            x = x @ right
        if left is not None:
            x = left @ x
        state[name] = x.to(w.dtype)

    def take_norm(name: str) -> torch.Tensor:
        g = state[name].float()
        state[name] = torch.ones_like(state[name])
        return g

    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    layers = sorted({m.group(1) for name in state if (m := _LAYER.match(name))})
    if not layers:
        raise ValueError("rotate: no decoder layers named *.layers.N.input_layernorm in the checkpoint")
    for layer in layers:
        attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        for norm, parent, readers in ((f"{layer}.input_layernorm", attn, ("q_proj", "k_proj", "v_proj")),
                                      (f"{layer}.post_attention_layernorm", mlp, ("gate_proj", "up_proj"))):
            g = take_norm(f"{norm}.weight")
            for r in readers:
                if f"{parent}.{r}.weight" not in state:
                    raise ValueError(f"rotate: {parent}.{r}.weight is missing (a fused projection?)")
                fold(f"{parent}.{r}.weight", right=q, col_scale=g)
        for writer in (f"{attn}.o_proj", f"{mlp}.down_proj"):
            fold(f"{writer}.weight", left=q.t())
            if f"{writer}.bias" in state:
                fold(f"{writer}.bias", left=q.t())
        fold(f"{mlp}.down_proj.weight", right=r2)
        state[f"{mlp}.down_proj.{INPUT_ROTATION}"] = block.clone()
    g = take_norm("model.norm.weight")
    state["lm_head.weight"] = ((head.float() * g[None, :]) @ q).to(head.dtype)
    fold("model.embed_tokens.weight", right=q)
    return state


def rotated_float_model(config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' float32 model of a rotated state dict, computing what the engine will: LM head untied, and
    each down_proj's input rotated by its block (a forward pre-hook), e.g. for GPTQ's calibration Hessians."""
    from pagellm.model_executor.layers.quantization.w8a8 import rotate_blocks
    from pagellm.quantize.calibration import hf_float_model

    untied = copy.deepcopy(config)
    untied.tie_word_embeddings = False
    model = hf_float_model(untied, state)
    for name, module in model.named_modules():
        block = state.get(f"{name}.{INPUT_ROTATION}")
        if block is not None:
            module.register_forward_pre_hook(lambda mod, args, b=block.float(): (rotate_blocks(args[0], b),))
    return model
