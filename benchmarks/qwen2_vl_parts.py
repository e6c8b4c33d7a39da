"""Qwen2-VL's self-contained parts on the GPU, bf16: the vision tower against transformers' on the same random
weights (Qwen2-VL-7B's tower shape), and M-RoPE against 1-D RoPE (Qwen2-VL-7B's attention shape).

Tower: images as the processor makes them (448x448 -> 32x32 patches -> 256 tokens; 1288x980 -> 92x70 patches),
the median time per batch (CUDA events, after warm-up) of pagellm's tower and of transformers'
Qwen2VisionTransformerPretrainedModel (sdpa), their ratio and the largest output difference relative to the
output's scale. Rotary: q/k of one step's tokens rotated in place ([3, T] positions vs [T]). One line per case,
a summary line; JSON with --out.

    python benchmarks/qwen2_vl_parts.py --out results.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.cuda_timing import events_ms

from pagellm.model_executor.layers.mrope import MRotaryEmbedding
from pagellm.model_executor.layers.rotary import RotaryEmbedding
from pagellm.model_executor.models.qwen2_vl_vision import Qwen2VisionTransformer

# Qwen2-VL-7B-Instruct's vision_config
TOWER_7B = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu",
                in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# name -> image grids (t, h, w) of one batch
BATCHES = {"1 x 448x448": [(1, 32, 32)], "8 x 448x448": [(1, 32, 32)] * 8, "1 x 1288x980": [(1, 92, 70)],
           "mixed 4": [(1, 32, 32), (1, 92, 70), (1, 16, 24), (1, 32, 32)]}
ROPE_TOKENS = [1, 256, 4096, 16384]


def bench_tower(repeats: int) -> list[dict]:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    vision_config = Qwen2VLConfig(vision_config=TOWER_7B).vision_config
    vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = Qwen2VisionTransformerPretrainedModel._from_config(vision_config, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    ours = Qwen2VisionTransformer(vision_config, dtype=torch.bfloat16, device="cuda")
    ours.load_weights(("visual." + n, t) for n, t in ref.state_dict().items())
    per_patch = 3 * 2 * 14 * 14
    rows = []
    for name, grids in BATCHES.items():
        grid = torch.tensor(grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), per_patch, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            want = ref(pixels, grid_thw=grid.cuda())
            want = (want.pooler_output if hasattr(want, "pooler_output") else want).float()  # newer / older releases
            got = ours(pixels, grid).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            t_ours = events_ms(lambda: ours(pixels, grid), repeats, warmup=2)
            t_ref = events_ms(lambda: ref(pixels, grid_thw=grid.cuda()), repeats, warmup=2)
        row = {"batch": name, "tokens": int(got.shape[0]), "pagellm_ms": t_ours, "transformers_ms": t_ref,
               "speedup": t_ref / t_ours, "max_rel_err": err}
        rows.append(row)
        print(f"tower {name:<14} {row['tokens']:>5} tokens  pagellm {t_ours:8.2f} ms  transformers {t_ref:8.2f} ms  "
              f"{row['speedup']:5.2f}x  rel err {err:.1e}", flush=True)
    return rows


def bench_rope(repeats: int) -> list[dict]:
    heads, kv_heads, head_dim = 28, 4, 128  # Qwen2-VL-7B
    mrope = MRotaryEmbedding(head_dim, 32768, 1e6, [16, 24, 24], device="cuda")
    rope = RotaryEmbedding(head_dim, 32768, 1e6, device="cuda")
    rows = []
    for tokens in ROPE_TOKENS:
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
        q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        pos1 = torch.randint(0, 8192, (tokens,), device="cuda")
        pos3 = torch.randint(0, 8192, (3, tokens), device="cuda")
        t_m = events_ms(lambda: mrope(pos3, q, k), repeats, warmup=2) * 1000
        t_r = events_ms(lambda: rope(pos1, q, k), repeats, warmup=2) * 1000
        rows.append({"tokens": tokens, "mrope_us": t_m, "rope_us": t_r})
        print(f"rope tokens {tokens:>6}  M-RoPE [3, T] {t_m:8.1f} us  1-D RoPE [T] {t_r:8.1f} us", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rope = bench_rope(args.repeats)
    tower = bench_tower(args.repeats)
    print(f"qwen2-vl tower: pagellm/transformers speedup {min(r['speedup'] for r in tower):.2f}x .. "
          f"{max(r['speedup'] for r in tower):.2f}x, max rel err {max(r['max_rel_err'] for r in tower):.1e}; "
          f"M-RoPE at {rope[-1]['tokens']} tokens {rope[-1]['mrope_us']:.0f} us vs 1-D {rope[-1]['rope_us']:.0f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
                       "tower": tower, "rope": rope}, f, indent=2)


if __name__ == "__main__":
    main()
