"""The batch-1 W4A16 kernel at Llama-3.1-8B's four projection shapes, a few rounds, for Nsight Compute to read.

Not a timing: `gpu_check.sh ncu-gemv` runs it under `ncu`, which profiles the second round's four launches
(the first compiles them) and reports where the kernel's time goes (DRAM throughput, occupancy, warp stalls).

    ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 4 --launch-count 4 python benchmarks/w4a16_ncu.py
"""

from __future__ import annotations

import torch

from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul
from pagellm.model_executor.layers.quantization.w4a16 import pack_rows

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
GROUP = 128


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for k, n in SHAPES.values():
        qweight = pack_rows(torch.randint(0, 16, (k, n), device=dev, dtype=torch.int32, generator=g))
        scales = (torch.rand(k // GROUP, n, device=dev, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // GROUP, n), device=dev, generator=g).to(torch.bfloat16)
        x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
        cases.append((x, qweight, scales, zeros))
    for _ in range(3):
        for x, qweight, scales, zeros in cases:
            w4a16_matmul(x, qweight, scales, zeros, None, GROUP)
    torch.cuda.synchronize()
    print("w4a16 ncu: shapes " + ", ".join(f"{name} {k}->{n}" for name, (k, n) in SHAPES.items()))


if __name__ == "__main__":
    main()
