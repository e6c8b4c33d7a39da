"""N-gram speculative decoding through LLM (issue 14): the same greedy tokens as without speculation however the
requests are scheduled (batched, chunked, preempted), stops and max_tokens exact inside accepted runs, seeded
sampling reproducible, no KV block left after aborts, and requests that cannot be speculated left alone."""

from __future__ import annotations

import argparse
import random

import pytest

from pagellm import SamplingParams
from pagellm.config import SpeculativeConfig
from pagellm.core.sched_output import ModelRunnerOutput
from pagellm.engine_args import EngineArgs
from tests.core.core_sim import make_request, make_scheduler
from tests.reference import tiny_llm

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
# 2 layers x (K, V) x 16 tokens x 2 KV heads x 16 dims x 4 bytes: one KV block of the tiny models.
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4


def _prompts() -> list[dict]:
    """Prompts that repeat a short pattern (the model tends to continue it: drafts are accepted), then random
    ones."""
    rng = random.Random(0)
    prompts = []
    for _ in range(6):
        pattern = [rng.randrange(3, 512) for _ in range(rng.randint(3, 8))]
        prompts.append({"prompt_token_ids": (pattern * 8)[: rng.randint(10, 40)]})
    prompts += [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(3, 40))]} for _ in range(4)]
    return prompts


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _spec_counts(llm) -> tuple[int, int, int]:
    s = llm.llm_engine.core.scheduler
    return s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(model_path):
    return _tokens(tiny_llm(model_path).generate(_prompts(), GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def spec_llm(model_path):
    return tiny_llm(model_path, speculative_config=SPEC)


# ---- the option ----

@pytest.mark.parametrize("options, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "model": "/some/draft", "num_speculative_tokens": 2}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"model": 3, "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 3},
     "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "lookahead"),
    ("{not json", "JSON"),
    ([1, 2], "dict"),
])
def test_bad_speculative_config_names_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.from_dict(options)


def test_speculative_config_defaults_and_cli():
    assert SpeculativeConfig.from_dict({"num_speculative_tokens": 3}) == SpeculativeConfig("ngram", 3, 5, 5)
    assert SpeculativeConfig.from_dict('{"num_speculative_tokens": 3, "prompt_lookup_max": 4}') == \
        SpeculativeConfig("ngram", 3, 4, 4)
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--speculative-config", '{"num_speculative_tokens": 2}']))
    assert SpeculativeConfig.from_dict(args.speculative_config).num_speculative_tokens == 2


def test_speculation_refuses_several_devices(model_path):
    with pytest.raises(ValueError, match="one device"):
        EngineArgs(model=model_path, device="cpu", speculative_config=SPEC,
                   tensor_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineArgs(model=model_path, device="cpu", speculative_config=SPEC,
                   distributed_executor_backend="mp").create_engine_config()
    config = EngineArgs(model=model_path, device="cpu", speculative_config=SPEC,
                        async_scheduling=True).create_engine_config()
    assert config.speculative_config.num_speculative_tokens == 4
    assert config.scheduler_config.async_scheduling


# ---- greedy: the same tokens ----

def test_greedy_tokens_identical_with_speculation(spec_llm, reference):
    before = _spec_counts(spec_llm)
    assert _tokens(spec_llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    drafts, draft_tokens, accepted = (b - a for a, b in zip(before, _spec_counts(spec_llm)))
    assert drafts > 0 and accepted > 0  # drafts were verified, and some were right
    assert accepted < draft_tokens  # and some were wrong: both paths ran
    assert spec_llm.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_greedy_tokens_identical_with_async_scheduling(model_path, reference):
    """Async scheduling keeps its decodes ahead for requests that do not speculate; a speculating request skips
    the step launched meanwhile and verifies drafts proposed from all its tokens."""
    llm = tiny_llm(model_path, speculative_config=SPEC, async_scheduling=True)
    runner = llm.llm_engine.core.executor.worker.runner
    ahead = {"n": 0}
    apply = runner.batch.apply

    def counting(sched):
        step = apply(sched)
        ahead["n"] += len(step.from_device)
        return step

    runner.batch.apply = counting
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    drafts, draft_tokens, accepted = _spec_counts(llm)
    assert drafts > 0 and 0 < accepted < draft_tokens
    assert ahead["n"] > 0  # and decodes still went ahead
    assert llm.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_tokens_identical_in_the_padded_verify_layout(model_path, reference, async_scheduling):
    """The layout verify steps replay CUDA graphs in (every request Q tokens, dummies in front), run eagerly on
    the CPU: the same tokens, and it did run."""
    llm = tiny_llm(model_path, speculative_config=SPEC, async_scheduling=async_scheduling)
    runner = llm.llm_engine.core.executor.worker.runner
    runner.pad_verify_steps = True
    padded = {"n": 0}
    launch = runner._launch_padded_verify

    def counting(*args):
        padded["n"] += 1
        return launch(*args)

    runner._launch_padded_verify = counting
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    assert padded["n"] > 0 and _spec_counts(llm)[2] > 0
    assert llm.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_disable_by_batch_size(model_path, reference, spec_llm):
    """Nothing is proposed while more than disable_by_batch_size requests run."""
    llm = tiny_llm(model_path, speculative_config={**SPEC, "disable_by_batch_size": 1})
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    limited = _spec_counts(llm)[0]
    before = _spec_counts(spec_llm)[0]
    spec_llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert limited < _spec_counts(spec_llm)[0] - before  # 10 requests: drafts only once one is left
    assert _tokens(llm.generate(_prompts()[:1], GREEDY, use_tqdm=False)) == reference[:1]
    assert _spec_counts(llm)[0] > limited  # alone, a request speculates


@pytest.mark.parametrize("k", [1, 7])
def test_greedy_tokens_identical_for_other_k(model_path, reference, k):
    llm = tiny_llm(model_path, speculative_config={"method": "ngram", "num_speculative_tokens": k,
                                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    assert _spec_counts(llm)[2] > 0


def test_greedy_tokens_identical_chunked_and_one_at_a_time(model_path, reference):
    # A budget of 3 tokens: prompts are chunked, and a verify step is cut to the budget left (k <= 2).
    llm = tiny_llm(model_path, speculative_config=SPEC, max_num_batched_tokens=3, max_num_seqs=3)
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    assert _spec_counts(llm)[2] > 0


def test_greedy_tokens_identical_under_preemption(model_path, reference):
    # 12 blocks (192 tokens) for 10 requests of up to 80 tokens: they preempt each other.
    llm = tiny_llm(model_path, speculative_config=SPEC, max_model_len=96, kv_cache_memory=BLOCK_BYTES * 12)
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    sched = llm.llm_engine.core.scheduler
    assert sched.num_preemptions_total > 0
    assert _spec_counts(llm)[2] > 0
    assert sched.kv_cache_manager.usage == 0.0


def test_greedy_tokens_identical_without_prefix_caching(model_path, reference):
    llm = tiny_llm(model_path, speculative_config=SPEC, enable_prefix_caching=False)
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference


# ---- where a request ends ----

@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 6, 17])
def test_max_tokens_exact(spec_llm, reference, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = spec_llm.generate(_prompts(), params, use_tqdm=False)
    assert _tokens(outputs) == [r[:max_tokens] for r in reference]
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_max_model_len_exact(model_path):
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    plain = _tokens(tiny_llm(model_path, max_model_len=64).generate(prompts, params, use_tqdm=False))
    llm = tiny_llm(model_path, max_model_len=64, speculative_config=SPEC)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == plain
    assert all(len(p["prompt_token_ids"]) + len(t) == 64 for p, t in zip(prompts, plain))
    assert _spec_counts(llm)[2] > 0


def test_stop_token_inside_accepted_tokens(spec_llm, reference):
    """Each request stops at a token that first appears late in its output, where the repeating outputs are
    mostly accepted drafts: the output ends exactly at that token."""
    prompts, stops, expected = [], [], []
    for prompt, ref in zip(_prompts(), reference):
        late = [j for j in range(8, len(ref)) if ref[j] not in ref[:j]]
        if late:
            j = late[0]
            prompts.append(prompt)
            stops.append(ref[j])
            expected.append(ref[: j + 1])
    assert len(prompts) >= 3
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[s]) for s in stops]
    outputs = spec_llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(outputs) == expected
    assert [o.outputs[0].finish_reason for o in outputs] == ["stop"] * len(prompts)
    assert [o.outputs[0].stop_reason for o in outputs] == stops


def test_stop_token_within_one_verify_step():
    """At the scheduler: a verify step returns 4 tokens, the second is a stop token; the request ends there."""
    sched = make_scheduler(num_speculative_tokens=3)
    req = make_request("r", [5, 6, 7, 5, 6], max_tokens=20, stop_token_ids=[99])
    sched.add_request(req)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(req_ids=["r"], sampled_token_ids=[[7]],
                                                    spec_token_ids={"r": [5, 99, 7]}))
    out = sched.schedule()
    assert out.cached.spec_token_ids == {"r": [5, 99, 7]} and out.scheduled_tokens() == {"r": 4}
    outputs = sched.update_from_output(out, ModelRunnerOutput(req_ids=["r"], sampled_token_ids=[[5, 99, 7, 8]]))
    assert outputs[0].new_token_ids == [5, 99] and outputs[0].finish_reason == "stop"
    assert req.output_token_ids == [7, 5, 99]
    assert sched.kv_cache_manager.usage == 0.0


def test_scheduler_counts_only_accepted_tokens_and_caps_drafts():
    sched = make_scheduler(num_speculative_tokens=4, block_size=4)
    req = make_request("r", [1, 3, 4, 5, 6], max_tokens=6)
    sched.add_request(req)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(req_ids=["r"], sampled_token_ids=[[10]],
                                                    spec_token_ids={"r": [11, 12, 13, 14]}))
    assert req.spec_token_ids == [11, 12, 13, 14] and req.num_tokens == 6  # drafts are not tokens
    out = sched.schedule()
    assert out.scheduled_tokens() == {"r": 5}
    assert out.cached.new_token_ids == [[10]]  # the known input token; the drafts go separately
    assert req.num_computed_tokens == 10
    # Two drafts accepted, then the target's own token: 3 new tokens, 5 + 1 + 2 computed.
    sched.update_from_output(out, ModelRunnerOutput(req_ids=["r"], sampled_token_ids=[[11, 12, 20]],
                                                    spec_token_ids={"r": [21, 22, 23, 24]}))
    assert req.output_token_ids == [10, 11, 12, 20] and req.num_computed_tokens == 8
    # The third block held only rejected drafts (positions 8 and 9): given back.
    assert len(sched.kv_cache_manager.get_block_ids("r")) == 2 and req.num_blocks_sent == 2
    assert (sched.spec_num_drafts, sched.spec_num_draft_tokens, sched.spec_num_accepted_tokens) == (1, 4, 2)
    assert sched.spec_num_accepted_per_pos == [1, 1, 0, 0]
    # max_tokens 6 leaves room for 2 more tokens: one draft at most.
    out = sched.schedule()
    assert out.cached.spec_token_ids == {"r": [21]} and out.scheduled_tokens() == {"r": 2}
    assert len(out.cached.new_block_ids[0]) == 1  # a block for positions 8 and 9 again
    assert out.cached.new_token_ids == [[20]]  # the runner holds the accepted drafts already
    outputs = sched.update_from_output(out, ModelRunnerOutput(req_ids=["r"], sampled_token_ids=[[21, 30]]))
    assert outputs[0].new_token_ids == [21, 30] and outputs[0].finish_reason == "length"
    assert sched.kv_cache_manager.usage == 0.0


# ---- sampling ----

def test_seeded_sampling_reproducible(model_path, spec_llm):
    prompts = _prompts()
    params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.01, seed=100 + i, max_tokens=30,
                             ignore_eos=True) for i in range(len(prompts))]
    params[1] = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)  # a greedy row in the batch
    first = _tokens(spec_llm.generate(prompts, params, use_tqdm=False))
    again = _tokens(tiny_llm(model_path, speculative_config=SPEC).generate(prompts, params, use_tqdm=False))
    assert first == again
    # A seed gives the same tokens whatever shares the batch.
    alone = _tokens(spec_llm.generate([prompts[3]], params[3], use_tqdm=False))
    assert alone == [first[3]]
    assert all(len(t) == 30 for t in first)


def test_unspeculated_requests_are_left_alone(spec_llm, model_path):
    """Logprobs, penalties, min_tokens, logit_bias: never speculated, and their tokens are unchanged."""
    prompts = _prompts()[:4]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, min_tokens=5),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logit_bias={7: 2.0})]
    before = _spec_counts(spec_llm)
    got = spec_llm.generate(prompts, params, use_tqdm=False)
    assert _spec_counts(spec_llm) == before
    plain = tiny_llm(model_path).generate(prompts, params, use_tqdm=False)
    assert _tokens(got) == _tokens(plain)
    assert got[0].outputs[0].logprobs is not None and len(got[0].outputs[0].logprobs) == 20


def test_abort_mid_run_frees_every_block(spec_llm):
    engine = spec_llm.llm_engine
    sched = engine.core.scheduler
    prompts = _prompts()
    for i, p in enumerate(prompts[:6]):
        engine.add_request(f"ab{i}", p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    drafts_before = sched.spec_num_drafts
    done: list[str] = []
    with_drafts: list[str] = []
    for _ in range(40):  # until drafts were verified and some wait for the next step
        done += [o.request_id for o in engine.step() if o.finished]
        with_drafts = [rid for rid, r in sched.requests.items() if r.spec_token_ids]
        if with_drafts and sched.spec_num_drafts > drafts_before:
            break
    assert with_drafts
    running = sorted(sched.requests)
    aborted = sorted(set(with_drafts[:1] + running[::2]))
    engine.abort_request(aborted)
    while engine.has_unfinished_requests():
        done += [o.request_id for o in engine.step() if o.finished]
    assert sorted(done) == sorted(f"ab{i}" for i in range(6) if f"ab{i}" not in aborted)
    assert sched.kv_cache_manager.usage == 0.0
    engine.add_request("after", prompts[0], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert sched.kv_cache_manager.usage == 0.0


def test_drafts_dropped_rather_than_preempting():
    """With no free block for its drafts, a request verifies none this step instead of preempting another."""
    sched = make_scheduler(num_speculative_tokens=4, block_size=4, num_blocks=4)
    a = make_request("a", [1, 3, 4, 5, 6, 7, 8], max_tokens=20)  # 7 tokens: 2 blocks, one slot left after 8
    b = make_request("b", [9, 10, 11, 12, 13, 14, 15], max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert out.scheduled_tokens() == {"a": 7, "b": 7}
    sched.update_from_output(out, ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[[20], [21]],
                                                    spec_token_ids={"a": [22, 23, 24]}))
    out = sched.schedule()  # a's drafts need a third block; none is free
    assert out.scheduled_tokens() == {"a": 1, "b": 1} and not out.cached.spec_token_ids
    assert sched.num_preemptions_total == 0


def test_sampled_distribution_is_the_targets(model_path):
    """Temperature 0.9 and top-k 3 with speculation: the joint distribution of the first 4 tokens of many
    requests (the last three mostly from verify steps: accepted drafts, residual draws, bonus tokens) matches
    the model's own, computed exactly with transformers over the 3^4 paths (chi-square, cells of small
    expectation merged; fixed engine seed)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    # A prompt followed by the model's own greedy continuation, which falls into a loop: sampled tokens often
    # continue it, so drafts are proposed in most steps and accepted in some.
    start = _prompts()[0]
    loop = tiny_llm(model_path).generate(start, SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True),
                                         use_tqdm=False)[0].outputs[0].token_ids
    prompt = start["prompt_token_ids"] + list(loop)
    T, K, L, N = 0.9, 3, 4, 4000
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    paths, probs = [[]], torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(L):
            logits = hf(torch.tensor([prompt + p for p in paths])).logits[:, -1].double() / T
            top, ids = logits.topk(K, dim=1)
            step = top.softmax(dim=1)
            paths = [p + [t] for p, row in zip(paths, ids.tolist()) for t in row]
            probs = (probs[:, None] * step).reshape(-1)
    expected = {tuple(p): float(q) * N for p, q in zip(paths, probs)}

    llm = tiny_llm(model_path, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    params = SamplingParams(temperature=T, top_k=K, max_tokens=L, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt}] * N, params, use_tqdm=False)
    counts: dict[tuple, int] = {}
    for t in _tokens(outputs):
        assert tuple(t) in expected, f"{t} is outside the top-{K} paths"
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    drafts, draft_tokens, accepted = _spec_counts(llm)
    assert drafts > N // 2 and 0 < accepted < draft_tokens  # most requests verified drafts; some were rejected

    # Cells expected fewer than 5 times are pooled into one.
    stat, cells, small_exp, small_obs = 0.0, 0, 0.0, 0
    for path, e in expected.items():
        if e < 5:
            small_exp += e
            small_obs += counts.get(path, 0)
            continue
        stat += (counts.get(path, 0) - e) ** 2 / e
        cells += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        cells += 1
    df = cells - 1
    z = 3.09  # upper 0.1% of the standard normal; Wilson-Hilferty for the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < critical, (stat, critical, df)


def test_prefix_cache_hits_on_blocks_written_by_verify_steps(model_path, spec_llm):
    """Blocks of output tokens computed in verify steps are registered in the prefix cache only once their
    tokens are accepted and full: a later prompt that extends an output hits them and continues exactly."""
    prompt = _prompts()[0]["prompt_token_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    before = _spec_counts(spec_llm)
    out = _tokens(spec_llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False))[0]
    assert _spec_counts(spec_llm)[2] > before[2]
    extended = prompt + out[:40]
    stats = spec_llm.llm_engine.prefix_cache_stats
    hits = stats.hits
    more = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    got = _tokens(spec_llm.generate({"prompt_token_ids": extended}, more, use_tqdm=False))[0]
    # Every full block but the one holding the last token (which must be computed), most of them of output.
    assert stats.hits - hits == 16 * ((len(extended) - 1) // 16) > len(prompt) + 16
    assert got == out[40:60]
    plain = tiny_llm(model_path, enable_prefix_caching=False)
    assert _tokens(plain.generate({"prompt_token_ids": extended}, more, use_tqdm=False))[0] == got


def test_prompt_logprobs_in_a_step_that_verifies_drafts(model_path, spec_llm):
    """A prompt-logprobs prefill scheduled beside verify steps keeps its prompt logprobs."""
    engine = spec_llm.llm_engine
    sched = engine.core.scheduler
    for i, p in enumerate(_prompts()[:4]):
        engine.add_request(f"v{i}", p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(40):  # until drafts wait for the next step
        engine.step()
        if any(r.spec_token_ids for r in sched.requests.values()):
            break
    assert any(r.spec_token_ids for r in sched.requests.values())
    plp = _prompts()[7]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    drafts_before = sched.spec_num_drafts
    engine.add_request("plp", plp, params)
    engine.step()  # the prefill and the verify steps together
    assert sched.spec_num_drafts > drafts_before
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    want = tiny_llm(model_path).generate(plp, params, use_tqdm=False)[0]
    got = done["plp"]
    assert got.prompt_logprobs is not None and len(got.prompt_logprobs) == len(want.prompt_logprobs)
    for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert g.keys() == w.keys()
        for tok in w:
            assert abs(g[tok].logprob - w[tok].logprob) < 1e-4
    assert list(got.outputs[0].token_ids) == list(want.outputs[0].token_ids)
