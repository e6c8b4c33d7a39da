"""One summary line for a bf16 / quantized benchmark pair (benchmarks/gpu_check.sh quant):

    python benchmarks/quant_ratio.py throughput|latency BASE.json QUANT.json TARGET
"""

from __future__ import annotations

import json
import sys


def tokens_per_s(kind: str, path: str) -> float:
    with open(path) as f:
        result = json.load(f)
    if kind == "latency":
        return float(result["output_tokens_per_s"])
    return float(result["pagellm"]["output_tokens_per_s"])


def main() -> None:
    kind, base, quant, target = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    try:
        b, q = tokens_per_s(kind, base), tokens_per_s(kind, quant)
    except (OSError, KeyError, ValueError) as e:
        print(f"quant {kind} ratio: missing result ({type(e).__name__}: {e})")
        return
    ratio = q / b
    print(f"quant {kind} ratio: {q:,.1f} / {b:,.1f} output tokens/s = {ratio:.2f}x (target >= {target}x: "
          f"{'met' if ratio >= target else 'NOT met'})")


if __name__ == "__main__":
    main()
