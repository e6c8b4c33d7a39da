"""Timings of the Triton paged-attention kernels on one GPU (not a test). Prints a table last.

Decode: Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16, block size 16), one
layer, block tables that are random permutations of the cache's blocks. Decode is memory-bound: the floor is
the K/V bytes read (B * ctx * Hk * D * 2 tensors * 2 bytes) over the copy bandwidth (3.0 TB/s measured on
the H100 these runs use). Prefill is matrix-bound: causal flops 4 * Hq * D * (visible query-key pairs).

    PYTHONPATH=. python benchmarks/attention_kernels.py [--sweep] [--json out.json] [--kv-dtype fp8 --decode-only]

--kv-dtype fp8 stores the cache in float8 e4m3 (kv_cache_dtype="fp8"; scales 1.0): the floor halves.

Times are medians of triton.testing.do_bench (eager, L2 flushed between runs) and do_bench_cudagraph
(replays of a captured graph: no launch overhead, the way the decode path will run).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from pagellm.attention.backends import torch_ref, triton_attn
from pagellm.attention.backends.triton_attn import KernelConfig
from pagellm.attention.metadata import AttentionMetadata

HQ, HK, D, BS, DT = 32, 8, 128, 16, torch.bfloat16
KV_DTYPE = {"auto": DT, "fp8": torch.float8_e4m3fn}  # --kv-dtype: the cache's element type
COPY_TBPS = 3.0e12


def make_batch(q_lens: list[int], ctx_lens: list[int], num_decodes: int, hq=HQ, hk=HK, d=D, bs=BS, dtype=DT,
               kv_dtype=DT):
    dev = "cuda"
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    n_blocks = [-(-s // bs) for s in seq_lens]
    num_blocks = 1 + sum(n_blocks)
    perm = torch.randperm(num_blocks - 1) + 1
    tables = torch.zeros((len(seq_lens), max(n_blocks)), dtype=torch.int32)
    slots, at = [], 0
    for r, (q, c, nb) in enumerate(zip(q_lens, ctx_lens, n_blocks)):
        ids = perm[at:at + nb]
        at += nb
        tables[r, :nb] = ids.int()
        slots += [int(ids[p // bs]) * bs + p % bs for p in range(c, c + q)]
    t = len(slots)
    cache = torch.randn((2, num_blocks, bs, hk, d), dtype=dtype, device=dev).to(kv_dtype)
    q = torch.randn((t, hq, d), dtype=dtype, device=dev)
    k = torch.randn((t, hk, d), dtype=dtype, device=dev)
    v = torch.randn((t, hk, d), dtype=dtype, device=dev)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        num_actual_tokens=t, query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_tables=tables.to(dev),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), num_decodes=num_decodes, block_size=bs, query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens)
    return q, k, v, cache, meta


def kv_bytes(meta: AttentionMetadata, elem: int, hk=HK, d=D) -> int:
    return sum(meta.seq_lens_cpu) * hk * d * 2 * elem


def causal_flops(q_lens, ctx_lens, hq=HQ, d=D) -> int:
    pairs = sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, ctx_lens))
    return 4 * hq * d * pairs


ROWS: list[dict] = []


def row(case: str, variant: str, ms: float, *, nbytes: int | None = None, flops: int | None = None):
    r = {"case": case, "variant": variant, "us": ms * 1e3}
    if nbytes:
        r["GB/s"] = nbytes / (ms * 1e-3) / 1e9
        r["floor_us"] = nbytes / COPY_TBPS * 1e6
    if flops:
        r["TFLOP/s"] = flops / (ms * 1e-3) / 1e12
    ROWS.append(r)
    print(json.dumps(r), flush=True)


def bench_decode(b: int, ctx: int, with_ref: bool, sweep: bool, try_splits=(1,), kv_dtype=DT):
    name = f"decode B={b} ctx={ctx}"
    q, k, v, cache, meta = make_batch([1] * b, [ctx - 1] * b, b, kv_dtype=kv_dtype)
    scale = D ** -0.5
    nbytes = kv_bytes(meta, cache.element_size())
    splits = triton_attn.decode_num_splits(b, HK, meta.max_seq_len,
                                           torch.cuda.get_device_properties(0).multi_processor_count)
    out = torch.empty_like(q)
    # correctness spot check against the reference (float32)
    # (the new token's k/v are stored rounded to the cache's type: the reference takes them so rounded)
    ref = torch_ref.forward(q.float(), k.to(kv_dtype).float(), v.to(kv_dtype).float(), cache.float(), meta, scale)
    got = triton_attn.forward(q, k, v, cache, meta, scale)
    err = (got.float() - ref).abs().max().item()
    print(f"# {name}: splits={splits} max_abs_err_vs_ref={err:.3e}", flush=True)
    fwd = lambda: triton_attn.forward(q, k, v, cache, meta, scale)  # noqa: E731
    row(name, f"forward eager (write+attn, splits={splits})", do_bench(fwd, return_mode="median"), nbytes=nbytes)
    row(name, f"forward graph (write+attn, splits={splits})", do_bench_cudagraph(fwd, rep=50, return_mode="median"),
        nbytes=nbytes)
    attn = lambda: triton_attn.attend_decode(q, out, cache, meta, scale)  # noqa: E731
    row(name, f"attend_decode graph (splits={splits})", do_bench_cudagraph(attn, rep=50, return_mode="median"),
        nbytes=nbytes)
    for n in try_splits:
        if n != splits:
            fn = lambda: triton_attn.attend_decode(q, out, cache, meta, scale, num_splits=n)  # noqa: E731
            row(name, f"attend_decode graph (forced splits={n})", do_bench_cudagraph(fn, rep=50, return_mode="median"),
                nbytes=nbytes)
    if with_ref:
        ref_fn = lambda: torch_ref.forward(q, k, v, cache, meta, scale)  # noqa: E731
        row(name, "torch_ref (gather + einsum)", do_bench(ref_fn, rep=50, return_mode="median"), nbytes=nbytes)
    if sweep:
        best = None
        for tile_n in (32, 64, 128, 256):
            for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3)):
                cfg = KernelConfig(16, tile_n, warps, stages)
                fn = lambda: triton_attn.attend_decode(q, out, cache, meta, scale, cfg=cfg)  # noqa: E731
                try:
                    ms = do_bench_cudagraph(fn, rep=30, return_mode="median")
                except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                    print(f"# sweep {cfg}: {type(e).__name__}", flush=True)
                    continue
                print(f"# sweep {name} {cfg}: {ms * 1e3:.1f} us", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
        if best:
            c = best[1]
            row(name, f"sweep best tile_n={c.tile_n} w={c.num_warps} s={c.num_stages}", best[0], nbytes=nbytes)


def bench_prefill(q_lens: list[int], ctx_lens: list[int], sweep: bool, hq: int = HQ, hk: int = HK, kv_dtype=DT):
    name = f"prefill q={q_lens[0]}x{len(q_lens)} ctx={ctx_lens[0]}" + ("" if hq == HQ else f" {hq}/{hk} heads")
    q, k, v, cache, meta = make_batch(q_lens, ctx_lens, 0, hq=hq, hk=hk, kv_dtype=kv_dtype)
    scale = D ** -0.5
    flops = causal_flops(q_lens, ctx_lens, hq=hq)
    out = torch.empty_like(q)
    fn = lambda: triton_attn.attend_prefill(q, out, cache, meta, scale)  # noqa: E731
    row(name, "attend_prefill", do_bench(fn, return_mode="median"), flops=flops)
    if all(c == 0 for c in ctx_lens) and len(set(q_lens)) == 1:
        # Speed reference only: torch SDPA (flash) on contiguous, unpaged per-request K/V.
        n = q_lens[0]
        qq = q.view(len(q_lens), n, hq, D).transpose(1, 2)
        kk = k.view(len(q_lens), n, hk, D).transpose(1, 2)
        vv = v.view(len(q_lens), n, hk, D).transpose(1, 2)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        try:
            row(name, "torch SDPA contiguous (not paged)", do_bench(sdpa, return_mode="median"), flops=flops)
        except Exception as e:  # noqa: BLE001
            print(f"# SDPA: {type(e).__name__}: {e}", flush=True)
    if sweep:
        best = None
        for bm in (64, 128):
            for tile_n in (32, 64, 128):
                for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
                    cfg = KernelConfig(bm, tile_n, warps, stages)
                    f = lambda: triton_attn.attend_prefill(q, out, cache, meta, scale, cfg=cfg)  # noqa: E731
                    try:
                        ms = do_bench(f, rep=30, return_mode="median")
                    except Exception as e:  # noqa: BLE001
                        print(f"# sweep {cfg}: {type(e).__name__}", flush=True)
                        continue
                    print(f"# sweep {name} {cfg}: {ms * 1e3:.1f} us", flush=True)
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
        if best:
            c = best[1]
            row(name, f"sweep best bm={c.block_m} tile_n={c.tile_n} w={c.num_warps} s={c.num_stages}", best[0],
                flops=flops)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also try other tile/warp/stage configs")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPE), default="auto", help="the cache's element type")
    ap.add_argument("--decode-only", action="store_true", help="only the decode cases of llama8b-mixed's batches "
                    "(B=256 ctx=1024, B=128 ctx=768, B=32 ctx=2048), each swept with --sweep")
    ap.add_argument("--short", action="store_true", help="only batch-1 and -2 decodes at short contexts (128 to "
                    "1,024 tokens), each with 1 to 8 KV splits: where splitting starts to pay")
    args = ap.parse_args()
    kv = KV_DTYPE[args.kv_dtype]
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name(0)}  torch {torch.__version__}  triton {triton.__version__}  "
          f"kv {kv}")
    if args.short:
        for b in (1, 2):
            for ctx in (128, 256, 384, 512, 1024):
                bench_decode(b, ctx, with_ref=False, sweep=False, try_splits=(1, 2, 3, 4, 6, 8), kv_dtype=kv)
    elif args.decode_only:
        bench_decode(256, 1024, with_ref=False, sweep=args.sweep, kv_dtype=kv)
        bench_decode(128, 768, with_ref=False, sweep=args.sweep, kv_dtype=kv)
        bench_decode(32, 2048, with_ref=False, sweep=args.sweep, try_splits=(1, 2, 4), kv_dtype=kv)
    else:
        bench_decode(256, 1024, with_ref=True, sweep=args.sweep, kv_dtype=kv)
        bench_decode(1, 32768, with_ref=True, sweep=args.sweep, kv_dtype=kv)
        bench_decode(64, 4096, with_ref=False, sweep=False, try_splits=(1, 2, 4), kv_dtype=kv)
        bench_decode(32, 2048, with_ref=False, sweep=False, try_splits=(1, 2, 4), kv_dtype=kv)
        bench_decode(16, 8192, with_ref=False, sweep=False, try_splits=(1, 2, 4, 8), kv_dtype=kv)
        bench_prefill([2048] * 4, [0] * 4, sweep=args.sweep, kv_dtype=kv)
        bench_prefill([512], [8192], sweep=False, kv_dtype=kv)
        bench_prefill([1024] * 8, [0] * 8, sweep=False, hq=16, hk=8, kv_dtype=kv)  # Qwen3-0.6B heads
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)
    print()
    print(f"{'case':<28} {'variant':<46} {'us':>9} {'GB/s':>7} {'floor us':>8} {'TFLOP/s':>8}")
    for r in ROWS:
        gbs = f"{r['GB/s']:.0f}" if "GB/s" in r else ""
        floor = f"{r['floor_us']:.1f}" if "floor_us" in r else ""
        tf = f"{r['TFLOP/s']:.0f}" if "TFLOP/s" in r else ""
        print(f"{r['case']:<28} {r['variant']:<46} {r['us']:>9.1f} {gbs:>7} {floor:>8} {tf:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
