"""Fairness between user requests (groups of sequences) and the per-step cap on prompt logprobs: counted in
steps, never in time."""

from __future__ import annotations

from pagellm.core.request import RequestStatus
from pagellm.core.sched_queue import FairQueue

from tests.core.core_sim import FakeRunner, check_drained, check_invariants, check_step, make_request, \
    make_scheduler, prompt_logprob_positions, scheduled


def step(sched, runner):
    so = sched.schedule()
    check_step(sched, so)
    outs = sched.update_from_output(so, runner.execute(so))
    check_invariants(sched)
    return so, outs


def add_group(sched, group, count, prompt, max_tokens, **kw):
    for i in range(count):
        sched.add_request(make_request(f"{group}{i}", list(prompt), max_tokens=max_tokens, ignore_eos=True,
                                       group_id=group, **kw))


def test_queue_serves_the_group_that_runs_fewest_first():
    q = FairQueue(priority_policy=False)
    big = [make_request(f"b{i}", [3], group_id="big") for i in range(3)]
    for r in big:
        q.add(r)
    q.count_running(big[0], +1)  # a sequence of "big" runs elsewhere
    small = make_request("s", [3], group_id="small")
    q.add(small)
    assert q.peek() is small  # it came last, but its group runs nothing
    q.pop()
    q.count_running(small, +1)
    assert q.peek() is big[0]  # 1 running each now: the group that came first
    preempted = make_request("p", [3], group_id="big")
    q.add_front(preempted)
    assert q.peek() is preempted and len(q) == 4
    assert [r.request_id for r in q] == ["p", "b0", "b1", "b2"]
    q.remove(big[1])
    assert [r.request_id for r in q] == ["p", "b0", "b2"]


def test_queue_priority_first_fairness_among_equals():
    q = FairQueue(priority_policy=True)
    running_group = make_request("x", [3], group_id="hi", priority=0, arrival_time=0.0)
    q.count_running(running_group, +1)
    hi = make_request("hi1", [3], group_id="hi", priority=0, arrival_time=0.0)
    lo = make_request("lo", [3], group_id="lo", priority=1, arrival_time=1.0)
    eq = make_request("eq", [3], group_id="eq", priority=0, arrival_time=2.0)
    for r in (lo, hi, eq):
        q.add(r)
    # Priority first (lo waits last although nothing of it runs), then fewest running ("eq" before "hi").
    assert [r.request_id for r in q] == ["eq", "hi1", "lo"]
    assert q.pop() is eq


def test_small_request_behind_a_big_group_gets_a_seat_within_two_steps():
    """8 seats, a group of 32 sequences holds all of them; a 1-sequence request then arrives. It is scheduled
    within 2 steps (the big group's newest sequence gives its seat back) and finishes while the big group still
    has sequences running and waiting."""
    sched = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                           max_model_len=64)
    runner = FakeRunner(4)
    add_group(sched, "big", 32, [7, 8, 9, 10, 11], max_tokens=20)
    for _ in range(3):
        step(sched, runner)
    assert sched.num_running == 8 and sched.waiting.num_running("big") == 8
    sched.add_request(make_request("small", [20, 21, 22], max_tokens=3, ignore_eos=True))
    steps = 0
    preempted = set()
    while True:
        so, outs = step(sched, runner)
        steps += 1
        preempted |= set(so.preempted_req_ids)
        if "small" in {rid for rid, _, _ in scheduled(so)}:
            break
        assert steps < 2
    assert preempted == {"big7"}  # the newest sequence of the big group
    finished_at = None
    for extra in range(10):
        _, outs = step(sched, runner)
        if any(o.req_id == "small" and o.finished for o in outs):
            finished_at = extra
            break
    assert finished_at is not None and finished_at <= 3
    assert sched.waiting.num_running("big") >= 7 and len(sched.waiting) > 0  # the big group goes on
    while sched.has_unfinished_requests():
        step(sched, runner)
    check_drained(sched)
    assert sched.num_preemptions_total == 1  # one seat moved, and it did not move back


def test_two_big_groups_share_the_seats_evenly():
    sched = make_scheduler(num_blocks=512, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                           max_model_len=80)
    runner = FakeRunner(4)
    add_group(sched, "a", 16, [7, 8, 9], max_tokens=60)
    for _ in range(2):
        step(sched, runner)
    add_group(sched, "b", 16, [40, 41, 42], max_tokens=60)
    for _ in range(8):
        step(sched, runner)
    counts = sched.waiting.running_counts
    assert counts == {"a": 4, "b": 4}


def test_no_preemption_for_a_group_of_lower_priority():
    sched = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=4, policy="priority", max_model_len=64)
    runner = FakeRunner(4)
    add_group(sched, "big", 8, [7, 8, 9], max_tokens=10, priority=0, arrival_time=0.0)
    step(sched, runner)
    sched.add_request(make_request("low", [20, 21], max_tokens=2, ignore_eos=True, priority=1, arrival_time=1.0))
    for _ in range(3):
        so, _ = step(sched, runner)
        assert not so.preempted_req_ids and "low" not in {rid for rid, _, _ in scheduled(so)}
    sched.add_request(make_request("equal", [20, 22], max_tokens=2, ignore_eos=True, priority=0,
                                   arrival_time=2.0))
    so, _ = step(sched, runner)
    assert so.preempted_req_ids == ["big3"] and "equal" in {rid for rid, _, _ in scheduled(so)}


def test_a_victim_in_flight_sits_out_one_step_then_gives_its_seat():
    """Async scheduling: the step in flight computes the victim, so it cannot be preempted yet: it is left out
    of the next step and preempted by the one after."""
    sched = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=4, max_model_len=64, async_scheduling=True)
    runner = FakeRunner(4)
    add_group(sched, "big", 6, [7, 8, 9], max_tokens=30)
    so = sched.schedule()
    out = runner.execute(so)
    for _ in range(3):  # schedule N+1, run it, then update from N: the engine core's order
        nxt = sched.schedule()
        nxt_out = runner.execute(nxt)
        sched.update_from_output(so, out)
        so, out = nxt, nxt_out
    sched.add_request(make_request("small", [20, 21], max_tokens=2, ignore_eos=True))
    victim = sched.running[-1].request_id
    assert victim in sched.in_flight
    nxt = sched.schedule()
    assert victim not in {rid for rid, _, _ in scheduled(nxt)} and not nxt.preempted_req_ids
    nxt_out = runner.execute(nxt)
    sched.update_from_output(so, out)
    so, out = nxt, nxt_out
    nxt = sched.schedule()
    assert nxt.preempted_req_ids == [victim]
    assert "small" in {rid for rid, _, _ in scheduled(nxt)}
    assert sched.requests[victim].status == RequestStatus.PREEMPTED
    runner.execute(nxt)


def test_prompt_logprobs_are_chunked_per_step_and_interleaved():
    """A long prompt with prompt logprobs computes at most max_prompt_logprobs_per_step positions a step, and a
    small request that arrives meanwhile is scheduled in every step until it finishes."""
    sched = make_scheduler(num_blocks=256, block_size=4, max_num_batched_tokens=64, max_model_len=128)
    assert sched.max_prompt_logprobs_per_step == 8  # 64 // PROMPT_LOGPROBS_SHARE
    runner = FakeRunner(4)
    prompt = [3 + i % 40 for i in range(100)]
    sched.add_request(make_request("long", prompt, max_tokens=1, prompt_logprobs=2))
    sched.add_request(make_request("plain", [50, 51, 52], max_tokens=1))
    so = sched.schedule()
    check_step(sched, so)
    assert prompt_logprob_positions(sched, so) == 8
    assert dict((rid, n) for rid, _, n in scheduled(so)) == {"long": 8, "plain": 3}  # the budget is not the cap
    sched.update_from_output(so, runner.execute(so))
    sched.add_request(make_request("small", [20, 21], max_tokens=3, ignore_eos=True))
    steps_with_small = 0
    total = 8
    while "long" in sched.requests:
        so = sched.schedule()
        check_step(sched, so)
        total += prompt_logprob_positions(sched, so)
        if "small" in {rid for rid, _, _ in scheduled(so)}:
            steps_with_small += 1
        sched.update_from_output(so, runner.execute(so))
        check_invariants(sched)
    assert total == len(prompt) - 1  # every position once
    assert steps_with_small == 3  # prefill (+ first token), then 2 decodes: never held back by the long prompt
