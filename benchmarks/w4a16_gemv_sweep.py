"""Batch-1 W4A16 kernels at Llama-3.1-8B's four projection shapes: the table's config against a grid of
candidates (kernel, block_n, block_k, num_warps, K tiles per program), each checked against the reference and
timed as a decode step finds it (CUDA-graph replays, L2 flushed: cuda_timing.graph_ms_cold).

Why a script of its own and not tune_kernels.py: that keeps at most 8 candidates per case; the batch-1 kernel's
grid is its split as much as its tile, so this sweeps the split per shape (K tiles per program 1, 2, 4).

    python benchmarks/w4a16_gemv_sweep.py --out DIR [--kernels gemv_rows,gemv] [--budget-s 200]

Prints one line per shape (the table's time, the best candidate and its time) and the four shapes' sum, then
writes DIR/w4a16-gemv-sweep.json with every candidate's time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.cuda_timing import graph_ms_cold
from pagellm.model_executor.layers.quantization import w4a16_configs
from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul
from pagellm.model_executor.layers.quantization.w4a16 import pack_rows, w4a16_reference

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # K, N
GROUP = 128
# kernel -> (block_n, num_warps) tiles, block_k values, K tiles per program
GRID = {
    "gemv_rows": ([(128, 1), (256, 2), (64, 1), (256, 1), (512, 2), (128, 2)], [128, 64, 32], [1, 2, 4]),
    "gemv": ([(256, 4), (128, 2), (256, 2), (512, 4)], [128, 64], [1, 2, 4]),
}


def candidates(kernel: str, k: int) -> list[dict]:
    tiles, block_ks, per_program = GRID[kernel]
    out = []
    for block_n, warps in tiles:
        for block_k in block_ks:
            for per in per_program:
                split = max(1, k // block_k // per)
                out.append({"kernel": kernel, "block_m": 1, "block_n": block_n, "block_k": block_k, "split_k": split,
                            "num_warps": warps, "num_stages": 1})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kernels", default="gemv_rows,gemv")
    parser.add_argument("--budget-s", type=float, default=200.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    total_table = total_best = 0.0
    for name, (k, n) in SHAPES.items():
        qweight = pack_rows(torch.randint(0, 16, (k, n), device=dev, dtype=torch.int32, generator=g))
        scales = (torch.rand(k // GROUP, n, device=dev, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // GROUP, n), device=dev, generator=g).to(torch.bfloat16)
        x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
        ref = w4a16_reference(x, qweight, scales, zeros, None, GROUP).float()
        scale = ref.abs().max().item()
        table = w4a16_configs.w4a16_config(1, k, n)
        cands = [table] + [c for kern in args.kernels.split(",") for c in candidates(kern, k)]
        rows = []
        for config in cands:
            row = {"config": config}
            rows.append(row)
            if time.monotonic() > deadline:
                row["error"] = "not run (time budget spent)"
                continue
            fn = lambda: w4a16_matmul(x, qweight, scales, zeros, None, GROUP, config=config)  # noqa: E731
            try:
                err = (fn().float() - ref).abs().max().item()
                if not err <= 1e-2 * scale:
                    row["error"] = f"wrong: max abs error {err:.3g} (scale {scale:.3g})"
                    continue
                row["us"] = 1000.0 * graph_ms_cold(fn)
            except Exception as e:  # a config the compiler refuses: left out
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        timed = [r for r in rows if "us" in r]
        best = min(timed, key=lambda r: r["us"]) if timed else None
        report["shapes"][name] = {"k": k, "n": n, "rows": rows, "table_us": rows[0].get("us"),
                                  "best": best}
        wrong = [r for r in rows if r.get("error", "").startswith("wrong")]
        if rows[0].get("us") and best:
            total_table += rows[0]["us"]
            total_best += best["us"]
        c = best["config"] if best else {}
        print(f"w4a16 gemv {name:<8} {k}->{n:<6} table {rows[0].get('us', float('nan')):6.1f} us  best "
              f"{best['us'] if best else float('nan'):6.1f} us ({c.get('kernel')} n{c.get('block_n')} "
              f"k{c.get('block_k')} w{c.get('num_warps')} split {c.get('split_k')})  {len(timed)} timed, "
              f"{len(wrong)} wrong", flush=True)
        top = sorted(timed, key=lambda r: r["us"])[:5]
        for r in top:
            c = r["config"]
            print(f"    {r['us']:6.1f} us  {c['kernel']} n{c['block_n']} k{c['block_k']} w{c['num_warps']} "
                  f"split {c['split_k']}")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "w4a16-gemv-sweep.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(f"w4a16 gemv sum of the four shapes: table {total_table:.1f} us, best {total_best:.1f} us")


if __name__ == "__main__":
    main()
