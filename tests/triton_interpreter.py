"""Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1), for the tests of machines without a
GPU. Skipped when triton is not installed (CI has none) and when CUDA is here (the compiled kernels are tested
there instead; Triton 3.6's interpreter also fails under numpy >= 2.3, which the GPU machines have)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Iterator

import pytest
import torch


# Modules of @triton.jit helpers that kernel modules import (a helper decorated under the interpreter cannot be
# called by a compiled kernel, nor the other way round): imported afresh with the kernel module, and dropped after.
JIT_HELPER_MODULES = ("pagellm.model_executor.layers.pdl",)


def _drop(module: str) -> None:
    sys.modules.pop(module, None)
    parent, _, child = module.rpartition(".")
    if parent in sys.modules and hasattr(sys.modules[parent], child):
        delattr(sys.modules[parent], child)  # (`from parent import child` reads the attribute first)


@contextlib.contextmanager
def interpreted(module: str) -> Iterator[ModuleType]:
    """`module` imported afresh with TRITON_INTERPRET=1 (Triton reads it when a kernel is decorated and when it
    is launched), with the jit helpers it imports; afterwards the variable is restored and the modules dropped,
    so that no other test sees interpreted kernels."""
    if importlib.util.find_spec("triton") is None:  # (not imported here: it must see the variable first)
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the compiled kernel is tested instead")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for name in (module, *JIT_HELPER_MODULES):
        _drop(name)
    try:
        yield importlib.import_module(module)
    finally:
        for name in (module, *JIT_HELPER_MODULES):
            _drop(name)
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
