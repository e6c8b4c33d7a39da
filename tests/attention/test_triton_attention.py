"""The Triton paged-attention backend against torch_ref, on random data of many shapes (CUDA only).

Every case builds a paged cache whose block tables are random permutations of blocks, poisons with NaN every
cache slot no request may read (unowned blocks, the tail of each last block, and the slots this step's tokens
are about to be written to), runs triton_attn.forward, and checks:
- the output against torch_ref.forward run in float32 on the same cache contents (NaNs zeroed for it);
- the cache bytes: exactly the original with this step's K/V at slot_mapping (padded tokens, slot -1, write
  nothing).
Case ids start with shardN_ so that a GPU run can split them over processes: pytest -k shard0_ ...
Set PAGELLM_ATTN_ERRLOG=path to append each case's max errors there as JSON lines.

FP8 KV-cache cases (`kv_fp8`, ids with `-kv8-`) store the cache in float8 e4m3 with a K and a V scale of their
own; the reference is torch_ref in float32 over the dequantized cache (stored * scale) and the dequantized new
K/V, so it never goes through the FP8 read path under test. Their cache bytes must be torch's own quantization
(x / scale, saturated, round to nearest even) of this step's K/V; a value exactly between two e4m3 codes may
round either way (at most one code apart, on at most 0.1% of the written bytes).

Sliding-window cases (`window`, ids with `-win`): the same checks with a per-layer window (a query at position
i sees keys > i - window), windows shorter and longer than the contexts, on every path (decode, split-KV
decode, prefill, chunked).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass

import pytest
import torch

from pagellm.attention import fp8_kv
from pagellm.attention.backends import torch_ref
from pagellm.attention.metadata import AttentionMetadata

pytestmark = pytest.mark.cuda

NUM_SHARDS = 4
TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # atol = rtol


@dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]  # per request; the first num_decodes are 1
    ctx_lens: tuple[int, ...]  # cached prefix per request
    num_decodes: int
    block_size: int
    num_kv_heads: int
    group: int
    head_dim: int
    dtype: torch.dtype
    pad_tokens: int = 0  # extra flat tokens with slot -1 (CUDA-graph style padding)
    seed: int = 0
    kv_fp8: bool = False  # the cache in float8 e4m3 with the scales below (dtype is then q's)
    k_scale: float = 1.0
    v_scale: float = 1.0
    window: int | None = None  # sliding-window attention


def _decodes(rng: random.Random, n: int, max_ctx: int) -> tuple[list[int], list[int]]:
    return [1] * n, [rng.randrange(0, max_ctx) for _ in range(n)]


def _chunks(rng: random.Random, n: int, max_q: int, max_ctx: int) -> tuple[list[int], list[int]]:
    q = [rng.randint(1, max_q) for _ in range(n)]
    c = [rng.choice([0, rng.randrange(0, max_ctx)]) for _ in range(n)]
    return q, c


def _build_cases() -> list[Case]:
    rng = random.Random(1234)
    dt_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    cases: list[Case] = []

    def add(kind, q, c, nd, bs, hk, g, d, dt, pad=0, fp8_scales=None):
        kv = "-kv8" if fp8_scales else ""
        name = f"{kind}-bs{bs}-hk{hk}-g{g}-d{d}-{dt_name[dt]}{kv}-n{len(q)}-maxs{max(a + b for a, b in zip(q, c))}"
        ks, vs = fp8_scales or (1.0, 1.0)
        cases.append(Case(name, tuple(q), tuple(c), nd, bs, hk, g, d, dt, pad, seed=len(cases),
                          kv_fp8=fp8_scales is not None, k_scale=ks, v_scale=vs))

    combos = list(itertools.product([16, 32], [1, 2, 4, 8], [64, 128, 256], [torch.bfloat16, torch.float16]))
    for i, (bs, g, d, dt) in enumerate(combos):
        hk = rng.choice([1, 2]) if d == 256 else rng.choice([1, 2, 4, 8])
        # Mixed batch with long-ish contexts: few decodes -> split-KV decode path, plus prefill chunks.
        dq, dc = _decodes(rng, rng.randint(1, 6), 3000)
        pq, pc = _chunks(rng, rng.randint(1, 4), 300, 2000)
        add("mixed", dq + pq, dc + pc, len(dq), bs, hk, g, d, dt)
        kind = i % 3
        if kind == 0:  # many short decodes: the one-program-per-(request, KV head) decode path
            q, c = _decodes(rng, rng.randint(8, 40), 500)
            add("decode", q, c, len(q), bs, hk, g, d, dt)
        elif kind == 1:  # fresh prompts only
            q = [rng.randint(1, 400) for _ in range(rng.randint(1, 5))]
            add("prefill", q, [0] * len(q), 0, bs, hk, g, d, dt)
        else:  # prefill chunks over cached prefixes, with padded tokens at the end
            q, c = _chunks(rng, rng.randint(1, 4), 200, 4000)
            c = [x or rng.randint(1, 64) for x in c]
            add("chunked", q, c, 0, bs, hk, g, d, dt, pad=rng.randint(1, 9))

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # Long contexts, Llama-8B-like heads (8 KV heads, group 4, D 128) and others.
    add("long-decode", [1], [32767], 1, 16, 8, 4, 128, bf16)
    add("long-decode", [1, 1, 1], [32000, 17000, 5], 3, 16, 8, 4, 128, bf16)
    add("long-mixed", [1, 1, 384], [20000, 7, 31000], 2, 16, 8, 4, 128, bf16)
    q, c = _decodes(rng, 64, 8192)
    add("long-decode-wide", q, c, 64, 16, 8, 4, 128, bf16)
    add("long-prefill", [4096], [0], 0, 32, 8, 4, 128, bf16)
    add("long-decode", [1, 1], [16383, 9000], 2, 32, 1, 8, 256, fp16)
    add("long-chunk", [1024], [12000], 0, 32, 8, 1, 64, bf16)
    # Odd shapes: non-power-of-two GQA ratios, block size 64, D 32, single token prefill requests.
    add("odd-group3", [1, 1, 57, 200], [900, 3, 0, 700], 2, 16, 2, 3, 128, bf16)
    add("odd-group6", [1, 33], [2500, 100], 1, 32, 1, 6, 64, fp16)
    add("odd-bs64", [1, 1, 1, 70], [1000, 4000, 63, 129], 3, 64, 2, 4, 128, bf16)
    add("odd-d32", [1, 1, 100], [600, 50, 30], 2, 16, 4, 2, 32, fp16)
    add("odd-q1-prefills", [1, 1, 1], [10, 0, 300], 0, 16, 2, 4, 64, bf16)
    # float32 (IEEE dots): tight tolerance.
    add("fp32-mixed", [1, 1, 90, 17], [700, 2000, 0, 300], 2, 16, 2, 4, 64, fp32)
    add("fp32-mixed", [1, 130], [1500, 40], 1, 32, 1, 8, 128, fp32)
    add("fp32-decode", [1] * 20, [rng.randrange(0, 400) for _ in range(20)], 20, 16, 4, 1, 128, fp32)
    add("fp32-mixed", [1, 1, 40], [900, 33, 100], 2, 32, 1, 2, 256, fp32)
    _add_fp8_cases(random.Random(4321), add)
    cases += window_cases()
    return cases


def window_cases() -> list[Case]:
    """Sliding-window cases: every kernel path with windows below, around and above the contexts."""
    rng = random.Random(777)
    out: list[Case] = []
    bf16, fp32 = torch.bfloat16, torch.float32

    def add(kind, q, c, nd, bs, hk, g, d, dt, window, pad=0):
        name = f"{kind}-bs{bs}-hk{hk}-g{g}-d{d}-win{window}-n{len(q)}-maxs{max(a + b for a, b in zip(q, c))}"
        out.append(Case(name, tuple(q), tuple(c), nd, bs, hk, g, d, dt, pad, seed=9000 + len(out), window=window))

    for window in (1, 7, 64, 512, 4096):
        for dt in (bf16, fp32):
            dq, dc = _decodes(rng, rng.randint(1, 6), 3000)
            pq, pc = _chunks(rng, rng.randint(1, 4), 300, 2000)
            add("win-mixed", dq + pq, dc + pc, len(dq), 16, rng.choice([1, 2, 4]), rng.choice([1, 2, 4]),
                rng.choice([64, 128, 256]), dt, window)
            q, c = _decodes(rng, rng.randint(8, 40), 1000)
            add("win-decode", q, c, len(q), 32, 2, 4, 128, dt, window)
            q, c = _chunks(rng, rng.randint(1, 4), 400, 3000)
            add("win-chunked", q, c, 0, 16, 1, 4, 256, dt, window, pad=rng.randint(0, 5))
    add("win-long-decode", [1, 1], [32000, 600], 2, 16, 1, 4, 256, bf16, 512)  # split-KV within the window
    add("win-long-prefill", [2048], [0], 0, 16, 1, 4, 256, bf16, 512)
    return out


def _add_fp8_cases(rng: random.Random, add) -> None:
    """FP8 KV-cache cases: every path of the kernels (decode, split-KV decode, prefill, chunked, padded tokens,
    odd groups and head dims) with scales that are 1.0, small (new K/V saturate at +-448) or large (most of
    them round to e4m3's subnormals)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    scale_choices = [(1.0, 1.0), (0.004, 0.01), (0.37, 2.5), (40.0, 0.05)]
    combos = itertools.product([16, 32], [1, 4, 8], [64, 128, 256], [bf16, fp16])
    for i, (bs, g, d, dt) in enumerate(combos):
        hk = rng.choice([1, 2]) if d == 256 else rng.choice([1, 2, 4, 8])
        # Mixed batch: few decodes (split-KV) with prefill chunks; then many short decodes, or chunked prefills
        # over cached prefixes with padded tokens.
        dq, dc = _decodes(rng, rng.randint(1, 6), 3000)
        pq, pc = _chunks(rng, rng.randint(1, 4), 300, 2000)
        add("mixed", dq + pq, dc + pc, len(dq), bs, hk, g, d, dt, fp8_scales=rng.choice(scale_choices))
        if i % 2 == 0:
            q, c = _decodes(rng, rng.randint(8, 40), 500)
            add("decode", q, c, len(q), bs, hk, g, d, dt, fp8_scales=rng.choice(scale_choices))
        else:
            q, c = _chunks(rng, rng.randint(1, 4), 200, 4000)
            add("chunked", q, [x or rng.randint(1, 64) for x in c], 0, bs, hk, g, d, dt, pad=rng.randint(1, 9),
                fp8_scales=rng.choice(scale_choices))
    add("long-decode", [1], [32767], 1, 16, 8, 4, 128, bf16, fp8_scales=(0.5, 0.5))
    add("long-mixed", [1, 1, 384], [20000, 7, 31000], 2, 16, 8, 4, 128, bf16, fp8_scales=(0.02, 0.3))
    q, c = _decodes(rng, 64, 8192)
    add("long-decode-wide", q, c, 64, 16, 8, 4, 128, bf16, fp8_scales=(1.0, 1.0))
    add("long-prefill", [4096], [0], 0, 32, 8, 4, 128, bf16, fp8_scales=(0.1, 0.1))
    add("odd-group3", [1, 1, 57, 200], [900, 3, 0, 700], 2, 16, 2, 3, 128, bf16, fp8_scales=(0.37, 2.5))
    add("odd-bs64", [1, 1, 1, 70], [1000, 4000, 63, 129], 3, 64, 2, 4, 128, fp16, fp8_scales=(1.0, 1.0))
    add("odd-d32", [1, 1, 100], [600, 50, 30], 2, 16, 4, 2, 32, bf16, fp8_scales=(0.004, 0.01))
    add("fp32-mixed", [1, 1, 90, 17], [700, 2000, 0, 300], 2, 16, 2, 4, 64, fp32, fp8_scales=(0.37, 2.5))
    add("fp32-decode", [1] * 20, [rng.randrange(0, 400) for _ in range(20)], 20, 16, 4, 1, 128, fp32,
        fp8_scales=(40.0, 0.05))


ALL_CASES = _build_cases()
CASE_IDS = [f"shard{i % NUM_SHARDS}_{c.name}" for i, c in enumerate(ALL_CASES)]


def make_meta(q_lens, seq_lens, block_tables, slot_mapping, num_decodes, block_size, num_tokens, max_seq_len=None):
    device = block_tables.device
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    return AttentionMetadata(
        num_actual_tokens=num_tokens,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        max_query_len=max(q_lens),
        max_seq_len=max_seq_len if max_seq_len is not None else max(seq_lens),
        num_decodes=num_decodes,
        block_size=block_size,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
    )


def run_case(case: Case, device: str, forward, poison: bool = True) -> dict:
    """Build the case on device, run forward, compare with torch_ref; returns the errors (asserts inside).
    poison=False leaves random values where NaNs would go (for torch_ref itself, whose padded decode gathers
    read those slots and whose masked SDPA turns a NaN there into a NaN output)."""
    gen = torch.Generator().manual_seed(case.seed)
    bs, hk, d, dt = case.block_size, case.num_kv_heads, case.head_dim, case.dtype
    hq = hk * case.group
    seq_lens = [q + c for q, c in zip(case.q_lens, case.ctx_lens)]
    n_blocks = [-(-s // bs) for s in seq_lens]
    num_blocks = 1 + sum(n_blocks) + 5  # block 0 is the padding block of the tables; a few stay unowned
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(n_blocks) + 2
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    cache = torch.randn((2, num_blocks, bs, hk, d), generator=gen)  # float32 until poisoned, then the cache dtype
    owned = torch.zeros(num_blocks, dtype=torch.bool)
    owned[0] = True
    slots: list[int] = []
    at = 0
    for r, (q, c, s, nb) in enumerate(zip(case.q_lens, case.ctx_lens, seq_lens, n_blocks)):
        ids = perm[at:at + nb]
        at += nb
        tables[r, :nb] = torch.tensor(ids, dtype=torch.int32)
        owned[ids] = True
        for pos in range(c, nb * bs if poison else c):  # this step's slots and the last block's tail: poison
            cache[:, ids[pos // bs], pos % bs] = float("nan")
        slots += [ids[pos // bs] * bs + pos % bs for pos in range(c, s)]
    if poison:
        cache[:, ~owned] = float("nan")
    scales = torch.tensor([case.k_scale, case.v_scale]) if case.kv_fp8 else None
    cache = quantize_planes(cache, scales) if case.kv_fp8 else cache.to(dt)
    t = len(slots)
    tp = t + case.pad_tokens
    qkv = torch.randn((tp, (hq + 2 * hk) * d), generator=gen).to(dt)  # fused projection: q/k/v are strided
    q = qkv[:, :hq * d].view(tp, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tp, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tp, hk, d)
    slot_mapping = torch.tensor(slots + [-1] * case.pad_tokens, dtype=torch.int64)
    scale = d ** -0.5

    # What the cache holds after the step: this step's K/V at their slots (quantized, for an FP8 cache).
    new_k, new_v = k[:t], v[:t]
    if case.kv_fp8:
        new_k, new_v = fp8_kv.quantize(new_k, scales[0]), fp8_kv.quantize(new_v, scales[1])
    expected_cache = cache.clone()
    expected_cache[0].view(-1, hk, d)[slot_mapping[:t]] = new_k
    expected_cache[1].view(-1, hk, d)[slot_mapping[:t]] = new_v
    # The reference runs on the same device (faster than the CPU for long cases), in float32, on what the cache
    # stands for (an FP8 cache dequantized; its new K/V as the cache will hold them).
    ref_cache = dequantize_planes(cache, scales).nan_to_num(0.0).to(device)
    ref_meta = make_meta(case.q_lens, seq_lens, tables.to(device), slot_mapping[:t].to(device), case.num_decodes,
                         bs, t)
    kf, vf = new_k.float(), new_v.float()
    if case.kv_fp8:
        kf, vf = kf * scales[0], vf * scales[1]
    ref = torch_ref.forward(q[:t].float().to(device), kf.to(device), vf.to(device), ref_cache, ref_meta, scale,
                            sliding_window=case.window).cpu()
    del ref_cache

    dev_cache = cache.to(device)
    meta = make_meta(case.q_lens, seq_lens, tables.to(device), slot_mapping.to(device), case.num_decodes, bs, tp)
    qkv_dev = qkv.to(device)
    q_d = qkv_dev[:, :hq * d].view(tp, hq, d)
    k_d = qkv_dev[:, hq * d:(hq + hk) * d].view(tp, hk, d)
    v_d = qkv_dev[:, (hq + hk) * d:].view(tp, hk, d)
    if case.kv_fp8:
        out = forward(q_d, k_d, v_d, dev_cache, meta, scale, scales[:1].to(device), scales[1:].to(device),
                      sliding_window=case.window)
    else:
        out = forward(q_d, k_d, v_d, dev_cache, meta, scale, sliding_window=case.window)
    out = out[:t].float().cpu()

    if case.kv_fp8:
        assert_fp8_codes_match(dev_cache.cpu(), expected_cache)
    else:
        assert torch.equal(dev_cache.cpu().view(torch.uint8), expected_cache.view(torch.uint8)), "cache contents"
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out - ref).abs()
    result = {"case": case.name, "max_abs": err.max().item(),
              "rel_norm": ((out - ref).norm() / ref.norm()).item(), "tokens": t}
    path = os.environ.get("PAGELLM_ATTN_ERRLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
    tol = TOLERANCES[dt]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    return result


def quantize_planes(cache: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A float [2, ...] cache (K plane, V plane) as float8 e4m3 codes of x / scale (NaN stays NaN)."""
    planes = [fp8_kv.quantize(cache[i], scales[i]).view(torch.uint8) for i in range(2)]
    return torch.stack(planes).view(fp8_kv.FP8_DTYPE)


def dequantize_planes(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 values a [2, ...] cache stands for: codes * scale for FP8 (scales given), else the values."""
    if scales is None:
        return cache.float()
    return cache.float() * scales.view(2, *[1] * (cache.dim() - 1))


def assert_fp8_codes_match(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same e4m3 codes, but for values exactly between two codes, which may round either way: those differ by
    one code (same sign), on at most 0.1% of the bytes."""
    g, e = got.view(torch.uint8).long(), expected.view(torch.uint8).long()
    differ = g != e
    if not differ.any():
        return
    assert bool(((g - e).abs()[differ] == 1).all()), "cache contents: FP8 codes more than one code apart"
    assert int(differ.sum()) <= max(1, e.numel() // 1000), f"cache contents: {int(differ.sum())} FP8 codes differ"


def _need_cuda():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_matches_reference(case: Case):
    _need_cuda()
    from pagellm.attention.backends import triton_attn

    run_case(case, "cuda", triton_attn.forward)


def test_backend_selection():
    _need_cuda()
    from pagellm.attention.backends import get_attention_backend, triton_attn

    assert get_attention_backend(torch.device("cuda")) is triton_attn
    assert get_attention_backend(torch.device("cpu")) is torch_ref


def test_split_heuristic():
    _need_cuda()
    from pagellm.attention.backends.triton_attn import decode_num_splits

    assert decode_num_splits(256, 8, 1024, 132) == 1  # many programs: no split
    assert decode_num_splits(1, 8, 32768, 132) == 64  # batch 1, long context: split
    assert decode_num_splits(4, 8, 200, 132) == 1  # short contexts: no split
    assert decode_num_splits(1, 8, 384, 132) == 6  # batch 1 at 384: parts of 64 keys
    assert decode_num_splits(4, 8, 300, 132) == 4
    assert 1 < decode_num_splits(8, 8, 4096, 132) <= 16
    assert decode_num_splits(32, 8, 2048, 132) == 1  # 256 programs: splitting measured slower


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv-bf16", "kv-fp8"])
def test_decode_cuda_graph(kv_fp8: bool):
    """The decode path captured once in a CUDA graph, replayed over steps with new inputs (fixed max_seq_len;
    two padded slots with seq_len 0 and slot -1), matches the reference each step. With an FP8 cache the K/V
    scales change between replays: the graph must read them from memory, not keep the captured values."""
    _need_cuda()
    from pagellm.attention.backends import triton_attn

    device = "cuda"
    gen = torch.Generator().manual_seed(7)
    bs, hk, g, d, dt = 16, 2, 4, 128, torch.bfloat16
    hq = hk * g
    max_model_len = 4096
    ctx = [100, 1000, 4000, 1, 2500, 700]
    n_real, n_pad = len(ctx), 2
    nb = max_model_len // bs
    num_blocks = 1 + n_real * nb
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros((n_real + n_pad, nb), dtype=torch.int32)
    tables[:n_real] = perm.view(n_real, nb).int()
    cache = torch.randn((2, num_blocks, bs, hk, d), generator=gen)
    s_scales = torch.tensor([0.5, 0.25], device=device)  # K, V (FP8 only)
    cache = (quantize_planes(cache, s_scales.cpu()) if kv_fp8 else cache.to(dt)).to(device)
    b = n_real + n_pad
    s_q = torch.zeros((b, hq, d), dtype=dt, device=device)
    s_k = torch.zeros((b, hk, d), dtype=dt, device=device)
    s_v = torch.zeros((b, hk, d), dtype=dt, device=device)
    s_slots = torch.full((b,), -1, dtype=torch.int64, device=device)
    s_tables = tables.to(device)
    meta = make_meta([1] * b, [1] * b, s_tables, s_slots, b, bs, b, max_seq_len=max_model_len)
    scale = d ** -0.5
    scale_args = (s_scales[:1], s_scales[1:]) if kv_fp8 else ()

    def fill(lens):
        seq = lens + [0] * n_pad
        slots = [int(tables[r, (s - 1) // bs]) * bs + (s - 1) % bs for r, s in enumerate(lens)] + [-1] * n_pad
        s_q.copy_(torch.randn((b, hq, d), generator=gen).to(dt))
        s_k.copy_(torch.randn((b, hk, d), generator=gen).to(dt))
        s_v.copy_(torch.randn((b, hk, d), generator=gen).to(dt))
        s_slots.copy_(torch.tensor(slots, dtype=torch.int64))
        meta.seq_lens.copy_(torch.tensor(seq, dtype=torch.int32))
        return slots

    fill([c + 1 for c in ctx])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            triton_attn.forward(s_q, s_k, s_v, cache, meta, scale, *scale_args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out = triton_attn.forward(s_q, s_k, s_v, cache, meta, scale, *scale_args)

    for step in range(1, 4):
        lens = [c + step for c in ctx]
        slots = fill(lens)
        ref_meta = make_meta([1] * n_real, lens, s_tables[:n_real],
                             torch.tensor(slots[:n_real], dtype=torch.int64, device=device), n_real, bs, n_real)
        new_k, new_v = s_k[:n_real].float(), s_v[:n_real].float()
        if kv_fp8:
            s_scales.copy_(torch.tensor([0.5 * step, 0.25 / step]))
            ks, vs = s_scales[0], s_scales[1]
            new_k, new_v = fp8_kv.quantize(new_k, ks).float() * ks, fp8_kv.quantize(new_v, vs).float() * vs
            ref_cache = dequantize_planes(cache, s_scales)
        else:
            ref_cache = cache.float()
        ref = torch_ref.forward(s_q[:n_real].float(), new_k, new_v, ref_cache, ref_meta, scale)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(s_out[:n_real].float(), ref, atol=2e-2, rtol=2e-2)
        assert torch.equal(s_out[n_real:], torch.zeros_like(s_out[n_real:]))
        if kv_fp8:  # the same K/V written by both, up to a value exactly between two codes
            assert_fp8_codes_match(cache.cpu(), quantize_planes(ref_cache.cpu(), s_scales.cpu()))
        else:
            torch.testing.assert_close(cache.float(), ref_cache, atol=0, rtol=0)  # same K/V written by both
