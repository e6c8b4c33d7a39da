"""The fused MoE Triton kernel against the unfused torch loop (torch_moe.py) on one MoE layer, CUDA only.

For each layer shape and token count: the median time of `fused_experts` and of `fused_experts_torch` (CUDA
events, after warm-up), their ratio, and the largest difference of the outputs relative to the output's
scale (bf16). Prints one line per case and a summary line; writes JSON with --out.

    python benchmarks/moe_kernel.py --out results.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.cuda_timing import events_ms

from pagellm.model_executor.layers.fused_moe import select_experts
from pagellm.model_executor.layers.fused_moe.torch_moe import fused_experts_torch
from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

# name -> (experts, top_k, hidden, expert intermediate)
SHAPES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
TOKENS = [1, 16, 64, 256, 1024, 4096]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype, device = torch.bfloat16, "cuda"
    rows = []
    for name, (experts, top_k, hidden, inter) in SHAPES.items():
        g = torch.Generator(device=device).manual_seed(0)
        w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype, generator=g) * hidden**-0.5
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=g) * inter**-0.5
        for tokens in TOKENS:
            x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
            weights, ids = select_experts(torch.randn(tokens, experts, device=device, generator=g), top_k, True)
            fused = fused_experts(x, w13, w2, weights, ids)
            loop = fused_experts_torch(x, w13, w2, weights, ids)
            err = ((fused.float() - loop.float()).abs().max() / loop.float().abs().max()).item()
            t_fused = events_ms(lambda: fused_experts(x, w13, w2, weights, ids), args.repeats)
            t_loop = events_ms(lambda: fused_experts_torch(x, w13, w2, weights, ids), args.repeats)
            row = {"shape": name, "tokens": tokens, "fused_ms": t_fused, "loop_ms": t_loop,
                   "speedup": t_loop / t_fused, "max_rel_err": err}
            rows.append(row)
            print(f"{name:<14} tokens {tokens:>5}  fused {t_fused:8.3f} ms  loop {t_loop:8.3f} ms  "
                  f"{row['speedup']:6.2f}x  rel err {err:.1e}", flush=True)
    worst = min(rows, key=lambda r: r["speedup"])
    print(f"moe kernel: fused/loop speedup {min(r['speedup'] for r in rows):.2f}x .. "
          f"{max(r['speedup'] for r in rows):.2f}x (slowest case {worst['shape']} x{worst['tokens']}), "
          f"max rel err {max(r['max_rel_err'] for r in rows):.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
                       "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
