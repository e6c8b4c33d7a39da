"""GPU timings for the benchmark scripts: eager calls between CUDA events (events_ms), or the work captured in a
CUDA graph and replayed (graph_ms; graph_ms_cold with the L2 cache flushed before each call).

Timing small kernels with CUDA events around eager calls measures the host's launch time when it exceeds the
kernels' (tens of microseconds a call); the engine's decode steps replay CUDA graphs, where that time is gone.
"""

from __future__ import annotations

import statistics

import torch


def events_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `repeats` eager calls of fn (CUDA events around each), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of fn, captured `reps` times in one CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (10 * reps)


def graph_ms_cold(fn, reps: int = 10, flush_mib: int = 128) -> float:
    """graph_ms of fn with the L2 cache flushed before each call: a write of flush_mib MiB (more than the L2 of
    an H100/H200) captured between the calls, its own replay time subtracted. This is the time of a kernel that
    reads its operands from memory, as each layer of a decode step finds them; graph_ms alone would let a
    small layer's weights stay in L2 between replays."""
    flush = torch.empty(flush_mib * 2**20 // 4, dtype=torch.int32, device="cuda")
    both = graph_ms(lambda: (flush.zero_(), fn()), reps)
    alone = graph_ms(flush.zero_, reps)
    return max(both - alone, 0.0)
