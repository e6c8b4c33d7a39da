"""Programmatic dependent launch (PDL) for the Triton kernels of a forward pass, on Hopper GPUs and later.

Why: at batch 1 a decode step of an 8B model is about 350 kernels of a few microseconds each, and between two
kernels the GPU waits while the second one's blocks are launched (8% of a 4-bit batch-1 step on an H200: the
profile's busy share was 92%). A kernel launched with PDL has its blocks put on the SMs while the kernel before
it still runs; each block's first act is `gdc_wait`, which returns once the earlier kernel has finished and its
writes are visible, and then it lets the next kernel launch (`gdc_launch_dependents`). Nothing is read or written
before the wait, so the results are the same bits as without PDL; only the launch overlaps.

Only for kernels over at most PDL_MAX_ROWS tokens: there the launch is a large share of a short kernel (an H200,
llama8b, 4-bit weights, batch 1: 363 -> 388 tokens/s, `pagellm bench latency --quantization gptq`), while with
PDL on every kernel, llama8b-mixed (steps of up to 8192 tokens) ran the same in bf16 and 3% slower with fp8
weights (10,517 -> 10,160 output tokens/s): a long kernel gains nothing from an earlier launch, and the blocks
launched early sit on the SMs while the kernel before them (there cuBLAS's fp8 GEMMs) still runs.

A kernel takes `PDL: tl.constexpr` and calls `pdl_prologue(PDL)` first; its launch adds
`**pdl_options(device, rows)`. Off on CPU tensors (Triton's interpreter), before Hopper, with a Triton that lacks
PDL, and with PAGELLM_PDL=0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off, and the branch below is never compiled
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait for the kernel before it, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _triton_has_pdl() -> bool:
    if gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=None)
def _enabled_on(index: int) -> bool:
    if os.environ.get("PAGELLM_PDL", "1") == "0" or not _triton_has_pdl():
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


PDL_MAX_ROWS = 16


def pdl_options(device: torch.device, rows: int) -> dict:
    """The kernel's PDL constant and launch option, for a kernel over `rows` tokens on `device`."""
    if device.type != "cuda" or rows > PDL_MAX_ROWS:
        return {"PDL": False}
    on = _enabled_on(device.index if device.index is not None else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
