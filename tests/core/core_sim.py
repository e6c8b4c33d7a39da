"""Helpers for the core tests: a scheduler factory, a fake model runner that simulates the paged KV cache,
and the invariants that must hold after every step."""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional

from pagellm.core.kv_cache_manager import cdiv
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.core.scheduler import Scheduler
from pagellm.sampling_params import SamplingParams

EOS = 2


class _Cfg:
    """Duck-typed SchedulerConfig / CacheConfig (pagellm.config imports torch; the core only reads fields)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 128,
    policy: str = "fcfs",
    enable_prefix_caching: bool = True,
    async_scheduling: bool = False,
) -> Scheduler:
    sched_cfg = _Cfg(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, policy=policy, max_queued_requests=None,
                     async_scheduling=async_scheduling)
    cache_cfg = _Cfg(block_size=block_size, enable_prefix_caching=enable_prefix_caching, num_blocks=num_blocks)
    return Scheduler(sched_cfg, cache_cfg)


def make_request(
    req_id: str,
    prompt: list[int],
    max_tokens: Optional[int] = 8,
    *,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    stop_token_ids: Optional[list[int]] = None,
    priority: int = 0,
    arrival_time: Optional[float] = None,
    prompt_logprobs: Optional[int] = None,
) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos,
                        stop_token_ids=stop_token_ids, prompt_logprobs=prompt_logprobs)
    sp.all_stop_token_ids = set(sp.stop_token_ids) | (set() if ignore_eos else {EOS})
    return Request(req_id, prompt, sp, EOS, arrival_time=arrival_time, priority=priority)


class FakeRunner:
    """Simulates the paged KV cache: every slot holds the whole token prefix whose KV it stands for.

    As in a real forward pass, all new K/V of a step are written before any attention reads; then every
    scheduled request checks that its block table holds exactly its own prefix at every position it attends to.
    """

    def __init__(self, block_size: int, seed: int = 0, vocab: tuple[int, ...] = (3, 4, 5, 6), eos_prob: float = 0.0):
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.eos_prob = eos_prob
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}
        self.forced: dict[str, list[int]] = {}  # req id -> tokens to sample next, in order

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.block_size
        seqs = {}
        for sr in out.scheduled:
            seq = list(sr.prompt_token_ids) + list(sr.output_token_ids)
            seqs[sr.req_id] = seq
            end = sr.num_computed_tokens + len(sr.token_ids)
            assert sr.token_ids == seq[sr.num_computed_tokens:end], "scheduled tokens are not the next ones"
            assert len(sr.block_ids) == cdiv(end, bs), "block table does not cover the step exactly"
            for pos in range(sr.num_computed_tokens, end):
                self.slots[(sr.block_ids[pos // bs], pos % bs)] = tuple(seq[: pos + 1])
        result = ModelRunnerOutput()
        for sr in out.scheduled:
            seq = seqs[sr.req_id]
            end = sr.num_computed_tokens + len(sr.token_ids)
            for pos in range(end):
                got = self.slots.get((sr.block_ids[pos // bs], pos % bs))
                assert got == tuple(seq[: pos + 1]), f"{sr.req_id}: wrong KV at position {pos}"
            assert sr.do_sample == (end == len(seq))
            if sr.do_sample:
                forced = self.forced.get(sr.req_id)
                if forced:
                    tok = forced.pop(0)
                elif self.rng.random() < self.eos_prob:
                    tok = EOS
                else:
                    tok = self.rng.choice(self.vocab)
                result.sampled_token_ids[sr.req_id] = tok
        return result


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """What a SchedulerOutput must respect."""
    n = sum(len(sr.token_ids) for sr in out.scheduled)
    assert n == out.num_batched_tokens
    assert n <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    assert len({sr.req_id for sr in out.scheduled}) == len(out.scheduled)
    assert all(len(sr.token_ids) > 0 for sr in out.scheduled)
    for sr in out.scheduled:
        assert sr.num_computed_tokens + len(sr.token_ids) <= sched.max_model_len


def check_invariants(sched: Scheduler) -> None:
    """Block accounting and request bookkeeping, between any two operations."""
    kvm = sched.kv_cache_manager
    pool = kvm.block_pool
    bs = kvm.block_size

    # Requests: every unfinished request is running xor waiting; only running ones hold blocks.
    running_ids = [r.request_id for r in sched.running]
    waiting = list(sched.waiting)
    assert len(set(running_ids)) == len(running_ids)
    assert len(sched.running) <= sched.max_num_seqs
    assert set(running_ids) | {r.request_id for r in waiting} == set(sched.requests)
    assert len(running_ids) + len(waiting) == len(sched.requests)
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert 0 < r.num_computed_tokens <= r.num_tokens <= sched.max_model_len
        blocks = kvm.req_to_blocks[r.request_id]
        assert len(blocks) == cdiv(r.num_computed_tokens, bs)
        assert len({id(b) for b in blocks}) == len(blocks), "a block twice in one table"
        for i, b in enumerate(blocks):
            if b.block_hash is not None:  # a cached block is exactly this request's prefix
                assert b.block_hash == r.block_hashes[i]
    for r in waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
    assert set(kvm.req_to_blocks) == set(running_ids)

    # Blocks: ref counts are exactly the live holders; free <=> ref 0; free + used == total.
    holders = Counter(id(b) for blocks in kvm.req_to_blocks.values() for b in blocks)
    free = list(pool.free_block_queue)
    free_ids = {id(b) for b in free}
    assert len(free) == len(free_ids) == pool.get_num_free_blocks()
    used = 0
    for b in pool.blocks:
        assert b.ref_cnt == holders.get(id(b), 0), f"{b}: ref count != holders"
        assert (b.ref_cnt == 0) == (id(b) in free_ids), f"{b}: free and referenced, or neither"
        used += b.ref_cnt > 0
    assert used + pool.get_num_free_blocks() == pool.num_blocks
    assert abs(kvm.usage - used / pool.num_blocks) < 1e-9

    # Prefix cache map <=> block hashes.
    for h, b in pool.cached_blocks.items():
        assert b.block_hash == h
    assert sum(b.block_hash is not None for b in pool.blocks) == len(pool.cached_blocks)
    if not kvm.enable_caching:
        assert not pool.cached_blocks


def check_drained(sched: Scheduler) -> None:
    assert not sched.has_unfinished_requests()
    assert not sched.running and not len(sched.waiting)
    pool = sched.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert pool.get_num_free_blocks() == pool.num_blocks
    assert sched.kv_cache_manager.usage == 0.0
    assert not sched.kv_cache_manager.req_to_blocks


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> dict[str, list]:
    """Step until nothing is left; returns req id -> list of EngineCoreOutputs."""
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outs
        so = sched.schedule()
        check_step(sched, so)
        for o in sched.update_from_output(so, runner.execute(so)):
            outs.setdefault(o.req_id, []).append(o)
        check_invariants(sched)
    raise AssertionError("the scheduler did not finish its requests")
