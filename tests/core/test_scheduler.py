"""Scheduler policy: chunked prefill, decode first, preemption, FCFS / priority order, stops, aborts."""

from __future__ import annotations

import pytest

from pagellm.core.request import RequestStatus
from pagellm.core.sched_output import ModelRunnerOutput, PromptLogprobs, TokenLogprobs

from tests.core.core_sim import EOS, FakeRunner, check_drained, check_invariants, check_step, make_request, make_scheduler, \
    run_to_completion, scheduled


def step(sched, runner, forced=None):
    """One step; forced: req id -> token to sample."""
    so = sched.schedule()
    check_step(sched, so)
    for req_id, tok in (forced or {}).items():
        runner.forced[req_id] = [tok]
    outs = sched.update_from_output(so, runner.execute(so))
    check_invariants(sched)
    return so, outs


def sched_counts(so):
    return {rid: n for rid, _, n in scheduled(so)}


def ids(so):
    return [rid for rid, _, _ in scheduled(so)]


def test_chunked_prefill_splits_a_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8, block_size=4)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", list(range(10, 30)), max_tokens=3))  # 20 tokens
    chunks = []
    for _ in range(3):
        so, outs = step(sched, runner)
        (view,) = runner.last_step
        chunks.append((view.num_computed_tokens, len(view.token_ids), view.do_sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert [o.new_token_ids for o in outs] == [[runner_tok] for runner_tok in sched.requests["a"].output_token_ids]
    so, _ = step(sched, runner)
    assert sched_counts(so) == {"a": 1} and runner.last_step[0].do_sample
    # The decode carries its input token (the scheduler has it) and one new block: position 20 starts a sixth.
    assert so.cached.new_token_ids == [[sched.requests["a"].output_token_ids[0]]]
    assert [len(b) for b in so.cached.new_block_ids] == [1]


def test_decode_goes_first_and_prefill_takes_the_rest():
    sched = make_scheduler(max_num_batched_tokens=10, block_size=4)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", [1, 3, 4], max_tokens=10))
    step(sched, runner)
    sched.add_request(make_request("b", list(range(10, 40)), max_tokens=2))
    so, _ = step(sched, runner)
    assert sched_counts(so) == {"a": 1, "b": 9} and [r.req_id for r in so.new_reqs] == ["b"]
    so, _ = step(sched, runner)
    assert sched_counts(so) == {"a": 1, "b": 9}  # b keeps going in the running loop, after a


def test_seq_cap_and_budget():
    sched = make_scheduler(max_num_batched_tokens=6, max_num_seqs=2)
    runner = FakeRunner(4)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", [5, 6, 7], max_tokens=4))
    so, _ = step(sched, runner)
    assert sched_counts(so) == {"r0": 3, "r1": 3}
    assert sched.num_running == 2 and sched.num_waiting == 2
    run_to_completion(sched, runner)
    check_drained(sched)


def test_fcfs_order():
    sched = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(4)
    order = []
    for i, rid in enumerate(["x", "y", "z"]):
        sched.add_request(make_request(rid, [3, 4], max_tokens=1, arrival_time=10.0 - i))
    while sched.has_unfinished_requests():
        so, _ = step(sched, runner)
        order += ids(so)
    assert order == ["x", "y", "z"]  # insertion order, whatever the arrival times say


def test_priority_order_then_arrival():
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    runner = FakeRunner(4)
    specs = [("low", 5, 1.0), ("high-late", 0, 3.0), ("high-early", 0, 2.0), ("mid", 1, 0.0)]
    for rid, prio, t in specs:
        sched.add_request(make_request(rid, [3, 4], max_tokens=1, priority=prio, arrival_time=t))
    order = []
    while sched.has_unfinished_requests():
        so, _ = step(sched, runner)
        order += ids(so)
    assert order == ["high-early", "high-late", "mid", "low"]


def test_preemption_under_a_tiny_pool():
    # 6 blocks of 4 tokens; two requests of 8 + 10 tokens each need 5 blocks: they cannot both fit.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=32)
    runner = FakeRunner(4, seed=1)
    sched.add_request(make_request("old", list(range(10, 18)), max_tokens=10, ignore_eos=True))
    sched.add_request(make_request("new", list(range(30, 38)), max_tokens=10, ignore_eos=True))
    saw_preemption = False
    while sched.has_unfinished_requests():
        so, _ = step(sched, runner)
        if so.preempted_req_ids:
            saw_preemption = True
            assert so.preempted_req_ids == ["new"]  # the newest running request is the victim
            assert sched.waiting.peek().request_id == "new"
            assert sched.requests["new"].status == RequestStatus.PREEMPTED
            assert sched.requests["new"].num_computed_tokens == 0
            assert "new" not in sched_counts(so)
    assert saw_preemption and sched.num_preemptions_total >= 1
    check_drained(sched)


def test_preempted_request_resumes_with_its_outputs_and_rehits_its_prefix():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=32)
    runner = FakeRunner(4, seed=2)
    a = make_request("a", list(range(10, 18)), max_tokens=10, ignore_eos=True)
    b = make_request("b", list(range(30, 38)), max_tokens=10, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    resumed = []
    while sched.has_unfinished_requests():
        so, _ = step(sched, runner)
        for r in so.new_reqs:
            if r.req_id == "b" and b.num_preemptions:
                assert r.output_token_ids  # sent in full again, with its outputs so far
                resumed.append(r)
    assert b.num_preemptions >= 1
    assert len(b.output_token_ids) == 10 and len(a.output_token_ids) == 10
    # After preemption b recomputed its prompt and outputs, starting after its own cached prefix.
    assert resumed and resumed[0].num_computed_tokens % 4 == 0
    assert b.num_cached_tokens == 0  # set once, at the first schedule


def test_priority_preempts_the_lowest_priority():
    sched = make_scheduler(num_blocks=6, block_size=4, policy="priority")
    runner = FakeRunner(4)
    sched.add_request(make_request("lo", list(range(10, 18)), max_tokens=10, ignore_eos=True, priority=3,
                                   arrival_time=0.0))
    step(sched, runner)
    sched.add_request(make_request("hi", list(range(30, 38)), max_tokens=10, ignore_eos=True, priority=0,
                                   arrival_time=1.0))
    victims = set()
    while sched.has_unfinished_requests():
        so, _ = step(sched, runner)
        victims |= set(so.preempted_req_ids)
    assert victims == {"lo"}


def test_abort_frees_blocks_and_reports_the_id():
    sched = make_scheduler(num_blocks=16, block_size=4)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", list(range(10, 20)), max_tokens=20))
    sched.add_request(make_request("b", list(range(10, 20)), max_tokens=20))
    sched.add_request(make_request("w", [1, 2, 3], max_tokens=20))
    step(sched, runner)
    assert sched.kv_cache_manager.usage > 0
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    sched.finish_requests(["b", "w", "unknown", "a"], RequestStatus.FINISHED_ABORTED)
    check_invariants(sched)
    check_drained(sched)
    so = sched.schedule()
    assert so.is_empty and so.finished_req_ids == []  # nothing runs: the ids wait for the next step
    sched.add_request(make_request("c", [3, 4], max_tokens=1))
    so = sched.schedule()
    assert so.finished_req_ids == ["a", "b", "w"] and ids(so) == ["c"]


def test_abort_waiting_request():
    sched = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", [3, 4], max_tokens=2))
    sched.add_request(make_request("b", [3, 4], max_tokens=2))
    step(sched, runner)
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert sched.num_waiting == 0 and sched.get_num_unfinished_requests() == 1
    run_to_completion(sched, runner)
    check_drained(sched)


def test_stop_conditions():
    sched = make_scheduler(max_model_len=12)
    runner = FakeRunner(4)
    sched.add_request(make_request("eos", [3, 4], max_tokens=10))
    sched.add_request(make_request("stop", [3, 4], max_tokens=10, stop_token_ids=[9]))
    sched.add_request(make_request("min", [3, 4], max_tokens=10, min_tokens=2))
    sched.add_request(make_request("ign", [3, 4], max_tokens=2, ignore_eos=True))
    sched.add_request(make_request("len", [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], max_tokens=None, ignore_eos=True))
    _, outs = step(sched, runner, {"eos": EOS, "stop": 9, "min": EOS, "ign": EOS, "len": 5})
    by_id = {o.req_id: o for o in outs}
    assert (by_id["eos"].finish_reason, by_id["eos"].stop_reason, by_id["eos"].new_token_ids) == ("stop", None, [EOS])
    assert (by_id["stop"].finish_reason, by_id["stop"].stop_reason) == ("stop", 9)
    assert not by_id["min"].finished and not by_id["ign"].finished and not by_id["len"].finished
    so, outs = step(sched, runner, {"min": EOS, "ign": EOS, "len": 5})
    assert so.finished_req_ids == ["eos", "stop"]  # finished in the last step: the runner drops them now
    by_id = {o.req_id: o for o in outs}
    assert by_id["min"].finish_reason == "stop"  # the second token may stop
    assert by_id["ign"].finish_reason == "length"  # max_tokens
    assert by_id["len"].finish_reason == "length"  # max_model_len: 12 tokens
    assert not sched.has_unfinished_requests()
    check_drained(sched)
    assert sched.schedule().is_empty and sched.finished_req_ids == {"min", "ign", "len"}


def test_logprobs_and_prompt_logprobs_pass_through():
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("a", [3, 4, 5, 6, 7, 8], max_tokens=2, prompt_logprobs=1))
    so = sched.schedule()
    plp = PromptLogprobs(first_position=1, token_ids=[[4]] * 3, logprobs=[[-1.0]] * 3, ranks=[[1]] * 3)
    outs = sched.update_from_output(so, ModelRunnerOutput(prompt_logprobs={"a": plp}))
    assert len(outs) == 1 and outs[0].new_token_ids == [] and outs[0].new_prompt_logprobs is plp
    so = sched.schedule()
    lp = TokenLogprobs([9], [-0.5], [1])
    outs = sched.update_from_output(so, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[9]], logprobs=[[lp]]))
    assert outs[0].new_token_ids == [9] and outs[0].new_logprobs == [lp]


def test_several_tokens_in_one_step_stop_at_the_first_stop():
    """A step may give a request several tokens (a verify step): they are appended in order up to the first that
    finishes it; the rest, and their logprobs, are dropped."""
    sched = make_scheduler()
    sched.add_request(make_request("a", [3, 4], max_tokens=10))
    sched.add_request(make_request("b", [3, 4], max_tokens=3, ignore_eos=True))
    so = sched.schedule()
    lps = [TokenLogprobs([t], [-0.1], [1]) for t in (5, 6, EOS, 7)]
    outs = sched.update_from_output(so, ModelRunnerOutput(
        req_ids=["a", "b"], sampled_token_ids=[[5, 6, EOS, 7], [5, 6, 7, 8]], logprobs=[lps, None]))
    by_id = {o.req_id: o for o in outs}
    assert by_id["a"].new_token_ids == [5, 6, EOS] and by_id["a"].finish_reason == "stop"
    assert by_id["a"].new_logprobs == lps[:3]
    assert by_id["b"].new_token_ids == [5, 6, 7] and by_id["b"].finish_reason == "length"
    check_drained(sched)


def test_prefix_hit_across_steps_and_within_one_step():
    sched = make_scheduler(num_blocks=32, block_size=4)
    runner = FakeRunner(4)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks
    sched.add_request(make_request("a", prompt, max_tokens=2))
    sched.add_request(make_request("b", prompt, max_tokens=2))  # same step: hits a's freshly allocated blocks
    so, outs = step(sched, runner)
    assert sched_counts(so) == {"a": 13, "b": 1}
    assert sched.requests["b"].num_cached_tokens == 12
    run_to_completion(sched, runner)
    sched.add_request(make_request("c", prompt + [1, 2], max_tokens=2))
    so, outs = step(sched, runner)
    assert sched_counts(so) == {"c": 3}
    assert outs[0].num_cached_tokens == 12
    stats = sched.kv_cache_manager.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (3, 13 + 13 + 15, 24)


def test_prompt_logprobs_requests_skip_prefix_hits():
    sched = make_scheduler(num_blocks=32, block_size=4)
    sched.max_prompt_logprobs_per_step = 64  # the whole prompt in one step
    runner = FakeRunner(4)
    prompt = list(range(10, 23))
    sched.add_request(make_request("a", prompt, max_tokens=2))
    sched.add_request(make_request("b", prompt, max_tokens=2, prompt_logprobs=0))
    so, _ = step(sched, runner)
    assert sched_counts(so) == {"a": 13, "b": 13}
    sched.add_request(make_request("c", prompt, max_tokens=2))
    so, _ = step(sched, runner)
    assert sched_counts(so)["c"] == 1  # b's prompt is cached like any other


def test_prefix_caching_disabled():
    sched = make_scheduler(enable_prefix_caching=False)
    runner = FakeRunner(4)
    prompt = list(range(10, 23))
    sched.add_request(make_request("a", prompt, max_tokens=2))
    sched.add_request(make_request("b", prompt, max_tokens=2))
    so, _ = step(sched, runner)
    assert sched_counts(so) == {"a": 13, "b": 13}
    assert sched.kv_cache_manager.prefix_cache_stats.hits == 0
    run_to_completion(sched, runner)
    check_drained(sched)


def test_request_larger_than_the_pool_finishes_with_length():
    sched = make_scheduler(num_blocks=3, block_size=4, max_model_len=64)
    runner = FakeRunner(4)
    sched.add_request(make_request("big", list(range(10, 30)), max_tokens=4))  # 20 tokens > 12
    sched.add_request(make_request("grows", [3, 4, 5], max_tokens=20, ignore_eos=True))
    outs = run_to_completion(sched, runner)
    assert outs["big"][-1].finish_reason == "length" and outs["big"][-1].new_token_ids == []
    assert outs["grows"][-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in outs["grows"]) == 10  # 12 slots, KV for 12 tokens, + 1 sampled
    check_drained(sched)


def test_add_request_validation():
    sched = make_scheduler(max_model_len=8)
    sched.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError):
        sched.add_request(make_request("b", list(range(9))))
