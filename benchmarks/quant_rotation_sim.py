"""Would rotating the activations let W8A8 keep SmolLM2-135M's quality? A CPU simulation (issue 15's quality
targets: top-1 agreement >= 0.90, mean absolute logprob difference < 0.1, on quant_quality.py's text).

Not the engine: transformers' float32 model of the embedded GGUF, with every decoder linear replaced by a fake-
quantized one (weights per output channel, activations per token, round to nearest, fp8 e4m3 or int8: the grid of
layers/quantization/w8a8.py). Its plain W8A8 figures match the engine's (`quant_quality.py`) to about 0.01, so
the simulation stands in for what a checkpoint in that form would give. Variants (QuaRot-style):

- R1: an orthogonal rotation of the residual stream, folded into the weights offline (RMSNorm weights folded into
  the linears that read them first; embeddings E Q, readers W Q, writers Q^T W, the LM head untied): the float
  model is unchanged, but the inputs of q/k/v and gate/up lose their outlier channels.
- R2: an online rotation of down_proj's input (W R2 offline, x R2 at run time), dense or block-diagonal (one
  random orthogonal block repeated; a block of 128 costs 128 multiply-adds per input channel and token).

    python benchmarks/quant_rotation_sim.py [--seeds 3] [--out benchmarks/results/cpu-quant-rotation-sim.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant_quality import TARGETS, TEXT  # noqa: E402

from pagellm.model_executor.loader.source import default_model_path  # noqa: E402

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def fake_quant_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x on the per-row W8A8 grid (scale = max|row| / qmax), back in float32."""
    qmax = 448.0 if kind == "fp8" else 127.0
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-10)
    v = x / scale
    v = v.round().clamp(-127, 127) if kind == "int8" else v.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return v * scale


class FakeW8A8(torch.nn.Module):
    """y = q(x R) q(W R)^T: W8A8 with an optional online rotation R of the input (None: none)."""

    def __init__(self, linear: torch.nn.Linear, kind: str, rotation: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.rotation = kind, rotation
        w = linear.weight.data if rotation is None else linear.weight.data @ rotation
        self.weight, self.bias = fake_quant_rows(w, kind), linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = x @ self.rotation
        shape = x.shape
        x = fake_quant_rows(x.reshape(-1, shape[-1]), self.kind).reshape(shape)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def quantized(model, kind: str, down_rotation: torch.Tensor | None = None, keep: tuple[str, ...] = ()):
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for block, names in ((layer.self_attn, ATTN), (layer.mlp, MLP)):
            for name in names:
                if name not in keep:
                    rot = down_rotation if name == "down_proj" else None
                    setattr(block, name, FakeW8A8(getattr(block, name), kind, rot))
    return model


@torch.no_grad()
def rotate_residual(model, q: torch.Tensor):
    """R1, folded offline; the function the model computes is unchanged (up to float32 rounding)."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for norm, block, readers in ((layer.input_layernorm, layer.self_attn, ATTN[:3]),
                                     (layer.post_attention_layernorm, layer.mlp, MLP[:2])):
            g = norm.weight.data.clone()
            norm.weight.data.fill_(1.0)
            for name in readers:
                lin = getattr(block, name)
                lin.weight.data = (lin.weight.data * g[None, :]) @ q
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.weight.data = q.t() @ lin.weight.data
            if lin.bias is not None:
                lin.bias.data = q.t() @ lin.bias.data
    g = model.model.norm.weight.data.clone()
    model.model.norm.weight.data.fill_(1.0)
    head = (model.lm_head.weight.data * g[None, :]) @ q  # untied: the final norm's weight is in it
    model.model.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.data @ q, requires_grad=False)
    model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return model


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (q * torch.sign(torch.diagonal(r))).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="random rotations tried (each variant, each seed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    target = ids[0, 1:, None]

    def logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0, :-1].float(), -1)

    ref = logprobs(base)

    def score(model) -> dict:
        lp = logprobs(model)
        return {"top1_agreement": round((lp.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
                "mean_abs_logprob_diff": round((lp.gather(1, target) - ref.gather(1, target)).abs().mean().item(), 4)}

    hidden, inter = base.config.hidden_size, base.config.intermediate_size
    rows = []
    for kind in ("fp8", "int8"):
        rows.append({"variant": f"{kind} plain", "seed": None, **score(quantized(base, kind))})
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        rotated = rotate_residual(base, orthogonal(hidden, gen))
        if seed == 0:
            rows.append({"variant": "float32 after R1 (no quantization)", "seed": seed, **score(rotated)})
        block = orthogonal(128, gen)
        r2_block = torch.block_diag(*[block] * (inter // 128))
        for kind in ("fp8", "int8"):
            rows.append({"variant": f"{kind} R1", "seed": seed, **score(quantized(rotated, kind))})
            rows.append({"variant": f"{kind} R1 + R2 block 128", "seed": seed,
                         **score(quantized(rotated, kind, r2_block))})
        rows.append({"variant": "int8 R1, down_proj in float", "seed": seed,
                     **score(quantized(rotated, "int8", keep=("down_proj",)))})
        rows.append({"variant": "int8 R1 + R2 dense", "seed": seed,
                     **score(quantized(rotated, "int8", orthogonal(inter, gen)))})
    for r in rows:
        ok = (r["top1_agreement"] >= TARGETS["top1_agreement_min"]
              and r["mean_abs_logprob_diff"] < TARGETS["mean_abs_logprob_diff_max"])
        print(f"{r['variant']:<40} seed {str(r['seed']):>4}  top-1 {r['top1_agreement']:.3f}  "
              f"diff {r['mean_abs_logprob_diff']:.3f}{'  (meets both)' if ok else ''}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": name, "tokens": ids.shape[1], "targets": TARGETS, "time": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
