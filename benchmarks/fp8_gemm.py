"""Where the time of an fp8 W8A8 linear goes on CUDA, against the bf16 linear of the same shape.

For the Llama-3.1-8B projections and several token counts: the median time (CUDA events) of bf16
`F.linear`, of the per-token activation quantization alone, of `torch._scaled_mm` with row-wise scales (what
pagellm runs above FP8_UNSCALED_MAX_OUTPUTS) and with one scale per tensor (cuBLASLt's native fp8 form), of the
unscaled cuBLASLt GEMM into float32 followed by the Triton rescale (what pagellm runs up to
FP8_UNSCALED_MAX_OUTPUTS: "unscaled+rescale"), and of the whole `w8a8_linear`, each
as CUDA-graph replays (GPU time, as in the engine's decode graphs; eager calls add ~30 us of launch each).
Prints a table; writes JSON with --out. Not a test: it explains the end-to-end figure of `gpu_check.sh quant`.

    python benchmarks/fp8_gemm.py --out fp8-gemm.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.cuda_timing import graph_ms
from pagellm.model_executor.layers.quantization.triton_quant import rescale_rows_cols_triton
from pagellm.model_executor.layers.quantization.w8a8 import FP8, quantize_activations, quantize_per_row, w8a8_linear

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
TOKENS = [1, 16, 64, 128, 256, 512, 1024, 4096]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    print(f"{'shape':8} {'M':>5} {'bf16':>7} {'quant':>7} {'rowwise':>8} {'tensor':>7} {'unscaled+rescale':>16} "
          f"{'w8a8':>7} {'bf16/w8a8':>9}")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_per_row(w, FP8)
        ws = ws.reshape(1, -1).contiguous()
        one = torch.ones((), device=dev)
        for m in TOKENS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_activations(x, FP8)
            t = {
                "bf16": graph_ms(lambda: F.linear(x, w)),
                "quant": graph_ms(lambda: quantize_activations(x, FP8)),
                "rowwise": graph_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws,
                                                            out_dtype=torch.bfloat16)),
                "tensor": graph_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                           out_dtype=torch.bfloat16)),
                "unscaled_rescale": graph_ms(lambda: rescale_rows_cols_triton(
                    torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32), xs, ws,
                    torch.bfloat16)),
                "w8a8": graph_ms(lambda: w8a8_linear(x, wq, ws, None)),
            }
            rows.append({"shape": name, "tokens": m, **{f"{key}_ms": v for key, v in t.items()}})
            print(f"{name:8} {m:5d} {t['bf16']:7.3f} {t['quant']:7.3f} {t['rowwise']:8.3f} {t['tensor']:7.3f} "
                  f"{t['unscaled_rescale']:16.3f} {t['w8a8']:7.3f} {t['bf16'] / t['w8a8']:9.2f}x")
    total = {key: sum(r[f"{key}_ms"] for r in rows)
             for key in ("bf16", "w8a8", "rowwise", "tensor", "unscaled_rescale", "quant")}
    print(f"fp8 gemm: all shapes and token counts, bf16/w8a8 {total['bf16'] / total['w8a8']:.2f}x, "
          f"bf16/rowwise {total['bf16'] / total['rowwise']:.2f}x, bf16/tensorwise {total['bf16'] / total['tensor']:.2f}x, "
          f"bf16/unscaled+rescale {total['bf16'] / total['unscaled_rescale']:.2f}x, "
          f"quantization {100 * total['quant'] / total['w8a8']:.0f}% of w8a8")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
