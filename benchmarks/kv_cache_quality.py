"""What an FP8 KV cache costs in quality on the real embedded model: teacher-forced logprobs of a fixed text.

The embedded SmolLM2-135M (float32 on the CPU) reads each fixed text once as a prompt (prompt_logprobs, one
prefill, so every attention read goes through the cache) with the KV cache in float32 and in FP8 e4m3. At
every position it compares the two runs' top-1 next token, and the logprob each gives the text's actual next
token: top-1 agreement and mean / max absolute logprob difference (issue 15's targets: >= 90% and < 0.1).

    python benchmarks/kv_cache_quality.py [--kv-cache-dtype fp8] [--out benchmarks/results/cpu-kvfp8-quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pagellm import LLM, SamplingParams

PROSE = (
    "The lighthouse keeper had kept the same routine for thirty years. Every evening, an hour before sunset, he "
    "climbed the one hundred and twelve steps of the tower, wiped the salt from the great lens, trimmed the wick "
    "and checked the oil. Then he sat by the window with a mug of tea and watched the boats come home. Most of "
    "them he knew by the shape of their sails: the red one belonged to the baker's brother, the patched grey one "
    "to a widow who fished alone and never spoke of why. In winter the storms came from the north and the waves "
    "broke so high against the rocks that the spray reached the lamp room. On those nights he did not sleep at "
    "all. He listened to the wind, counted the seconds between the flashes of the beam, and wrote in his log "
    "the time, the direction of the wind and the height of the sea. When the government wrote to say that the "
    "light would be made automatic and that his service was no longer required, he read the letter twice, "
    "folded it carefully and put it in the drawer with the others. The next morning he climbed the stairs as "
    "usual. A machine, he thought, could turn a lamp on and off, but it could not tell the baker's brother that "
    "the sea was too rough to go out, and it would not notice when the grey sail failed to return."
)
CODE = '''def binary_search(items, target):
    """Return the index of target in the sorted list items, or -1 if it is absent."""
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1


def word_counts(text):
    """Count how often each word occurs, ignoring case and punctuation."""
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?\\"'()")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
'''
TEXTS = {"prose": PROSE, "code": CODE}


def _top(entry: dict) -> int:
    return max(entry.items(), key=lambda kv: kv[1].logprob)[0]


def teacher_forced(llm: LLM, text: str) -> tuple[list[int], list[dict]]:
    """The text's token ids and, per position after the first, {token id: Logprob} (its own token and top-1)."""
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    return out.prompt_token_ids, out.prompt_logprobs


def compare(ids: list[int], ref: list[dict], other: list[dict]) -> dict:
    same, diffs = 0, []
    for pos in range(1, len(ids)):
        same += _top(ref[pos]) == _top(other[pos])
        diffs.append(abs(ref[pos][ids[pos]].logprob - other[pos][ids[pos]].logprob))
    n = len(diffs)
    return {"positions": n, "top1_agreement": same / n, "mean_abs_logprob_diff": sum(diffs) / n,
            "max_abs_logprob_diff": max(diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-cache-dtype", default="fp8", help="the cache compared with the float32 one")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    common = dict(dtype="float32", max_model_len=2048, kv_cache_memory=128 * 2**20, enable_prefix_caching=False)
    start = time.perf_counter()
    ref_llm = LLM(**common)
    other_llm = LLM(**common, kv_cache_dtype=args.kv_cache_dtype)
    rows, all_ids, all_ref, all_other = {}, [], [], []
    for name, text in TEXTS.items():
        ids, ref = teacher_forced(ref_llm, text)
        ids2, other = teacher_forced(other_llm, text)
        assert ids == ids2
        rows[name] = compare(ids, ref, other)
        # Pool the positions of all texts (the first position of each has no logprob and is skipped).
        all_ids += [None] + ids[1:]
        all_ref += [None] + ref[1:]
        all_other += [None] + other[1:]
    pooled = [i for i, t in enumerate(all_ids) if t is not None]
    same = sum(_top(all_ref[i]) == _top(all_other[i]) for i in pooled)
    diffs = [abs(all_ref[i][all_ids[i]].logprob - all_other[i][all_ids[i]].logprob) for i in pooled]
    results = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "reference_kv_cache": "float32",
        "kv_cache_dtype": args.kv_cache_dtype,
        "device": f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "texts": rows,
        "all": {"positions": len(pooled), "top1_agreement": same / len(pooled),
                "mean_abs_logprob_diff": sum(diffs) / len(diffs), "max_abs_logprob_diff": max(diffs)},
        "targets": {"top1_agreement": ">= 0.90", "mean_abs_logprob_diff": "< 0.1"},
        "seconds": time.perf_counter() - start,
    }
    for name, row in {**rows, "all": results["all"]}.items():
        print(f"{name:<6} {row['positions']:4d} positions  top-1 agreement {row['top1_agreement']:.4f}  "
              f"mean |dlogprob| {row['mean_abs_logprob_diff']:.4f}  max {row['max_abs_logprob_diff']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
