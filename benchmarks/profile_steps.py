"""Where a throughput workload's time goes, on a GPU: per-step kinds, host work outside steps, top kernels.

Runs a workload of shared/BENCHMARKS.md through `LLM.generate` in this process, timing each
`ModelRunner.execute_model` call (synchronized) by kind (decode graph / eager decode / mixed) and the phases
inside it (input preparation, forward, sampling), the time the engine spends outside the runner (scheduler,
output processing), and then profiles one large decode step and one mixed step with torch.profiler.

    python benchmarks/profile_steps.py --workload llama8b-mixed [--num-prompts N] [--out DIR]

Synchronizing after each phase costs a little overlap; the totals are a map of where time goes, not a
benchmark (`pagellm bench throughput` is).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from typing import Any, Callable

import torch

from pagellm.bench.workloads import WORKLOADS, make_requests, write_dummy_model
from pagellm.worker import model_runner as mr


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Wraps ModelRunner methods; collects seconds per step kind and per phase."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[float]] = collections.defaultdict(list)
        self.by_phase: dict[str, float] = collections.defaultdict(float)
        self.step_tokens: list[tuple[str, int, int, float]] = []
        self.profile_next: set[str] = set()
        self.tables: dict[str, str] = {}
        self.recording = True
        self.min_batch = 192

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            t = time.perf_counter()
            res = fn(*args, **kwargs)
            sync()
            if self.recording:
                self.by_phase[name] += time.perf_counter() - t
            return res
        return wrapper

    def wrap_execute(self, fn: Callable) -> Callable:
        def wrapper(runner: mr.ModelRunner, sched: Any) -> Any:
            reqs = sched.scheduled
            if not reqs:
                return fn(runner, sched)
            tokens = sum(r.num_scheduled_tokens for r in reqs)
            if tokens == len(reqs):
                kind = "decode-graph" if runner._graph_size(reqs) is not None else "decode-eager"
            else:
                kind = "mixed"
            want = f"{kind}" if (kind != "mixed" and len(reqs) >= self.min_batch) or (kind == "mixed" and tokens >= 4096) \
                else None
            if want and want in self.profile_next:
                self.profile_next.discard(want)
                sync()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    res = fn(runner, sched)
                    sync()
                self.tables[f"{want} ({len(reqs)} reqs, {tokens} tokens)"] = prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
                return res
            sync()
            t = time.perf_counter()
            res = fn(runner, sched)
            sync()
            dt = time.perf_counter() - t
            if self.recording:
                self.by_kind[kind].append(dt)
                self.step_tokens.append((kind, len(reqs), tokens, dt))
            return res
        return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="llama8b-mixed", choices=sorted(WORKLOADS))
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs=2, default=None, metavar=("IN", "OUT"),
                        help="fixed input/output lengths instead of the workload's (e.g. 128 256 with "
                        "--num-prompts 1 for batch-1 latency), greedy")
    parser.add_argument("--profile-min-batch", type=int, default=192,
                        help="profile the first decode step of at least this many requests")
    parser.add_argument("--no-phases", action="store_true", help="time whole steps only (fewer syncs)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()

    wl = WORKLOADS[args.workload]
    clock = StepClock()
    mr.ModelRunner.execute_model = clock.wrap_execute(mr.ModelRunner.execute_model)
    if not args.no_phases:
        for name in ("_prepare_inputs", "_sample"):
            setattr(mr.ModelRunner, name, clock.timed(name, getattr(mr.ModelRunner, name)))

    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    folder = write_dummy_model(wl.shape, tempfile.mkdtemp())
    kwargs: dict[str, Any] = dict(model=folder, load_format="dummy", dtype=wl.dtype, skip_tokenizer_init=True)
    if not torch.cuda.is_available():  # a CPU smoke run of this script
        kwargs["max_model_len"] = 4096
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(**kwargs)
    requests = make_requests(wl, wl.shape["vocab_size"])[: args.num_prompts or wl.num_requests]
    if args.lengths:
        for r in requests:
            r.prompt_token_ids, r.output_len = r.prompt_token_ids[:1] * args.lengths[0], args.lengths[1]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0 if args.lengths else 1.0,
                             top_p=1.0, detokenize=False) for r in requests]
    clock.min_batch = args.profile_min_batch
    llm.generate(prompts[:2], [SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)] * len(prompts[:2]),
                 use_tqdm=False)
    clock.by_kind.clear(), clock.by_phase.clear(), clock.step_tokens.clear()

    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    in_steps = sum(sum(v) for v in clock.by_kind.values())
    out_tokens = sum(r.output_len for r in requests)

    # A second, short pass that profiles one big decode step and one big mixed step.
    clock.recording = False
    clock.profile_next = {"decode-graph", "mixed"}
    llm.generate(prompts[:256], [SamplingParams(max_tokens=24, ignore_eos=True, detokenize=False)] * len(prompts[:256]),
                 use_tqdm=False)

    lines = [f"workload {wl.name}: {len(requests)} requests, {out_tokens} output tokens, {wall:.2f} s wall, "
             f"{out_tokens / wall:.0f} out tok/s (with syncs)",
             f"inside execute_model: {in_steps:.2f} s; outside (scheduler, outputs, engine): {wall - in_steps:.2f} s"]
    for kind, ts in sorted(clock.by_kind.items()):
        lines.append(f"  {kind:13s} {len(ts):5d} steps  {sum(ts):7.2f} s  mean {1000 * sum(ts) / len(ts):7.2f} ms")
    for name, t in clock.by_phase.items():
        lines.append(f"  phase {name:16s} {t:7.2f} s")
    # decode step time by batch size bucket
    buckets: dict[int, list[float]] = collections.defaultdict(list)
    for kind, n, tokens, dt in clock.step_tokens:
        if kind.startswith("decode"):
            buckets[(n + 31) // 32 * 32].append(dt)
    for b in sorted(buckets):
        ts = buckets[b]
        lines.append(f"  decode bs<={b:4d}: {len(ts):4d} steps, mean {1000 * sum(ts) / len(ts):6.2f} ms")
    mixed = [(n, tok, dt) for kind, n, tok, dt in clock.step_tokens if kind == "mixed"]
    for n, tok, dt in mixed[:40]:
        lines.append(f"  mixed: {n:4d} reqs {tok:6d} tokens {1000 * dt:7.2f} ms")
    report = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile-{wl.name}.txt"), "w") as f:
        f.write(report + "\n\n" + "\n\n".join(f"== {k}\n{v}" for k, v in clock.tables.items()))
    with open(os.path.join(args.out, f"profile-{wl.name}-steps.json"), "w") as f:
        json.dump(clock.step_tokens, f)
    print(report)


if __name__ == "__main__":
    main()
