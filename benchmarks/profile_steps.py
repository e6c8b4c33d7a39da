"""Where a throughput workload's host time goes, step by step: the engine's Python work per step by batch size.

Runs a workload of shared/BENCHMARKS.md through `LLM.generate` in this process, as the engine is configured
(async scheduling on a GPU), and times the host-side parts of every step without adding synchronizations:
scheduling, the runner's launch (rows and inputs, the forward and sampling launched, not awaited), reading the
step's tokens (mostly a wait for the device under async scheduling), the scheduler's update and the output
processing. The host time of a step is everything but the wait; with async scheduling it hides behind the
device's time as long as it is shorter. Steps are reported by kind (decode: a CUDA graph replays; mixed: prefill
chunks too, an eager forward whose kernel launches are host time) and batch size.

    python benchmarks/profile_steps.py --workload llama8b-mixed [--num-prompts N] [--out DIR]

It wraps methods by name (Scheduler.schedule, Scheduler.update_from_output, ModelRunner.execute_model_async,
PendingOutput.result, OutputProcessor.process_outputs), so the same script measures an older checkout too (put
it first on PYTHONPATH): that is how a change's "before and after" is taken in one run.
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
from pagellm.core import scheduler as sched_mod
from pagellm.engine import output_processor as op_mod
from pagellm.worker import model_runner as mr

PARTS = ("schedule", "launch", "wait", "update", "outputs")


def batch_size(scheduler_output: Any) -> int:
    """Requests of a step message (old messages list them in `scheduled`)."""
    reqs = getattr(scheduler_output, "scheduled", None)
    return len(reqs) if reqs is not None else scheduler_output.num_reqs


def step_kind(scheduler_output: Any) -> str:
    """decode (one token per request: a CUDA graph replays) or mixed (prefill chunks too: an eager forward)."""
    return "decode" if scheduler_output.num_batched_tokens == batch_size(scheduler_output) else "mixed"


class HostClock:
    """Seconds of each part of each step, keyed by the step's batch size."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.steps: list[tuple[str, int, dict[str, float]]] = []
        self.current_kind, self.current_batch = "decode", 0
        self.recording = False

    def wrap(self, part: str, fn: Callable, on_done: Callable[[Any, Any], None] | None = None) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            res = fn(*args, **kwargs)
            if self.recording:
                self.current[part] = self.current.get(part, 0.0) + time.perf_counter() - t
                if on_done is not None:
                    on_done(args, res)
            return res
        return wrapper

    def end_step(self, args: Any, res: Any) -> None:
        """After the output processing: one step is done."""
        if self.current:
            self.steps.append((self.current_kind, self.current_batch, self.current))
        self.current = {}

    def set_batch(self, args: Any, res: Any) -> None:
        self.current_kind, self.current_batch = step_kind(res), batch_size(res)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="llama8b-mixed", choices=sorted(WORKLOADS))
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--label", default="", help="a name for this run in the report (e.g. before, after)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()

    wl = WORKLOADS[args.workload]
    clock = HostClock()
    S, R, P, O = sched_mod.Scheduler, mr.ModelRunner, mr.PendingOutput, op_mod.OutputProcessor
    S.schedule = clock.wrap("schedule", S.schedule, clock.set_batch)
    S.update_from_output = clock.wrap("update", S.update_from_output)
    R.execute_model_async = clock.wrap("launch", R.execute_model_async)
    P.result = clock.wrap("wait", P.result)
    O.process_outputs = clock.wrap("outputs", O.process_outputs, clock.end_step)

    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

    folder = write_dummy_model(wl.shape, tempfile.mkdtemp())
    kwargs: dict[str, Any] = dict(model=folder, load_format="dummy", dtype=wl.dtype, skip_tokenizer_init=True)
    if not torch.cuda.is_available():  # a CPU smoke run of this script
        kwargs["max_model_len"] = 4096
    llm = LLM(**kwargs)
    requests = make_requests(wl, wl.shape["vocab_size"])[: args.num_prompts or wl.num_requests]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=1.0, top_p=1.0, detokenize=False)
              for r in requests]
    llm.generate(prompts[:2], [SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)] * 2, use_tqdm=False)
    clock.recording = True
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    clock.recording = False
    out_tokens = sum(r.output_len for r in requests)

    label = f" [{args.label}]" if args.label else ""
    lines = [f"workload {wl.name}{label}: {len(requests)} requests, {out_tokens} output tokens, {wall:.2f} s wall, "
             f"{out_tokens / wall:.0f} out tok/s, {len(clock.steps)} steps"]
    buckets: dict[tuple[str, int], list[dict[str, float]]] = collections.defaultdict(list)
    for kind, n, parts in clock.steps:
        buckets[(kind, min(256, (n + 63) // 64 * 64))].append(parts)
    lines.append("kind    batch<=  steps  " + "  ".join(f"{p:>9s}" for p in PARTS) + "   host/step (ms, all but wait)")
    summary = {}
    for kind, b in sorted(buckets):
        rows = buckets[(kind, b)]
        means = {p: 1000 * sum(r.get(p, 0.0) for r in rows) / len(rows) for p in PARTS}
        host = sum(v for p, v in means.items() if p != "wait")
        summary[f"{kind}-{b}"] = {"steps": len(rows), "host_ms": host, **{f"{p}_ms": v for p, v in means.items()}}
        lines.append(f"{kind:6s}  {b:7d}  {len(rows):5d}  " + "  ".join(f"{means[p]:9.3f}" for p in PARTS)
                     + f"   {host:7.3f}")
    report = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    name = f"host-{wl.name}{'-' + args.label if args.label else ''}"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"workload": wl.name, "label": args.label, "wall_s": wall, "output_tokens": out_tokens,
                   "steps": len(clock.steps), "by_kind_and_batch": summary}, f, indent=1)
    print(report)


if __name__ == "__main__":
    main()
