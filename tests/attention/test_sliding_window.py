"""Sliding-window attention on the CPU: torch_ref against a naive dense softmax with an explicit window mask.

The Triton kernels' window is checked on the GPU only (test_triton_attention.py, ids with `-win`): under
Triton 3.6's CPU interpreter the paged kernel does not run at all, window or not, because the interpreter
hands program ids and int arguments over as one-element arrays and the kernel's `range(kv_lo, kv_hi, TILE_N)`
cannot turn them into ints (TypeError: only 0-dimensional arrays can be converted to Python scalars)."""

from __future__ import annotations

import pytest
import torch

from pagellm.attention.backends import torch_ref
from tests.attention.test_triton_attention import make_meta


def naive_attention(q, keys, values, positions, window, scale):
    """q [L, Hq, D] at `positions` over keys/values [S, Hk, D] at positions 0..S-1, float64, explicit mask."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    key_pos = torch.arange(keys.shape[0])[None, :]
    visible = (key_pos <= positions[:, None]) & (key_pos > positions[:, None] - window)
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [1, 5, 16, 100])
def test_torch_ref_window_matches_naive(window):
    """One decode, a fresh prompt and a chunk over a cached prefix in one batch; window below and above them."""
    gen = torch.Generator().manual_seed(window)
    bs, hk, group, d = 16, 2, 2, 32
    q_lens, ctx_lens = [1, 23, 9], [40, 0, 30]
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    contexts = [torch.randn(2, s, hk, d, generator=gen) for s in seq_lens]  # each request's full K/V
    width = max(-(-s // bs) for s in seq_lens)
    cache = torch.zeros(2, 1 + width * len(seq_lens), bs, hk, d)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    slots, new_k, new_v = [], [], []
    for r, (q_len, c, s) in enumerate(zip(q_lens, ctx_lens, seq_lens)):
        ids = list(range(1 + r * width, 1 + (r + 1) * width))
        tables[r] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(s):
            if pos < c:  # cached before this step
                cache[:, ids[pos // bs], pos % bs] = contexts[r][:, pos]
            else:
                slots.append(ids[pos // bs] * bs + pos % bs)
        new_k.append(contexts[r][0, c:])
        new_v.append(contexts[r][1, c:])
    t = sum(q_lens)
    q = torch.randn(t, hk * group, d, generator=gen)
    meta = make_meta(q_lens, seq_lens, tables, torch.tensor(slots), 1, bs, t)
    out = torch_ref.forward(q, torch.cat(new_k), torch.cat(new_v), cache, meta, d**-0.5, sliding_window=window)
    start = 0
    for r, (q_len, c, s) in enumerate(zip(q_lens, ctx_lens, seq_lens)):
        ref = naive_attention(q[start:start + q_len], contexts[r][0], contexts[r][1], torch.arange(c, s), window,
                              d**-0.5)
        torch.testing.assert_close(out[start:start + q_len].double(), ref, atol=1e-5, rtol=0)
        start += q_len
