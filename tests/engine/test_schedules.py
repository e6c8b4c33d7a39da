"""A prompt gives the same greedy tokens however it is scheduled: alone, batched, chunked, preempted, cached;
with the KV cache in the model's dtype and in FP8 (every read of an FP8 cache sees the same stored values,
however the tokens were scheduled)."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from tests.reference import random_prompt, tiny_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


_prompt = random_prompt


@pytest.fixture(scope="module", params=["auto", "fp8"], ids=["kv-model-dtype", "kv-fp8"])
def kv_cache_dtype(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def _llm(kv_cache_dtype):
    return lambda path, **kwargs: tiny_llm(path, kv_cache_dtype=kv_cache_dtype, **kwargs)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def target():
    return _prompt(123, 57)


@pytest.fixture(scope="module")
def alone(_llm, model_path, target):
    return _llm(model_path).generate(target, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_batch_of_16(_llm, model_path, target, alone):
    others = [_prompt(i, 10 + 7 * i) for i in range(15)]
    outputs = _llm(model_path).generate(others[:7] + [target] + others[7:], GREEDY, use_tqdm=False)
    assert outputs[7].outputs[0].token_ids == alone
    assert len(outputs) == 16


def test_chunked_prefill(_llm, model_path, target, alone):
    llm = _llm(model_path, max_num_batched_tokens=8, max_num_seqs=4)
    outputs = llm.generate([_prompt(5, 40), target, _prompt(6, 30)], GREEDY, use_tqdm=False)
    assert outputs[1].outputs[0].token_ids == alone


def test_preemption(_llm, model_path, target, alone, kv_cache_dtype):
    # 2 layers x (K, V) x 16 tokens x 2 KV heads x 16 dims x 4 bytes (float32; 1 for FP8) per block; the pool
    # holds 12 blocks, barely more than one 96-token sequence, so 6 concurrent requests must preempt each other.
    block_bytes = 2 * 2 * 16 * 2 * 16 * (1 if kv_cache_dtype == "fp8" else 4)
    tiny_pool = _llm(model_path, max_model_len=96, kv_cache_memory=block_bytes * 12)
    prompts = [_prompt(40 + i, 50) for i in range(5)] + [target]
    outputs = tiny_pool.generate(prompts, GREEDY, use_tqdm=False)
    assert tiny_pool.llm_engine.core.scheduler.num_preemptions_total > 0
    assert outputs[-1].outputs[0].token_ids == alone
    reference = _llm(model_path, max_model_len=96).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert tiny_pool.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_prefix_cache_hit(_llm, model_path, target, alone):
    llm = _llm(model_path)
    llm.generate(target, GREEDY, use_tqdm=False)
    stats = llm.llm_engine.prefix_cache_stats
    hits_before = stats.hits
    out = llm.generate(target, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone
    assert stats.hits - hits_before >= 48  # the 3 full blocks of the 57-token prompt
    assert out.num_cached_tokens >= 48


def test_prefix_caching_off_gives_same_tokens(_llm, model_path, target, alone):
    llm = _llm(model_path, enable_prefix_caching=False)
    for _ in range(2):
        assert llm.generate(target, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == alone
    assert llm.llm_engine.prefix_cache_stats.hits == 0
