"""The timed parts that every `pagellm bench throughput` workload shares: pagellm's run (a short warm-up, then
one generate call on the clock) and the transformers peer's (static batches, left-padded, each batch run to its
longest output), and freeing the device between the two, since the peer runs next in the same process."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Iterable, Optional

import torch


def timed_generate(llm: Any, prompts: list, params: list, expected_tokens: int) -> tuple[float, list]:
    """(seconds, outputs) of llm.generate(prompts, params), after a 2-request warm-up so that one-time costs
    (allocator, lazy init) are not timed; RuntimeError if the outputs do not hold expected_tokens tokens."""
    from pagellm.sampling_params import SamplingParams

    llm.generate(prompts[:2], [SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)] * 2, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    got = sum(len(o.outputs[0].token_ids) for o in outputs)
    if got != expected_tokens:
        raise RuntimeError(f"pagellm generated {got} tokens, the workload asks for {expected_tokens}")
    return elapsed, outputs


def profile_kernels(run, tokens: int, top: int = 15) -> dict[str, float]:
    """Run once under torch.profiler; print and return the `top` GPU kernels by total time, in microseconds per
    output token (kernels inside CUDA-graph replays are traced too), with the sum over all kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6 / tokens
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            times[event.key] = times.get(event.key, 0.0) + event.self_device_time_total / tokens
    ranked = dict(sorted(times.items(), key=lambda kv: -kv[1])[:top])
    ranked["all kernels"] = sum(times.values())
    ranked["wall time (profiled run)"] = wall_us
    print(f"GPU kernels, us per output token ({tokens} tokens; the GPU is busy for "
          f"{100 * ranked['all kernels'] / wall_us:.0f}% of the profiled run's wall time):")
    for name, us in ranked.items():
        print(f"  {us:9.1f}  {name[:100]}")
    return ranked


def free_device_memory() -> None:
    """After the engine is shut down and its last reference dropped: collect it and give its device memory back
    before the peer loads its model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [batch, longest prompt], each prompt at the right end of its row."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    return ids, mask


Batch = tuple[list[list[int]], int, Optional[Callable[[torch.Tensor], dict[str, torch.Tensor]]]]


def time_peer_generate(model: Any, device: str, batches: Iterable[Batch], pad_id: int = 0) -> float:
    """Seconds of transformers' greedy generate() over `batches`: (prompt ids, output length, a function of the
    padded input_ids giving the batch's other inputs or None). Each batch is left-padded and run to exactly its
    output length; the batches' own preparation (a generator's work, e.g. image processing) is on the clock."""
    start = time.perf_counter()
    for prompts, max_out, extra in batches:
        ids, mask = left_padded(prompts, pad_id)
        inputs = extra(ids) if extra is not None else {}
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **inputs, max_new_tokens=max_out,
                           min_new_tokens=max_out, do_sample=False, pad_token_id=pad_id)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peer_result(batch_size: int, seconds: float, dtype: torch.dtype) -> dict[str, Any]:
    return {"engine": f"transformers generate() static batches of {batch_size}, left-padded", "seconds": seconds,
            "dtype": str(dtype).replace("torch.", "")}
