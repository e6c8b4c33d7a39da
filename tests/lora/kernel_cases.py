"""The batched-LoRA kernels against torch on random data of several shapes: run by test_triton_lora.py on CUDA,
and as `python -m tests.lora.kernel_cases` under TRITON_INTERPRET=1 on the CPU (the interpreter is chosen when
triton decorates the kernels, so it needs a fresh process)."""

from __future__ import annotations

import sys

import torch

# (tokens, in, out, slices * rank, adapters): decode batches, a prefill, ragged sizes, one adapter, and a long
# input over few tokens (the shrink splits K: partial sums added atomically)
SHAPES = [(1, 64, 96, 16, 2), (7, 48, 80, 24, 3), (33, 128, 64, 48, 4), (70, 96, 200, 8, 1), (3, 1000, 40, 16, 2)]


def reference(x, a, b, slots):
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32, device=x.device)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            y[t] = (x[t].float() @ a[s].float().T) @ b[s].float().T
    return y


def check(device: str, dtype: torch.dtype, rtol: float, shapes=SHAPES) -> int:
    """Max error relative to the largest output (at least 1), per shape; returns the shapes checked."""
    from pagellm.lora.triton_lora import lora_expand_, lora_shrink, slot_order

    gen = torch.Generator().manual_seed(0)
    for t, k, n, r, num in shapes:
        x = torch.randn(t, k, generator=gen).to(device, dtype)
        a = (torch.randn(num, r, k, generator=gen) * 0.2).to(device, dtype)
        b = (torch.randn(num, n, r, generator=gen) * 0.2).to(device, dtype)
        slots = torch.randint(-1, num, (t,), generator=gen).to(device, torch.int32)
        base = torch.randn(t, n, generator=gen).to(device, dtype)
        y = base.clone()
        order = slot_order(slots, num)
        lora_expand_(y, lora_shrink(x, a, slots, order), b, slots, order)
        want = base.float() + reference(x, a, b, slots)
        err = (y.float() - want).abs().max().item() / max(1.0, want.abs().max().item())
        if err > rtol:
            raise AssertionError(f"shape {(t, k, n, r, num)} {dtype}: relative error {err:.2e} > {rtol}")
        untouched = slots < 0
        if not torch.equal(y[untouched], base[untouched]):
            raise AssertionError("tokens of the base model (slot -1) were changed")
    return len(shapes)


# (tokens, in, output slices, rank per slice, adapters): merged qkv- and gate_up-like layers, whose B is block
# diagonal (each slice's rows use only its own rank columns), the layout the expand exploits
SLICED = [(40, 64, [256, 128, 128], 16, 3), (9, 96, [128, 128], 8, 2)]


def check_slices(device: str, dtype: torch.dtype, rtol: float) -> int:
    from pagellm.lora.triton_lora import lora_expand_, lora_shrink, slot_order

    gen = torch.Generator().manual_seed(1)
    for t, k, sizes, r, num in SLICED:
        x = torch.randn(t, k, generator=gen).to(device, dtype)
        a = (torch.randn(num, len(sizes) * r, k, generator=gen) * 0.2).to(device, dtype)
        b = torch.zeros(num, sum(sizes), len(sizes) * r)
        for i, size in enumerate(sizes):
            rows = slice(sum(sizes[:i]), sum(sizes[:i]) + size)
            b[:, rows, i * r:(i + 1) * r] = torch.randn(num, size, r, generator=gen) * 0.2
        b = b.to(device, dtype)
        slots = torch.randint(-1, num, (t,), generator=gen).to(device, torch.int32)
        order = slot_order(slots, num)
        y = torch.zeros(t, sum(sizes), device=device, dtype=dtype)
        lora_expand_(y, lora_shrink(x, a, slots, order), b, slots, order, sizes)
        want = reference(x, a, b, slots)
        err = (y.float() - want).abs().max().item() / max(1.0, want.abs().max().item())
        if err > rtol:
            raise AssertionError(f"sliced {(t, k, sizes, r, num)} {dtype}: relative error {err:.2e} > {rtol}")
    return len(SLICED)


if __name__ == "__main__":
    print(f"lora kernels ok: {check('cpu', torch.float32, 1e-4) + check_slices('cpu', torch.float32, 1e-4)} shapes")
    sys.exit(0)
