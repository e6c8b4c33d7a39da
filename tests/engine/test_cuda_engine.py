"""The whole engine on CUDA against the CPU engine: greedy tokens of a tiny random model in float32 are the same,
with decode CUDA graphs and without, alone and in a batch; with an FP8 KV cache they agree closely (CUDA only)."""

from __future__ import annotations

import random

import pytest
import torch

from pagellm import LLM, SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(3, 90))]} for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_greedy_tokens_equal_cpu(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    opts = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=512, kv_cache_memory=32 * 2**20)
    prompts = _prompts(24)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in LLM(path, device="cpu", **opts).generate(prompts, params, use_tqdm=False)]
    for eager in (False, True):
        llm = LLM(path, device="cuda", enforce_eager=eager, max_num_seqs=16, **opts)
        runner = llm.llm_engine.core.executor.worker.runner
        assert bool(runner.graphs) != eager
        batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
        assert batch == cpu, f"enforce_eager={eager}"
        assert alone == cpu[:3]
        llm.llm_engine.core.shutdown()


def test_cuda_memory_profile_uses_the_device(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device="cuda", dtype="bfloat16", skip_tokenizer_init=True,
              gpu_memory_utilization=0.5, max_model_len=512)
    free, total = torch.cuda.mem_get_info()
    used = total - free
    assert used > 0.4 * total  # the KV cache took what gpu_memory_utilization left
    assert used < 0.55 * total
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_cuda_speculation_greedy_tokens_equal_cpu(tiny_model_dir, method):
    """Speculation on CUDA (n-gram; a draft model, the target itself), verify steps replaying their CUDA graphs
    (and eagerly): the tokens of the CPU engine without speculation. Prompts repeat a pattern, so n-gram drafts
    are proposed and accepted."""
    path = tiny_model_dir("llama")
    opts = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=512, kv_cache_memory=32 * 2**20)
    rng = random.Random(1)
    prompts = []
    for _ in range(12):
        pattern = [rng.randrange(3, 512) for _ in range(rng.randint(3, 8))]
        prompts.append({"prompt_token_ids": (pattern * 10)[: rng.randint(12, 60)]})
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in LLM(path, device="cpu", **opts).generate(prompts, params, use_tqdm=False)]
    spec = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
            if method == "ngram" else {"model": path, "num_speculative_tokens": 3})
    for eager in (False, True):
        llm = LLM(path, device="cuda", enforce_eager=eager, max_num_seqs=16, speculative_config=spec, **opts)
        runner = llm.llm_engine.core.executor.worker.runner
        assert bool(runner.verify_graphs) != eager
        replays = {"n": 0}
        launch = runner._launch_padded_verify

        def counting(*args):
            replays["n"] += 1
            return launch(*args)

        runner._launch_padded_verify = counting
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == cpu
        assert [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]] == cpu[:3]
        assert llm.llm_engine.core.scheduler.spec_num_accepted_tokens > 0
        assert (replays["n"] > 0) != eager
        llm.llm_engine.core.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_fp8_kv_cache_agrees_with_cpu_fp8_kv_cache(tiny_model_dir, arch):
    """kv_cache_dtype="fp8" on CUDA (Triton write and reads, with decode CUDA graphs and without) against the
    CPU engine with an FP8 cache (torch_ref): both store the same e4m3 codes and read them in float32, so the
    greedy tokens and logprobs agree closely (a value exactly between two codes may round apart, hence not
    exact equality); the cache holds 4x the blocks of float32."""
    from tests.engine.test_kv_cache_fp8 import compare

    path = tiny_model_dir(arch)
    opts = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=512, kv_cache_memory=32 * 2**20,
                kv_cache_dtype="fp8")
    prompts = _prompts(24, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5, prompt_logprobs=1)
    cpu_llm = LLM(path, device="cpu", **opts)
    cpu = cpu_llm.generate(prompts, params, use_tqdm=False)
    cpu_blocks = cpu_llm.llm_engine.config.cache_config.num_blocks
    for eager in (False, True):
        llm = LLM(path, device="cuda", enforce_eager=eager, max_num_seqs=16, **opts)
        runner = llm.llm_engine.core.executor.worker.runner
        assert bool(runner.graphs) != eager
        assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
        num_blocks = llm.llm_engine.config.cache_config.num_blocks
        assert num_blocks == cpu_blocks == (32 * 2**20) // runner.kv_cache_bytes_per_block()
        m = compare(cpu, llm.generate(prompts, params, use_tqdm=False))
        assert m["prompt_top1"] >= 0.97 and m["prompt_mean_abs_logprob_diff"] < 5e-3, (eager, m)
        assert m["gen_top1"] >= 0.95 and m["gen_mean_abs_logprob_diff"] < 5e-3, (eager, m)
        llm.llm_engine.core.shutdown()
