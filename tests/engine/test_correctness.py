"""Greedy tokens and logprobs of the whole engine against transformers in float32 on the same weights."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.reference import hf_greedy

LOGPROB_TOL = 1e-3  # absolute, float32 engine vs float32 transformers


def _tiny_llm(path: str, **kwargs) -> LLM:
    opts = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_memory=16 * 2**20, max_model_len=512)
    opts.update(kwargs)
    return LLM(path, **opts)


def _prompts(n: int, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 70))] for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_tiny_models_greedy_and_logprobs_match_transformers(tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = _tiny_llm(path)
    prompts = _prompts(5, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(hf, prompt, 16)
        seq = out.outputs[0]
        assert seq.token_ids == ref_tokens
        for tok, pos_lps, ref in zip(seq.token_ids, seq.logprobs, ref_logprobs):
            assert abs(pos_lps[tok].logprob - ref[tok].item()) < LOGPROB_TOL
            assert pos_lps[tok].rank == 1  # greedy picks the most likely token
            top = torch.topk(ref, 3).indices.tolist()
            assert set(top) <= set(pos_lps)


def test_prompt_logprobs_match_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A small budget chunks the prompt, so prompt logprobs arrive over several steps.
    llm = _tiny_llm(path, max_num_batched_tokens=16)
    prompt = _prompts(1, seed=7)[0] + _prompts(1, seed=8)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        tok = prompt[pos]
        assert abs(entry[tok].logprob - ref[pos - 1, tok].item()) < LOGPROB_TOL
        expected_rank = 1 + int((ref[pos - 1] > ref[pos - 1, tok]).sum())
        assert entry[tok].rank == expected_rank
        assert math.isfinite(entry[tok].logprob)
