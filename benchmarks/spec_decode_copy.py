"""N-gram speculative decoding against none, in one run: batch 1, greedy, prompts whose answers repeat them.

The embedded SmolLM2 (float32 on the CPU unless --dtype) is asked to copy or lightly edit a given paragraph or
piece of code, one prompt at a time, as a chat. Each prompt runs with speculation off and on (alternating,
best of --repeats); the script checks that the tokens are identical and prints tokens/s (prefill included),
the speedup, acceptance (accepted / draft tokens) and mean accepted length (tokens per verify step).

    python benchmarks/spec_decode_copy.py [--k 4] [--max-tokens 160] [--repeats 2] [--out FILE.json]

Not a BENCHMARKS.md workload yet; a first measurement for issue 14's CPU target (1.8x at k = 4).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pagellm import LLM, SamplingParams
from pagellm.bench.throughput import spec_decode_summary

PARAGRAPH = ("The scheduler gives each running or waiting request a number of tokens to compute this step, inside "
             "one token budget and one sequence cap. Prefill, chunked prefill, a prefix-cache hit and decode are the "
             "same thing: move num_computed_tokens toward num_tokens. Running requests are served first, in order; "
             "a prompt that does not fit is chunked.")
CODE = '''def merge(a, b):
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]'''
TASKS = [
    "Copy this paragraph exactly, word for word:\n\n" + PARAGRAPH,
    "Rewrite this function with the name merge_sorted instead of merge; change nothing else:\n\n" + CODE,
    "Repeat the following text, replacing 'scheduler' with 'planner':\n\n" + PARAGRAPH,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    common = dict(dtype=args.dtype, max_model_len=2048, kv_cache_memory=128 * 2**20)
    engines = {"off": LLM(**common), "ngram": LLM(**common, speculative_config=spec)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for llm in engines.values():  # warm-up
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    rows = []
    for task in TASKS:
        messages = [{"role": "user", "content": task}]
        best = {name: float("inf") for name in engines}
        tokens = {}
        for _ in range(args.repeats):
            for name, llm in engines.items():
                start = time.perf_counter()
                out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
                best[name] = min(best[name], time.perf_counter() - start)
                tokens[name] = list(out.token_ids)
        n = len(tokens["off"])
        rows.append({"task": task.splitlines()[0], "tokens": n, "identical": tokens["off"] == tokens["ngram"],
                     "seconds_off": best["off"], "seconds_ngram": best["ngram"], "speedup": best["off"] / best["ngram"]})
        r = rows[-1]
        print(f"{r['task'][:60]:<60} {n:>4} tokens  off {n / r['seconds_off']:6.1f} tok/s  ngram "
              f"{n / r['seconds_ngram']:6.1f} tok/s  {r['speedup']:.2f}x  identical: {r['identical']}", flush=True)
    summary = spec_decode_summary(engines["ngram"].llm_engine.core.scheduler)
    total_off = sum(r["seconds_off"] for r in rows)
    total_ngram = sum(r["seconds_ngram"] for r in rows)
    print(f"all prompts: {total_off / total_ngram:.2f}x; acceptance {summary['acceptance']:.3f}, mean accepted "
          f"length {summary['mean_accepted_length']:.2f} (warm-up and repeats included)")
    if args.out:
        result = {"k": args.k, "dtype": args.dtype, "device": f"cpu ({os.cpu_count()} cores, torch threads "
                  f"{torch.get_num_threads()})", "rows": rows, "speedup_all": total_off / total_ngram,
                  "spec_decode": summary}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
