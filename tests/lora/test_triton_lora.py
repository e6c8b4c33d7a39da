"""The Triton batched-LoRA kernels (shrink, expand) against torch: under the Triton interpreter on the CPU
(when triton is installed), and compiled on CUDA (skipped without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.lora.kernel_cases import SHAPES, SLICED, check, check_slices


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the compiled kernels are checked instead (Triton "
                    "3.6's interpreter fails under numpy >= 2.3, which the GPU machines have)")
def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "tests.lora.kernel_cases"], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lora kernels ok" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_kernels_on_cuda(dtype, rtol):
    # The expand rounds u to the weights' dtype (float32 dots stay float32: input_precision "ieee").
    # Then Llama-8B's shapes (qkv, gate_up, down, o) at decode and prefill batch sizes.
    shapes = [(1, 4096, 6144, 48, 8), (256, 4096, 28672, 32, 8), (300, 14336, 4096, 16, 8),
              (3000, 4096, 4096, 16, 3)]
    assert check("cuda", dtype, rtol) + check("cuda", dtype, rtol, shapes) == len(SHAPES) + len(shapes)
    assert check_slices("cuda", dtype, rtol) == len(SLICED)
