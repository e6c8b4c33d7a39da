"""Property tests: random mixes of add / abort / stop / step / cache reset against the scheduler and a fake runner
that simulates the paged KV cache. Requests come alone or in a few shared groups (as the n sequences of one
request do), some with prompt logprobs. After every operation: budgets, the sequence cap and the per-step cap
on prompt-logprob positions hold, the running count per group matches the running list, each block's ref
count equals its live holders, free <=> unreferenced, free + used == total, and every request attends to exactly
its own prefix. At the end (drained or aborted): nothing leaks."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagellm.core.kv_cache_manager import cdiv
from pagellm.core.request import RequestStatus

from tests.core.core_sim import EOS, FakeRunner, check_drained, check_invariants, check_step, make_request, make_scheduler, scheduled

# Prompts start with a prefix of one of a few base sequences, then a short tail from a tiny alphabet: many
# requests share prefixes (and whole prompts), which exercises prefix hits, shared blocks and eviction.
BASES = [
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    [7, 8, 9, 10, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41],
    [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65],
]
STOP_TOKEN = 4
VOCAB = (3, 4, 5)


class Tracker:
    """The scheduler plus everything the tests remember about each request."""

    def __init__(self, cfg: dict, seed: int, eos_prob: float) -> None:
        self.cfg = cfg
        self.sched = make_scheduler(**cfg)
        self.runner = FakeRunner(cfg["block_size"], seed=seed, vocab=VOCAB, eos_prob=eos_prob)
        self.requests = {}  # every request ever added
        self.emitted: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.next_id = 0

    def add(self, base: int, prefix_len: int, tail: list[int], max_tokens: int, min_tokens: int,
            priority: int, ignore_eos: bool, use_stop: bool, group: int = -1,
            prompt_logprobs: int = -1) -> None:
        """group: one of a few shared groups, or -1 (alone); prompt_logprobs: -1 for none."""
        prompt = (BASES[base][:prefix_len] + tail) or [3]
        prompt = prompt[: self.cfg["max_model_len"] - 1]
        rid = f"r{self.next_id}"
        self.next_id += 1
        req = make_request(rid, prompt, max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
                           ignore_eos=ignore_eos, stop_token_ids=[STOP_TOKEN] if use_stop else None,
                           priority=priority if self.cfg["policy"] == "priority" else 0,
                           arrival_time=float(self.next_id % 5), group_id=f"g{group}" if group >= 0 else None,
                           prompt_logprobs=prompt_logprobs if prompt_logprobs >= 0 else None)
        self.sched.add_request(req)
        self.requests[rid] = req
        self.emitted[rid] = []

    def live_ids(self) -> list[str]:
        return sorted(self.sched.requests)

    def finish(self, rid: str, status: RequestStatus) -> None:
        was_live = rid in self.sched.requests
        self.sched.finish_requests([rid], status)
        assert rid not in self.sched.requests
        if was_live:
            self.reasons[rid] = RequestStatus.finish_reason(status)

    def step(self) -> None:
        sched = self.sched
        live_before = set(sched.requests)
        so = sched.schedule()
        check_step(sched, so)
        assert {rid for rid, _, _ in scheduled(so)} <= live_before
        runner_output = self.runner.execute(so)
        sampling = {v.req_id for v in self.runner.last_step if v.do_sample}
        assert set(runner_output.req_ids) == sampling
        outs = sched.update_from_output(so, runner_output)
        for o in outs:
            assert o.req_id not in self.reasons, "output after finishing"
            assert o.req_id in live_before
            if o.new_token_ids:  # one token, or (verifying drafts) up to one more than the drafts
                assert o.req_id in sampling
                assert 1 <= len(o.new_token_ids) <= 1 + len(so.cached.spec_token_ids.get(o.req_id, ()))
            self.emitted[o.req_id].extend(o.new_token_ids)
            if o.finished:
                self.reasons[o.req_id] = o.finish_reason
                assert o.req_id not in sched.requests
        for rid in sampling:  # every sampled token was reported
            assert self.emitted[rid] == self.requests[rid].output_token_ids

    def check_outputs(self) -> None:
        cfg = self.cfg
        for rid, req in self.requests.items():
            out = self.emitted[rid]
            assert out == req.output_token_ids
            sp = req.sampling_params
            assert len(out) <= sp.max_tokens
            assert req.num_tokens <= cfg["max_model_len"]
            stops = ({EOS} if not sp.ignore_eos else set()) | set(sp.stop_token_ids)
            for i, tok in enumerate(out[:-1]):  # no stop token went unnoticed once min_tokens were out
                assert i + 1 < sp.min_tokens or tok not in stops, (rid, out)
            reason = self.reasons.get(rid)
            if rid in self.sched.requests:
                assert reason is None
                continue
            assert reason is not None
            if reason == "stop" and req.status == RequestStatus.FINISHED_STOPPED and out and out[-1] in stops \
                    and len(out) >= sp.min_tokens:
                continue
            if reason == "length":
                too_big = cdiv(req.num_tokens, cfg["block_size"]) > cfg["num_blocks"]
                assert len(out) == sp.max_tokens or req.num_tokens == cfg["max_model_len"] or too_big, (rid, out)
            elif reason == "stop":
                assert req.status == RequestStatus.FINISHED_STOPPED  # a stop string from outside
            else:
                assert reason == "abort"

    def drain(self, max_steps: int = 3000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                break
            self.step()
            check_invariants(self.sched)
        check_drained(self.sched)
        self.check_outputs()


def make_config(block_size, max_model_len, extra_blocks, **kw) -> dict:
    """The pool holds about one max_model_len sequence, plus or minus a few blocks: preemption is common, and
    now and then a sequence outgrows the whole pool."""
    return dict(block_size=block_size, max_model_len=max_model_len,
                num_blocks=max(1, cdiv(max_model_len, block_size) + extra_blocks), **kw)


configs = st.builds(
    make_config,
    block_size=st.sampled_from([1, 2, 4]),
    max_model_len=st.integers(2, 40),
    extra_blocks=st.integers(-2, 12),
    max_num_batched_tokens=st.integers(1, 24),
    max_num_seqs=st.integers(1, 5),
    policy=st.sampled_from(["fcfs", "priority"]),
    enable_prefix_caching=st.booleans(),
)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(cfg=configs, seed=st.integers(0, 2**16), eos_prob=st.sampled_from([0.0, 0.15]),
                drain_at_end=st.booleans())
    def setup(self, cfg, seed, eos_prob, drain_at_end):
        self.t = Tracker(cfg, seed, eos_prob)
        self.drain_at_end = drain_at_end

    @rule(base=st.integers(0, len(BASES) - 1), prefix_len=st.integers(0, 16),
          tail=st.lists(st.sampled_from(VOCAB), max_size=5), max_tokens=st.integers(1, 12),
          min_tokens=st.integers(0, 3), priority=st.integers(0, 2), ignore_eos=st.booleans(), use_stop=st.booleans(),
          group=st.integers(-1, 2), prompt_logprobs=st.sampled_from([-1, -1, -1, 0, 2]))
    def add(self, **kw):
        self.t.add(**kw)

    @precondition(lambda self: self.t.sched.has_unfinished_requests())
    @rule(data=st.data(), status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
    def finish_one(self, data, status):
        self.t.finish(data.draw(st.sampled_from(self.t.live_ids())), status)

    @rule()
    def finish_unknown(self):
        self.t.sched.finish_requests(["nope"], RequestStatus.FINISHED_ABORTED)
        if self.t.reasons:  # finishing a finished request again is ignored too
            self.t.sched.finish_requests(list(self.t.reasons)[:1], RequestStatus.FINISHED_ABORTED)

    @rule(n=st.integers(1, 6))
    def step(self, n):
        for _ in range(n):
            self.t.step()
            check_invariants(self.t.sched)

    @precondition(lambda self: self.t.next_id % 7 == 3)
    @rule()
    def reset_prefix_cache(self):
        self.t.sched.reset_prefix_cache()

    @invariant()
    def invariants(self):
        if hasattr(self, "t"):
            check_invariants(self.t.sched)

    def teardown(self):
        if not hasattr(self, "t"):
            return
        if self.drain_at_end:
            self.t.drain()
        else:
            for rid in self.t.live_ids():
                self.t.finish(rid, RequestStatus.FINISHED_ABORTED)
            check_drained(self.t.sched)
            self.t.check_outputs()


SchedulerMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSchedulerMachine = SchedulerMachine.TestCase


def random_run(seed: int, add_prob: float, finish_prob: float, prompt_logprobs: list[int],
               max_drafts: int = 0) -> Tracker:
    """One non-shrinking random run: a random config and 150 random operations (add, finish, step), the
    invariants checked after each, then drained. max_drafts > 0: the runner proposes up to that many drafts and
    the scheduler verifies up to a random num_speculative_tokens of them."""
    rng = random.Random(seed)
    spec = {"num_speculative_tokens": rng.randint(1, 6)} if max_drafts else {}
    cfg = make_config(
        block_size=rng.choice([1, 2, 4, 8]),
        max_model_len=rng.randint(2, 64),
        extra_blocks=rng.randint(-2, 16),
        max_num_batched_tokens=rng.randint(1, 48),
        max_num_seqs=rng.randint(1, 8),
        policy=rng.choice(["fcfs", "priority"]),
        enable_prefix_caching=rng.random() < 0.8,
        **spec,
    )
    t = Tracker(cfg, seed, rng.choice([0.0, 0.1]))
    if max_drafts:
        t.runner.max_drafts = rng.randint(1, max_drafts)  # may propose more than the scheduler verifies
    for _ in range(150):
        op = rng.random()
        if op < add_prob:
            tail = [rng.choice(VOCAB) for _ in range(rng.randint(0, 6))]
            t.add(rng.randrange(len(BASES)), rng.randint(0, 16), tail, rng.randint(1, 16), rng.randint(0, 3),
                  rng.randint(0, 2), rng.random() < 0.5, rng.random() < 0.3, group=rng.randint(-1, 2),
                  prompt_logprobs=rng.choice(prompt_logprobs))
        elif op < add_prob + finish_prob and t.live_ids():
            t.finish(rng.choice(t.live_ids()),
                     rng.choice([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
        else:
            t.step()
        check_invariants(t.sched)
    t.drain()
    return t


def test_random_driver_many_seeds():
    """A cheaper, non-shrinking driver for volume: random configs and long random operation mixes."""
    for seed in range(40):
        random_run(seed, 0.35, 0.10, [-1, -1, -1, 0, 2])
