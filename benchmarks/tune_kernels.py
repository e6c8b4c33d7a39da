"""Tile-config sweep for the W4A16 and fused MoE Triton kernels on one GPU: the tables' next figures.

For each case a handful of candidate configs (<= 8, the table's current one first) is timed (CUDA-graph
replays with the L2 flushed before each call, as a decode step that streams every layer's weights finds it:
cuda_timing.graph_ms_cold; eager timings measured the host's launch path at small M) and checked against the
reference; a wrong or failing candidate is left out. Cases:

- W4A16 (GPTQ layout, group 128, bf16): Llama-3.1-8B's qkv 4096->6144, o 4096->4096, gate_up 4096->28672 and
  down 14336->4096 at M = 1, 4, 16, 64, 256, against torch.nn.functional.linear of the same bf16 weight.
- fused MoE (bf16): Mixtral-8x7B and Qwen3-30B-A3B layers at 1..4096 tokens, against the torch loop.

Prints one line per case and one summary line per kernel; writes under --out:
    tuned-w4a16.json  tuned-moe.json   the tables with the winners laid over them, in the format of
                                       W4A16_CONFIGS / FUSED_MOE_CONFIGS (--bake writes them over the literals
                                       in w4a16_configs.py / moe_configs.py)
    tune-report.json                   every candidate's time and error, with the baselines
Both are rewritten after every case, so a run cut short leaves what it measured.

    python benchmarks/tune_kernels.py --out DIR [--kernels w4a16,moe] [--budget-s 130]
    python benchmarks/tune_kernels.py --bake DIR     # then: the tables of this checkout are DIR's winners
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pagellm.model_executor.layers.fused_moe import moe_configs, select_experts
from pagellm.model_executor.layers.fused_moe.torch_moe import fused_experts_torch
from pagellm.model_executor.layers.kernel_configs import Config, bucket_for, buckets_of, winners_table
from pagellm.model_executor.layers.quantization import w4a16_configs
from pagellm.model_executor.layers.quantization.w4a16 import dequantize_w4, pack_rows, w4a16_reference


def w4(kernel: str, bm: int, bn: int, bk: int, split: int = 0, warps: int = 4, stages: int = 3) -> Config:
    return {"kernel": kernel, "block_m": bm, "block_n": bn, "block_k": bk, "split_k": split, "num_warps": warps,
            "num_stages": stages}


def moe(bm: int, bn: int, bk: int, group: int, warps: int = 4, stages: int = 3) -> Config:
    return {"block_m": bm, "block_n": bn, "block_k": bk, "group_m": group, "num_warps": warps, "num_stages": stages}


W4A16_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # K, N
W4A16_GROUP = 128
# M -> candidates (the table's current config is added first when it is not among them). "gemm" entries at
# small M are the kernel all of M ran before the small-M kernel: the before/after pair.
W4A16_CANDIDATES: dict[int, list[Config]] = {
    1: [w4("gemv", 1, 256, 128, warps=4, stages=3), w4("gemv", 1, 128, 128, warps=2, stages=3),
        w4("gemv", 1, 128, 128, warps=4, stages=3), w4("gemv", 1, 256, 128, 16, warps=4, stages=3),
        w4("gemv", 1, 512, 128, warps=4, stages=3), w4("gemv", 1, 256, 128, warps=8, stages=4),
        w4("gemv", 1, 256, 128, warps=4, stages=1)],
    4: [w4("mma", 16, 64, 128), w4("mma", 16, 128, 128), w4("mma", 16, 32, 128), w4("mma", 16, 64, 128, stages=4),
        w4("fma", 1, 128, 128), w4("fma", 1, 256, 128, warps=8), w4("gemm", 16, 64, 128)],
    16: [w4("mma", 16, 64, 128), w4("mma", 16, 128, 128), w4("mma", 16, 128, 128, warps=8), w4("mma", 16, 32, 128),
         w4("gemm", 16, 64, 128), w4("gemm", 16, 128, 64)],
    64: [w4("mma", 64, 64, 128), w4("mma", 32, 64, 128), w4("mma", 64, 128, 128, warps=8), w4("mma", 32, 128, 128),
         w4("gemm", 32, 64, 128), w4("gemm", 64, 128, 64, warps=8), w4("gemm", 64, 64, 64)],
    128: [w4("gemm", 128, 128, 64, split=1, warps=8), w4("gemm", 64, 128, 64, warps=8), w4("mma", 64, 64, 128),
          w4("mma", 64, 128, 128, warps=8), w4("mma", 128, 128, 128, split=1, warps=8), w4("gemm", 64, 64, 64),
          w4("mma", 32, 128, 128)],
    256: [w4("gemm", 64, 128, 64, split=1, warps=8), w4("gemm", 128, 128, 64, split=1, warps=8),
          w4("gemm", 64, 256, 64, split=1, warps=8), w4("gemm", 128, 64, 64, split=1), w4("gemm", 64, 128, 64, warps=8),
          w4("mma", 64, 128, 128, warps=8), w4("mma", 128, 128, 128, split=1, warps=8)],
}

MOE_SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}  # E, top_k, H, I
MOE_TOKENS = [1, 16, 64, 256, 1024, 4096]
_MOE_SMALL = [moe(16, 64, 64, 1), moe(16, 32, 64, 1, stages=4), moe(16, 64, 128, 1), moe(16, 128, 64, 1),
              moe(16, 128, 128, 1, warps=8)]
MOE_CANDIDATES: dict[int, list[Config]] = {  # bucket of rows per expert -> candidates
    1: _MOE_SMALL, 4: _MOE_SMALL, 16: _MOE_SMALL + [moe(32, 64, 64, 8)],
    64: [moe(32, 64, 64, 8), moe(64, 64, 64, 8), moe(64, 128, 64, 8, warps=8), moe(32, 128, 64, 8), moe(16, 64, 64, 1)],
    256: [moe(64, 128, 64, 8, warps=8), moe(128, 128, 64, 8, warps=8), moe(64, 128, 64, 1, warps=8),
          moe(64, 256, 64, 8, warps=8), moe(128, 64, 64, 8), moe(64, 64, 64, 8)],
    1024: [moe(128, 128, 64, 8, warps=8), moe(128, 128, 64, 8, warps=8, stages=4), moe(128, 256, 64, 8, warps=8),
           moe(64, 128, 64, 8, warps=8), moe(128, 128, 64, 16, warps=8), moe(64, 128, 64, 1, warps=8)],
}


def config_id(config: Config) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items())


def with_current(current: Config, candidates: list[Config]) -> list[Config]:
    """The table's current config first, then the other candidates (at most 8 in all)."""
    rest = [c for c in candidates if c != current]
    return ([current] + rest)[:8]


def time_us(fn: Callable[[], object], capturable: bool = True) -> float:
    """Microseconds of one call of fn. capturable=False: fn syncs with the host (the MoE torch loop), so it is
    timed eagerly (triton's do_bench, L2 flushed), which includes the host's launch time."""
    if not torch.cuda.is_available():  # --smoke: the plumbing under Triton's interpreter, timed by the clock
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * min(times)
    if not capturable:
        from triton.testing import do_bench

        return 1000.0 * do_bench(fn, warmup=5, rep=25, return_mode="median")
    from benchmarks.cuda_timing import graph_ms_cold

    return 1000.0 * graph_ms_cold(fn)


class Sweep:
    """Runs candidates under a deadline (one per kernel) and keeps every result for the report."""

    def __init__(self, out: str, device: str, dtype: torch.dtype, smoke: bool) -> None:
        self.deadline = 0.0
        self.out, self.device, self.dtype, self.smoke = out, device, dtype, smoke
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, smoke run)"
        self.report: dict = {"device": name, "torch": torch.__version__, "dtype": str(dtype)}
        self.cases: dict[str, list[dict]] = {"w4a16": [], "moe": []}

    def run(self, candidates: list[Config], fn: Callable[[Config], torch.Tensor], ref: torch.Tensor, tol: float
            ) -> tuple[dict[str, Optional[float]], dict[str, str]]:
        """{config id: microseconds, or None} and {config id: why not} for each candidate."""
        times: dict[str, Optional[float]] = {}
        errors: dict[str, str] = {}
        scale = ref.float().abs().max().item()
        for config in candidates:
            cid = config_id(config)
            times[cid] = None
            if time.monotonic() > self.deadline:
                errors[cid] = "not run (time budget spent)"
                continue
            try:
                err = (fn(config).float() - ref.float()).abs().max().item()
                if not err <= tol * scale + 1e-2:
                    errors[cid] = f"wrong: max abs error {err:.3g} (output scale {scale:.3g})"
                    continue
                times[cid] = time_us(lambda: fn(config))
            except Exception as e:  # a config the compiler refuses (shared memory, registers): left out
                errors[cid] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return times, errors

    def record(self, kernel: str, case: dict) -> None:
        self.cases[kernel].append(case)
        self.save()

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        for kernel in ("w4a16", "moe"):
            if self.cases[kernel]:
                winners = winners_table([{"shape": c["shape_key"], "bucket": c["bucket"], "times": c["times"],
                                          "configs": c["configs"]} for c in self.cases[kernel]])
                _write(os.path.join(self.out, f"tuned-{kernel}.json"), with_winners(CURRENT[kernel], winners))
        _write(os.path.join(self.out, "tune-report.json"), {**self.report, **self.cases})


CURRENT = {"w4a16": w4a16_configs.W4A16_CONFIGS, "moe": moe_configs.FUSED_MOE_CONFIGS}


def with_winners(current, winners: dict[str, dict[str, Config]]) -> dict[str, dict[str, Config]]:
    """The current table with the measured winners laid over it: a whole table even when the budget ran out
    before some buckets, so that pasting it never drops one. A shape entry made here starts from the default's
    buckets (a lookup past an entry's last bucket takes that bucket: an entry holding only M = 1 would serve
    every M); an entry that ends up the same as the default is left out."""
    table = {key: {b: dict(c) for b, c in entry.items()} for key, entry in current.items()}
    for key, entry in winners.items():
        table.setdefault(key, {b: dict(c) for b, c in table["default"].items()}).update(entry)
    return {key: entry for key, entry in table.items() if key == "default" or entry != table["default"]}


TABLE_FILES = {  # kernel -> (module file, the table's name there)
    "w4a16": ("pagellm/model_executor/layers/quantization/w4a16_configs.py", "W4A16_CONFIGS"),
    "moe": ("pagellm/model_executor/layers/fused_moe/moe_configs.py", "FUSED_MOE_CONFIGS"),
}
CHECKS = {"w4a16": w4a16_configs.check_w4a16_table, "moe": moe_configs.check_moe_table}


def bake(kernel: str, tuned_json: str, module_path: str) -> None:
    """Replace the table literal in module_path (from `NAME: Table = {` to the first line that is just `}`) with
    the tuned JSON, after checking it as the tests will."""
    with open(tuned_json) as f:
        table = json.load(f)
    CHECKS[kernel](table)
    name = TABLE_FILES[kernel][1]
    with open(module_path) as f:
        lines = f.read().split("\n")
    start = lines.index(f"{name}: Table = {{")
    end = lines.index("}", start)
    with open(module_path, "w") as f:
        f.write("\n".join(lines[:start] + table_literal(name, table) + lines[end + 1:]))


def table_literal(name: str, table: dict, width: int = 120) -> list[str]:
    """The table as Python source lines, one config per bucket line (wrapped under width), as written by hand."""
    out = [f"{name}: Table = {{"]
    for key, entry in table.items():
        out.append(f"    {json.dumps(key)}: {{")
        for bucket, config in entry.items():
            line = f"        {json.dumps(bucket)}: {{"
            indent = " " * len(line)
            fields = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in config.items()]
            for i, field in enumerate(fields):
                piece = field + ("}," if i == len(fields) - 1 else ",")
                if len(line) + len(piece) + 1 > width and not line.endswith("{"):
                    out.append(line)
                    line = indent + piece
                else:
                    line += ("" if line.endswith("{") else " ") + piece
            out.append(line)
        out.append("    },")
    out.append("}")
    return out


def _write(path: str, data: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def best_of(times: dict[str, Optional[float]]) -> Optional[str]:
    timed = {c: t for c, t in times.items() if t}
    return min(timed, key=timed.get) if timed else None


def tune_w4a16(sweep: Sweep, shapes: dict[str, tuple[int, int]], candidates_by_m: dict[int, list[Config]]) -> None:
    from pagellm.model_executor.layers.quantization.triton_w4a16 import w4a16_matmul

    dev = sweep.device
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (k, n) in shapes.items():
        groups = k // W4A16_GROUP
        qweight = pack_rows(torch.randint(0, 16, (k, n), device=dev, dtype=torch.int32, generator=g))
        scales = (torch.rand(groups, n, device=dev, generator=g) * 0.01 + 1e-3).half()
        zeros = torch.randint(0, 16, (groups, n), device=dev, generator=g).half()
        w_16 = dequantize_w4(qweight, scales, zeros, None, W4A16_GROUP).to(sweep.dtype).t().contiguous()
        weight_bytes = qweight.numel() * 4 + 2 * scales.numel() * 2
        for m in sorted(candidates_by_m):
            x = torch.randn(m, k, device=dev, generator=g).to(sweep.dtype)
            ref = w4a16_reference(x, qweight, scales, zeros, None, W4A16_GROUP)
            current = w4a16_configs.w4a16_config(m, k, n)
            candidates = with_current(current, candidates_by_m[m])
            times, errors = sweep.run(
                candidates, lambda c: w4a16_matmul(x, qweight, scales, zeros, None, W4A16_GROUP, config=c), ref, 1e-2)
            base = time_us(lambda: F.linear(x, w_16))
            best = best_of(times)
            case = {"shape": name, "shape_key": w4a16_configs.shape_key(k, n), "m": m, "bucket": m,
                    "bf16_us": base, "times": times, "errors": errors, "best": best,
                    "current": config_id(current), "configs": {config_id(c): c for c in candidates}}
            sweep.record("w4a16", case)
            cur_t = times.get(config_id(current))
            line = f"w4a16 {name:<8} {k}->{n:<6} M={m:<4} linear {base:8.1f} us"
            line += f" | current {cur_t:8.1f} us ({base / cur_t:5.2f}x)" if cur_t else " | current failed"
            if best:
                tb = times[best]
                line += (f" | best {tb:8.1f} us ({base / tb:5.2f}x, {weight_bytes / tb / 1e6:5.2f} TB/s) {best}")
            print(line + (f"  [{len(errors)} left out]" if errors else ""), flush=True)
    rows = [r for r in sweep.cases["w4a16"] if r["best"]]
    print("tune w4a16: best/bf16 " + ", ".join(
        f"{r['shape']} M={r['m']} {r['bf16_us'] / r['times'][r['best']]:.2f}x" for r in rows), flush=True)


def tune_moe(sweep: Sweep, shapes: dict[str, tuple[int, int, int, int]], token_counts: list[int],
             candidates_by_bucket: dict[int, list[Config]]) -> None:
    from pagellm.model_executor.layers.fused_moe.triton_moe import fused_experts

    dev = sweep.device
    buckets = buckets_of(moe_configs.FUSED_MOE_CONFIGS)
    for name, (experts, top_k, hidden, inter) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(experts, 2 * inter, hidden, device=dev, generator=g) * hidden**-0.5).to(sweep.dtype)
        w2 = (torch.randn(experts, hidden, inter, device=dev, generator=g) * inter**-0.5).to(sweep.dtype)
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device=dev, generator=g).to(sweep.dtype)
            weights, ids = select_experts(torch.randn(tokens, experts, device=dev, generator=g), top_k, True)
            ref = fused_experts_torch(x, w13, w2, weights, ids)
            bucket = bucket_for(tokens * top_k / experts, buckets)
            current = moe_configs.moe_config(tokens * top_k, experts, inter, hidden)
            candidates = with_current(current, candidates_by_bucket[bucket])
            times, errors = sweep.run(candidates, lambda c: fused_experts(x, w13, w2, weights, ids, config=c), ref,
                                      5e-2)
            loop = time_us(lambda: fused_experts_torch(x, w13, w2, weights, ids), capturable=False)
            best = best_of(times)
            case = {"shape": name, "shape_key": moe_configs.shape_key(experts, inter, hidden), "tokens": tokens,
                    "bucket": bucket, "loop_us": loop, "times": times, "errors": errors, "best": best,
                    "current": config_id(current), "configs": {config_id(c): c for c in candidates}}
            sweep.record("moe", case)
            cur_t = times.get(config_id(current))
            line = f"moe {name:<14} tokens {tokens:>5} (bucket {bucket:>4}) loop {loop:9.1f} us"
            line += f" | current {cur_t:9.1f} us ({loop / cur_t:6.2f}x)" if cur_t else " | current failed"
            if best:
                line += f" | best {times[best]:9.1f} us ({loop / times[best]:6.2f}x) {best}"
            print(line + (f"  [{len(errors)} left out]" if errors else ""), flush=True)
    rows = [r for r in sweep.cases["moe"] if r["best"]]
    print("tune moe: best/loop " + ", ".join(
        f"{r['shape']} x{r['tokens']} {r['loop_us'] / r['times'][r['best']]:.2f}x" for r in rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--kernels", default="w4a16,moe", help="comma-separated: w4a16, moe")
    parser.add_argument("--budget-s", type=float, default=130.0, help="seconds per kernel; later candidates are "
                        "left out (and said so in the report) once it is spent")
    parser.add_argument("--bake", metavar="DIR", help="no sweep: write DIR/tuned-*.json (a sweep's output) into "
                        "the tables' modules of this checkout, checked first")
    parser.add_argument("--w4a16-m", default=None, help="comma-separated M buckets of the W4A16 sweep (default: "
                        "all of them)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1, two "
                        "candidates per case, float16: checks the sweep's plumbing, measures nothing")
    args = parser.parse_args()
    if args.bake:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for kernel, (module, _) in TABLE_FILES.items():
            tuned = os.path.join(args.bake, f"tuned-{kernel}.json")
            if os.path.exists(tuned):
                bake(kernel, tuned, os.path.join(root, module))
                print(f"baked {tuned} into {module}")
        return
    if args.smoke:
        sweep = Sweep(args.out, "cpu", torch.float16, True)
        runs = {"w4a16": lambda: tune_w4a16(sweep, {"tiny": (128, 32)}, {1: W4A16_CANDIDATES[1][:2]}),
                "moe": lambda: tune_moe(sweep, {"tiny": (4, 2, 32, 16)}, [8],
                                        {b: c[:2] for b, c in MOE_CANDIDATES.items()})}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tune_kernels.py needs CUDA (or --smoke with TRITON_INTERPRET=1)")
        sweep = Sweep(args.out, "cuda", torch.bfloat16, False)
        w4_candidates = W4A16_CANDIDATES
        if args.w4a16_m:
            w4_candidates = {int(m): W4A16_CANDIDATES[int(m)] for m in args.w4a16_m.split(",")}
        runs = {"w4a16": lambda: tune_w4a16(sweep, W4A16_SHAPES, w4_candidates),
                "moe": lambda: tune_moe(sweep, MOE_SHAPES, MOE_TOKENS, MOE_CANDIDATES)}
    for kernel in args.kernels.split(","):
        sweep.deadline = time.monotonic() + args.budget_s
        runs[kernel]()
    print(f"tune: tables in {args.out}/tuned-*.json (bake: python benchmarks/tune_kernels.py --bake DIR)", flush=True)


if __name__ == "__main__":
    main()
