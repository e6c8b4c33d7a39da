"""Async scheduling (step N+1 scheduled and launched before step N's tokens are back) gives exactly the tokens of
the one-step-at-a-time engine: stops found a step late, preemption under a small KV cache, seeded sampling,
lockstep requests (penalties, min_tokens) mixed in, logprobs, aborts. On the CPU nothing overlaps, but every
piece of the bookkeeping (placeholder tokens filled from the previous step's samples, dropped extra tokens,
blocks freed under a launched step) runs as it does on a GPU."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from tests.reference import random_prompt, tiny_llm


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path = tiny_model_dir("llama")
    sync = tiny_llm(path, async_scheduling=False)
    ahead = tiny_llm(path, async_scheduling=True)
    # A KV cache of 40 blocks of 16 tokens: the batches below outgrow it and preempt.
    small = tiny_llm(path, async_scheduling=True, kv_cache_memory=40 * 16 * 2 * 2 * 2 * 16 * 4, max_model_len=256)
    small_sync = tiny_llm(path, async_scheduling=False, kv_cache_memory=40 * 16 * 2 * 2 * 2 * 16 * 4,
                          max_model_len=256)
    return sync, ahead, small, small_sync


def _run(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _count_ahead(llm):
    """Wrap the runner's batch to count decodes scheduled ahead of their input token (read on the device)."""
    batch = llm.llm_engine.core.executor.worker.runner.batch
    seen = {"ahead": 0}
    apply = batch.apply

    def counting(sched):
        step = apply(sched)
        seen["ahead"] += len(step.from_device)
        return step

    batch.apply = counting
    return seen


def test_config_defaults_and_errors(tiny_model_dir):
    from pagellm.engine_args import EngineArgs

    path = tiny_model_dir("llama")
    # Off on the CPU (nothing to overlap: the host runs the model too), unless asked for.
    assert not EngineArgs(model=path, device="cpu").create_engine_config().scheduler_config.async_scheduling
    assert EngineArgs(model=path, device="cpu", async_scheduling=True).create_engine_config() \
        .scheduler_config.async_scheduling
    assert EngineArgs(model=path, device="cpu", async_scheduling=True, tensor_parallel_size=2) \
        .create_engine_config().scheduler_config.async_scheduling  # the workers launch steps as they come
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineArgs(model=path, device="cpu", async_scheduling=True, pipeline_parallel_size=2).create_engine_config()


def test_greedy_with_early_stops_matches_one_step_at_a_time(engines):
    sync, ahead, _, _ = engines
    prompts = [random_prompt(i, 5 + 7 * i) for i in range(12)]
    free = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(12)]
    base = _run(sync, prompts, free)
    # Stop tokens taken from the free-running output: requests stop at many different steps.
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, stop_token_ids=[base[i][0][0][2 + i % 5]])
              for i in range(12)]
    seen = _count_ahead(ahead)
    want = _run(sync, prompts, params)
    got = _run(ahead, prompts, params)
    assert got == want
    assert any(w[0][1] == "stop" and len(w[0][0]) < p.max_tokens for w, p in zip(want, params))
    # The decodes really were scheduled ahead: all but a request's first token and the one after its prefill
    # (and the wasted ones past a stop) come from decodes scheduled ahead.
    decodes = sum(len(w[0][0]) - 1 for w in want)
    assert seen["ahead"] >= decodes - len(prompts), (seen, decodes)
    assert not ahead.llm_engine.core.scheduler.in_flight  # nothing left in flight
    assert not ahead.llm_engine.core.has_unfinished_requests()


def test_preemption_and_prefix_cache_under_a_small_kv_cache(engines):
    _, _, small, small_sync = engines
    shared = random_prompt(100, 40)["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + random_prompt(200 + i, 10 + 9 * i)["prompt_token_ids"]}
               for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_tokens=30 + 5 * i, ignore_eos=True) for i in range(10)]
    got = _run(small, prompts, params)
    assert got == _run(small_sync, prompts, params)
    assert small.llm_engine.core.scheduler.num_preemptions_total > 0
    assert small.llm_engine.core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == \
        small.llm_engine.core.config.cache_config.num_blocks


def test_seeded_sampling_lockstep_requests_and_logprobs(engines):
    sync, ahead, _, _ = engines
    prompts = [random_prompt(300 + i, 12 + 5 * i) for i in range(8)]
    params = []
    for i in range(8):
        if i % 4 == 1:  # lockstep: penalties read the output so far on the host
            params.append(SamplingParams(temperature=0.0, max_tokens=15, repetition_penalty=1.3,
                                         frequency_penalty=0.5))
        elif i % 4 == 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=15, min_tokens=5, logprobs=3))
        else:
            params.append(SamplingParams(temperature=1.0, top_p=1.0, seed=7 + i, max_tokens=10 + i, logprobs=2))
    # All plain (no lockstep request): every step overlaps; then the mix, which runs one step at a time.
    plain = [p for i, p in enumerate(params) if i % 4 in (0, 3)]
    plain_prompts = [p for i, p in enumerate(prompts) if i % 4 in (0, 3)]
    for ps, pr in ((plain, plain_prompts), (params, prompts)):
        want = sync.generate(pr, ps, use_tqdm=False)
        got = ahead.generate(pr, ps, use_tqdm=False)
        for w, g in zip(want, got):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            if w.outputs[0].logprobs:
                for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                    assert lw.keys() == lg.keys()
                    for tok in lw:
                        assert lg[tok].logprob == pytest.approx(lw[tok].logprob, abs=1e-4)
    assert not ahead.llm_engine.core.scheduler.lockstep_ids


def test_abort_while_a_step_is_in_flight(engines):
    sync, ahead, _, _ = engines
    engine = ahead.llm_engine
    prompts = [random_prompt(400 + i, 20) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", p, params)
    for _ in range(4):
        engine.step()
    assert engine.core.launched is not None  # a step is in flight
    engine.abort_request(["a1", "a2"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    want = _run(sync, [prompts[0], prompts[3]], [params, params])
    assert finished == {"a0": want[0][0][0], "a3": want[1][0][0]}
    assert engine.core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == \
        engine.core.config.cache_config.num_blocks
