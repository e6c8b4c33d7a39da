"""Instructions per weight in the W4A16 kernels' main loop, from their sm_90 SASS, compiled without a GPU.

Why: the small-M W4A16 kernels are bound by instructions as much as by bytes (at batch 1 an H200 streams a 4-bit
weight in about the time of 3 to 4 instructions per weight), and the machine this project is written on has no
GPU. Triton compiles for a target it is given and ships ptxas and cuobjdump, so the loop's instruction count is
visible here: the count between the loop's backward branch and its target, divided by the weights one thread
handles per iteration.

    python benchmarks/kernel_sass.py fma 1 128 128 4      # kernel block_m block_n block_k num_warps
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile

# The launch's divisibility specializations (torch tensors and these sizes are multiples of 16 on the 8B shapes).
_DIVISIBLE = ("N", "K", "group_size", "k_per_split", "stride_xm", "stride_qk", "stride_sg", "stride_ps", "stride_om")
_SIGNATURE = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "g_ptr": "*i32",
              "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
              "group_size": "i32", "k_per_split": "i32", "split": "i32", "stride_xm": "i32", "stride_qk": "i32",
              "stride_sg": "i32", "stride_ps": "i32", "stride_om": "i32"}


def loop_profile(kernel: str, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int = 3,
                 group_per_tile: bool = True) -> tuple[float, collections.Counter]:
    """(instructions per weight in the K loop, the loop's opcode counts) of a W4A16 kernel for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton_w4a16 = importlib.import_module("pagellm.model_executor.layers.quantization.triton_w4a16")
    consts = dict(HAS_GIDX=False, GROUP_PER_TILE=group_per_tile, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_K=block_k, FIXUP=True, PDL=False)
    if kernel in ("gemv", "gemv_rows"):
        consts.update(BF16_PAIRS=True, STAGES=num_stages)  # x is bfloat16 in this signature; the loop's depth
    if kernel == "gemv_rows":
        consts.update(EVEN_N=True)  # the 8B shapes' N are multiples of every block_n
    signature = {**_SIGNATURE, **{name: "constexpr" for name in consts}}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in _DIVISIBLE}
    compiled = triton.compile(ASTSource(triton_w4a16._KERNELS[kernel], signature, consts, attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                         "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    pattern = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[\w.]+)?(?:\s+0x([0-9a-f]+))?")
    lines = [m for m in map(pattern.match, sass.splitlines()) if m]
    start = end = None
    for m in lines:  # the first backward branch closes the K loop
        if m.group(2) == "BRA" and m.group(4) and int(m.group(4), 16) < int(m.group(1), 16):
            start, end = int(m.group(4), 16), int(m.group(1), 16)
            break
    if start is None:
        raise RuntimeError("no loop found in the SASS")
    ops = collections.Counter(m.group(2) + (m.group(3) or "") for m in lines if start <= int(m.group(1), 16) <= end)
    weights_per_thread = block_n * block_k / (32 * num_warps)  # each weight of the tile is unpacked once
    return sum(ops.values()) / weights_per_thread, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=["fma", "gemv", "gemv_rows", "mma", "gemm"])
    for name in ("block_m", "block_n", "block_k", "num_warps"):
        parser.add_argument(name, type=int)
    parser.add_argument("--num-stages", type=int, default=3)
    args = parser.parse_args()
    per_weight, ops = loop_profile(args.kernel, args.block_m, args.block_n, args.block_k, args.num_warps,
                                   args.num_stages)
    print(f"{args.kernel} block_m {args.block_m} block_n {args.block_n} block_k {args.block_k} "
          f"warps {args.num_warps}: {per_weight:.2f} SASS instructions per weight in the K loop")
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
