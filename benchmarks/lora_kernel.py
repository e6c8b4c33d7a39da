"""The GPU time of the batched-LoRA kernels per decoder layer, for tile configs of triton_lora.CONFIG.

A Llama-3.1-8B layer's four LoRA'd projections (qkv, o, gate_up, down) at decode (256 tokens, one per request)
and prefill (4096 tokens) with 8 rank-16 adapters spread over the requests, timed as CUDA-graph replays (no
host launch time, as in the engine's decode graphs), next to the layer's four bf16 base GEMMs. Each config's
outputs are checked against the default config's. Prints one line per config and the best; writes JSON with
--out. Not a test.

    python benchmarks/lora_kernel.py --out lora-kernel.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from benchmarks.cuda_timing import graph_ms
from pagellm.lora import triton_lora
from pagellm.lora.triton_lora import lora_expand_, lora_shrink, slot_order

# (in, output slices): qkv, o, gate_up, down
LAYER = [(4096, [4096, 1024, 1024]), (4096, [4096]), (4096, [14336, 14336]), (14336, [4096])]
ADAPTERS, RANK = 8, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    default = dict(triton_lora.CONFIG)
    results = []
    for tokens in (256, 4096):
        per_req = 1 if tokens == 256 else 512
        slots = torch.randint(0, ADAPTERS, (tokens // per_req,), device=dev, generator=gen)
        slots = slots.repeat_interleave(per_req).to(torch.int32)
        order = slot_order(slots, ADAPTERS)
        layer = []
        for k, sizes in LAYER:
            n, sl = sum(sizes), len(sizes)
            x = torch.randn(tokens, k, device=dev, dtype=dt, generator=gen)
            w = torch.randn(n, k, device=dev, dtype=dt, generator=gen) * 0.02
            a = torch.randn(ADAPTERS, sl * RANK, k, device=dev, dtype=dt, generator=gen) * 0.02
            b = torch.randn(ADAPTERS, n, sl * RANK, device=dev, dtype=dt, generator=gen) * 0.02
            layer.append((x, w, a, b, torch.zeros(tokens, n, device=dev, dtype=dt), sizes))

        def base():
            for x, w, _, _, y, _ in layer:
                torch.matmul(x, w.t(), out=y)

        def lora():
            for x, _, a, b, y, sizes in layer:
                lora_expand_(y, lora_shrink(x, a, slots, order), b, slots, order, sizes)

        base_ms = graph_ms(base)
        triton_lora.CONFIG.update(default)
        for *_, y, _ in layer:
            y.zero_()
        lora()
        want = [y.float().clone() for *_, y, _ in layer]
        best = None
        for sbt, tp, ebt, ebn in itertools.product((16, 32, 64), (128, 512, 1024), (16, 32, 64), (64, 128)):
            triton_lora.CONFIG.update(shrink_block_t=sbt, target_programs=tp, expand_block_t=ebt, expand_block_n=ebn)
            for *_, y, _ in layer:
                y.zero_()
            lora()
            err = max(((y.float() - w_).abs().max() / w_.abs().max().clamp_min(1e-6)).item()
                      for (*_, y, _), w_ in zip(layer, want))
            ms = graph_ms(lora)
            row = {"tokens": tokens, **triton_lora.CONFIG, "lora_ms": ms, "base_ms": base_ms, "rel_err": err}
            results.append(row)
            if err < 2e-2 and (best is None or ms < best["lora_ms"]):
                best = row
        d = next(r for r in results if r["tokens"] == tokens and all(r[k] == v for k, v in default.items()))
        print(f"lora kernel tokens {tokens}: base GEMMs {base_ms:.3f} ms/layer, default config {d['lora_ms']:.3f} ms "
              f"({100 * d['lora_ms'] / base_ms:.1f}%), best {best['lora_ms']:.3f} ms "
              f"({100 * best['lora_ms'] / base_ms:.1f}%) with " +
              ", ".join(f"{k}={best[k]}" for k in default))
    triton_lora.CONFIG.update(default)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
