"""When the Triton kernels are launched with programmatic dependent launch (layers/pdl.py): only CUDA tensors,
only kernels over at most PDL_MAX_ROWS tokens, only where the GPU and Triton have it, never with PAGELLM_PDL=0.
The kernels' results with it are checked on CUDA by their own tests (test_triton_ops.py, test_cuda_engine.py,
test_quantization_cuda.py: their small cases launch with PDL on an H100/H200)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from pagellm.model_executor.layers import pdl  # noqa: E402


@pytest.fixture
def gpu_with_pdl(monkeypatch):
    pdl._enabled_on.cache_clear()
    monkeypatch.setattr(pdl, "_triton_has_pdl", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    yield
    pdl._enabled_on.cache_clear()


def test_cpu_tensors_never_take_pdl():
    assert pdl.pdl_options(torch.device("cpu"), 1) == {"PDL": False}


def test_small_steps_on_hopper_take_pdl_and_large_ones_do_not(gpu_with_pdl):
    cuda = torch.device("cuda", 0)
    assert pdl.pdl_options(cuda, 1) == {"PDL": True, "launch_pdl": True}
    assert pdl.pdl_options(cuda, pdl.PDL_MAX_ROWS) == {"PDL": True, "launch_pdl": True}
    assert pdl.pdl_options(cuda, pdl.PDL_MAX_ROWS + 1) == {"PDL": False}
    assert pdl.pdl_options(torch.device("cuda"), 1)["PDL"]  # no index: the current device's


def test_the_switch_and_older_gpus_turn_it_off(gpu_with_pdl, monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv("PAGELLM_PDL", "0")
    assert pdl.pdl_options(cuda, 1) == {"PDL": False}
    pdl._enabled_on.cache_clear()
    monkeypatch.delenv("PAGELLM_PDL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))  # an A100
    assert pdl.pdl_options(cuda, 1) == {"PDL": False}
