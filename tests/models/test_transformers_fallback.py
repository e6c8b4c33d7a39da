"""The transformers fallback (models/transformers_fallback.py): architectures pagellm has no file for (OLMo2,
Granite) run through transformers' modules with our paged attention, and must give transformers' own float32
eager results; Llama forced through the fallback must give the native path's results. Chunked prefill and the
prefix cache go through the same attention function (it only sees each step's tokens)."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from pagellm import SamplingParams
from pagellm.engine_args import EngineArgs
from pagellm.model_executor.loader import load_model
from pagellm.model_executor.models.model_impl import resolve_model_impl
from pagellm.model_executor.models.transformers_fallback import TransformersForCausalLM
from tests.models.helpers import run_pagellm, run_transformers
from tests.models.test_models import model_config_for, prompt
from tests.reference import hf_greedy, tiny_llm

FALLBACK_ARCHS = ["olmo2", "granite"]
LOGIT_TOL = 1e-4
LOGPROB_TOL = 1e-3  # absolute, float32 engine vs float32 transformers (as tests/engine/test_correctness.py)


def _hf_eager(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _runner_model(llm):
    return llm.llm_engine.core.executor.worker.runner.model


def _prompts(n: int, seed: int, low: int = 3, high: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _check_greedy(llm, hf, prompts: list[list[int]], max_tokens: int = 12) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt_ids, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(hf, prompt_ids, max_tokens)
        seq = out.outputs[0]
        assert seq.token_ids == ref_tokens
        for tok, pos_lps, ref in zip(seq.token_ids, seq.logprobs, ref_logprobs):
            assert abs(pos_lps[tok].logprob - ref[tok].item()) < LOGPROB_TOL
            assert set(torch.topk(ref, 3).indices.tolist()) <= set(pos_lps)
    return outputs


@pytest.mark.parametrize("arch", FALLBACK_ARCHS)
def test_fallback_logits_match_transformers(tiny_model_dir, arch, caplog):
    """A prefill then decodes over the paged cache the prefill wrote: every position's logits are
    transformers' (eager attention, float32), and the loader says which path it took."""
    path = tiny_model_dir(arch)
    assert resolve_model_impl(model_config_for(path).hf_config) == "transformers"
    with caplog.at_level(logging.INFO, logger="pagellm.model_executor.loader"):
        model = load_model(model_config_for(path), "cpu")
    assert isinstance(model, TransformersForCausalLM)
    assert any("through the transformers fallback" in r.getMessage() for r in caplog.records)
    ids = prompt(512, 24)
    ours = run_pagellm(model, ids, prefill_len=10)
    ref = run_transformers(_hf_eager(path), ids)
    torch.testing.assert_close(ours, ref, atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("arch", FALLBACK_ARCHS)
def test_fallback_engine_greedy_chunked_and_prefix_cached(tiny_model_dir, arch):
    """The whole engine: a batch of prompts longer than the step's token budget (chunked prefill), then prompts
    sharing a long prefix with them (prefix-cache hits); tokens and logprobs are transformers' each time."""
    path = tiny_model_dir(arch)
    hf = _hf_eager(path)
    llm = tiny_llm(path, max_num_batched_tokens=32, max_num_seqs=8)
    model = _runner_model(llm)
    assert isinstance(model, TransformersForCausalLM)
    assert llm.llm_engine.config.model_config.enforce_eager  # no CUDA graphs for the fallback
    prompts = _prompts(4, seed=1, low=40, high=70)  # each longer than the 32-token budget
    _check_greedy(llm, hf, prompts)
    shared = [p[:33] + q for p, q in zip(prompts, _prompts(4, seed=2, low=3, high=10))]
    outputs = _check_greedy(llm, hf, shared)
    assert all(out.num_cached_tokens >= 32 for out in outputs)  # two full blocks came from the cache


@pytest.mark.parametrize("arch,kv_cache_dtype", [("llama", "auto"), ("qwen3", "auto"), ("llama", "fp8")])
def test_native_arch_through_fallback_equals_native(tiny_model_dir, arch, kv_cache_dtype):
    """model_impl='transformers' on an architecture pagellm has: the same tokens and logprobs as our own model,
    also with an FP8 KV cache (the fallback's attention writes and reads it like ours)."""
    path = tiny_model_dir(arch)
    prompts = _prompts(4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    results = {}
    for impl in ("pagellm", "transformers"):
        llm = tiny_llm(path, model_impl=impl, max_num_batched_tokens=48, kv_cache_dtype=kv_cache_dtype)
        want = TransformersForCausalLM if impl == "transformers" else torch.nn.Module
        assert isinstance(_runner_model(llm), want)
        results[impl] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert type(_runner_model(llm)) is TransformersForCausalLM
    for native, fallback in zip(results["pagellm"], results["transformers"]):
        a, b = native.outputs[0], fallback.outputs[0]
        assert a.token_ids == b.token_ids
        for tok, lp_a, lp_b in zip(a.token_ids, a.logprobs, b.logprobs):
            assert abs(lp_a[tok].logprob - lp_b[tok].logprob) < 1e-4


def test_fallback_dummy_weights_run(tiny_model_dir):
    """load_format='dummy' fills the fallback's parameters like a native model's (benchmarks of any config)."""
    path = tiny_model_dir("olmo2")
    llm = tiny_llm(path, load_format="dummy")
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert isinstance(_runner_model(llm), TransformersForCausalLM)


def test_model_impl_option_errors(tiny_model_dir):
    olmo2, llama = tiny_model_dir("olmo2"), tiny_model_dir("llama")
    with pytest.raises(ValueError, match="model_impl must be one of"):
        EngineArgs(model=llama, model_impl="vllm").create_engine_config()
    with pytest.raises(ValueError, match="model_impl='pagellm'.*Olmo2ForCausalLM"):
        EngineArgs(model=olmo2, model_impl="pagellm").create_engine_config()
    with pytest.raises(ValueError, match="one device"):
        EngineArgs(model=olmo2, tensor_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(model=olmo2, quantization="fp8").create_engine_config()
    config = EngineArgs(model=llama).create_engine_config()
    assert config.model_config.model_impl == "pagellm" and not config.model_config.enforce_eager
    config = EngineArgs(model=olmo2).create_engine_config()
    assert config.model_config.model_impl == "transformers" and config.model_config.enforce_eager


def test_what_the_fallback_cannot_serve_is_refused():
    from transformers import Gemma2Config, T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        resolve_model_impl(T5Config(d_model=32, num_layers=1, num_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        resolve_model_impl(Gemma2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch,impl", [("olmo2", "auto"), ("llama", "transformers")])
def test_fallback_cuda_greedy_equals_cpu(tiny_model_dir, arch, impl):
    """On CUDA the fallback attends with the Triton kernels (eagerly: no CUDA graphs); its greedy tokens in float32
    are the CPU engine's, in a batch with chunked prefills."""
    path = tiny_model_dir(arch)
    prompts = [{"prompt_token_ids": p} for p in _prompts(16, seed=4, high=90)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in tiny_llm(path, device="cpu", model_impl=impl).generate(
        prompts, params, use_tqdm=False)]
    llm = tiny_llm(path, device="cuda", model_impl=impl, max_num_batched_tokens=64, max_num_seqs=8)
    runner = llm.llm_engine.core.executor.worker.runner
    assert isinstance(runner.model, TransformersForCausalLM) and not runner.graphs
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == cpu
    llm.llm_engine.core.shutdown()


def test_fallback_loads_fp8_kv_scales(tiny_model_dir):
    """A checkpoint's per-layer KV-cache scales (`...self_attn.k_scale`, as pagellm's own models read them) fill
    the fallback's attention scale buffers, which its attention function passes to the backend."""
    model = load_model(model_config_for(tiny_model_dir("olmo2")), "cpu")
    loaded = model.load_weights([("model.layers.1.self_attn.k_scale", torch.tensor(0.25)),
                                 ("model.layers.1.self_attn.v_scale", torch.tensor(0.5))])
    assert loaded == set()  # buffers, not parameters
    attn = model.hf.model.layers[1].self_attn._pagellm_attn
    assert attn.k_scale.item() == 0.25 and attn.v_scale.item() == 0.5
    assert model.hf.model.layers[0].self_attn._pagellm_attn.k_scale.item() == 1.0
