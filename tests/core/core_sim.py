"""Helpers for the core tests: a scheduler factory, a fake model runner that simulates the paged KV cache,
and the invariants that must hold after every step."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
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
    num_speculative_tokens: int = 0,
) -> Scheduler:
    sched_cfg = _Cfg(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, policy=policy, max_queued_requests=None,
                     async_scheduling=async_scheduling)
    cache_cfg = _Cfg(block_size=block_size, enable_prefix_caching=enable_prefix_caching, num_blocks=num_blocks)
    spec_cfg = _Cfg(num_speculative_tokens=num_speculative_tokens) if num_speculative_tokens else None
    return Scheduler(sched_cfg, cache_cfg, spec_cfg)


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
    group_id: Optional[str] = None,
) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos,
                        stop_token_ids=stop_token_ids, prompt_logprobs=prompt_logprobs)
    sp.all_stop_token_ids = set(sp.stop_token_ids) | (set() if ignore_eos else {EOS})
    return Request(req_id, prompt, sp, EOS, arrival_time=arrival_time, priority=priority, group_id=group_id)


@dataclass
class StepView:
    """One request's share of a step, as a runner sees it after applying the message."""

    req_id: str
    num_computed_tokens: int
    token_ids: list[int]  # the input tokens the runner put together from what the messages carried
    do_sample: bool


@dataclass
class _Held:
    """What the runner holds of one request: the tokens messages gave it (by position), its block table, the
    last token it sampled (kept on the device by a real runner), and the true sequence to check against."""

    host: dict[int, int]
    truth: list[int]
    blocks: list[int]
    last: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return len(self.truth)


def scheduled(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request id, num_computed_tokens, num_scheduled_tokens) of each request of a step message."""
    views = [(r.req_id, r.num_computed_tokens, r.num_scheduled_tokens) for r in out.new_reqs]
    c = out.cached
    return views + list(zip(c.req_ids, c.num_computed_tokens, c.num_scheduled_tokens))


class FakeRunner:
    """A model runner that keeps its state from the step messages' deltas, and simulates the paged KV cache:
    every slot holds the whole token prefix whose KV it stands for.

    It builds each step's input tokens only from what the messages carried plus its own last sampled token (as
    a real non-driver rank must), and checks them against the true sequence. As in a real forward pass, all new
    K/V of a step are written before any attention reads; then every scheduled request checks that its block
    table holds exactly its own prefix at every position it attends to.
    """

    def __init__(self, block_size: int, seed: int = 0, vocab: tuple[int, ...] = (3, 4, 5, 6), eos_prob: float = 0.0,
                 max_drafts: int = 0):
        """max_drafts: speculative decoding: after sampling, propose 0..max_drafts random drafts per request;
        a verify step accepts a random number of them (its KV at rejected positions is wrong, as in a real
        runner, until recomputed)."""
        self.block_size = block_size
        self.max_drafts = max_drafts
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.eos_prob = eos_prob
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}
        self.forced: dict[str, list[int]] = {}  # req id -> tokens to sample next, in order
        self.held: dict[str, _Held] = {}
        self.last_step: list[StepView] = []
        self.drafts: dict[str, list[int]] = {}  # req id -> the drafts the current step verifies

    def apply(self, out: SchedulerOutput) -> list[StepView]:
        """Update the held state from a step message; the step's requests with their input tokens."""
        for rid in [*out.finished_req_ids, *out.preempted_req_ids]:
            self.held.pop(rid, None)
        for r in out.new_reqs:
            assert r.req_id not in self.held, f"{r.req_id}: sent in full while the runner holds it"
            tokens = list(r.prompt_token_ids) + list(r.output_token_ids)
            self.held[r.req_id] = _Held(dict(enumerate(tokens)), tokens, list(r.block_ids))
        c = out.cached
        self.drafts = dict(c.spec_token_ids)
        for rid, blocks, start, n, new in zip(c.req_ids, c.new_block_ids, c.num_computed_tokens,
                                              c.num_scheduled_tokens, c.new_token_ids):
            assert rid in self.held, f"{rid}: a delta for a request the runner does not hold"
            held = self.held[rid]
            held.blocks += blocks
            drafts = self.drafts.get(rid, [])
            end = start + n - len(drafts)
            for k, tok in enumerate(new):
                held.host[end - len(new) + k] = tok
            for k, tok in enumerate(drafts):
                held.host[end + k] = tok
        views = []
        for rid, start, n in scheduled(out):
            held = self.held[rid]
            inputs = []
            for pos in range(start, start + n):
                if pos in held.host:
                    inputs.append(held.host[pos])
                else:  # only a decode may read the last sampled token, and only as its own input
                    assert n == 1 and pos == held.num_tokens - 1 and held.last is not None, \
                        f"{rid}: no input token for position {pos}"
                    inputs.append(held.last)
            expected = (held.truth + self.drafts.get(rid, []))[start : start + n]
            assert inputs == expected, f"{rid}: scheduled tokens are not the next ones"
            views.append(StepView(rid, start, inputs, start + n >= held.num_tokens))
        return views

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.block_size
        views = self.apply(out)
        self.last_step = views
        for v in views:
            held = self.held[v.req_id]
            seq = held.truth + self.drafts.get(v.req_id, [])
            end = v.num_computed_tokens + len(v.token_ids)
            assert len(held.blocks) == cdiv(end, bs), "block table does not cover the step exactly"
            for pos in range(v.num_computed_tokens, end):
                self.slots[(held.blocks[pos // bs], pos % bs)] = tuple(seq[: pos + 1])
        result = ModelRunnerOutput()
        for v in views:
            held = self.held[v.req_id]
            drafts = self.drafts.get(v.req_id, [])
            seq = held.truth + drafts
            end = v.num_computed_tokens + len(v.token_ids)
            for pos in range(end):
                got = self.slots.get((held.blocks[pos // bs], pos % bs))
                assert got == tuple(seq[: pos + 1]), f"{v.req_id}: wrong KV at position {pos}"
            if drafts:  # verify: a random number of drafts accepted, then one token of the target's
                accepted = drafts[: self.rng.randint(0, len(drafts))]
                tok = self._sample(v.req_id)
                held.truth += accepted + [tok]
                held.last = tok
                held.blocks = held.blocks[: cdiv(v.num_computed_tokens + len(accepted) + 1, bs)]
                result.req_ids.append(v.req_id)
                result.sampled_token_ids.append(accepted + [tok])
                self._propose(v.req_id, result)
            elif v.do_sample:
                tok = self._sample(v.req_id)
                held.truth.append(tok)
                held.last = tok
                result.req_ids.append(v.req_id)
                result.sampled_token_ids.append([tok])
                self._propose(v.req_id, result)
        return result

    def _sample(self, req_id: str) -> int:
        forced = self.forced.get(req_id)
        if forced:
            return forced.pop(0)
        if self.rng.random() < self.eos_prob:
            return EOS
        return self.rng.choice(self.vocab)

    def _propose(self, req_id: str, result: ModelRunnerOutput) -> None:
        if self.max_drafts:
            n = self.rng.randint(0, self.max_drafts)
            if n:
                result.spec_token_ids[req_id] = [self.rng.choice(self.vocab) for _ in range(n)]


def prompt_logprob_positions(sched: Scheduler, out: SchedulerOutput) -> int:
    """Prompt-logprob positions a step computes (call it before the step's update: finished requests leave)."""
    total = 0
    for rid, start, count in scheduled(out):
        r = sched.requests[rid]
        if r.sampling_params.prompt_logprobs is not None:
            total += max(0, min(start + count, r.num_prompt_tokens - 1) - start)
    return total


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """What a SchedulerOutput must respect (called right after schedule())."""
    views = scheduled(out)
    n = sum(count for _, _, count in views)
    assert n == out.num_batched_tokens
    assert n <= sched.max_num_batched_tokens
    assert len(views) <= sched.max_num_seqs
    assert len({rid for rid, _, _ in views}) == len(views)
    assert all(count > 0 for _, _, count in views)
    for _, start, count in views:
        assert start + count <= sched.max_model_len
    assert prompt_logprob_positions(sched, out) <= sched.max_prompt_logprobs_per_step


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
    # Groups: the waiting queue's count of running sequences per group is the running list's.
    assert sched.waiting.running_counts == dict(Counter(r.group_id for r in sched.running))
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
