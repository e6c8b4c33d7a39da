"""LoRA on CUDA: the Triton kernels inside the engine, decode CUDA graphs and async scheduling give the CPU
engine's tokens (which equal transformers with the adapters merged, test_lora_llm.py). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.lora import LoRARequest
from tests.lora.helpers import make_adapter
from tests.reference import random_prompt

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_lora_tokens_equal_cpu(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    loras = [LoRARequest(f"a{i}", i + 1, make_adapter(str(tmp_path / f"a{i}"), base, rank=8, seed=10 + i))
             for i in range(3)]
    opts = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=512, kv_cache_memory=32 * 2**20,
                enable_lora=True, max_loras=3, max_lora_rank=16)
    prompts = [random_prompt(i, 5 + 3 * i) for i in range(16)]
    per_prompt = [None if i % 4 == 0 else loras[i % 3] for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in LLM(base, device="cpu", **opts).generate(
        prompts, params, use_tqdm=False, lora_request=per_prompt)]
    for eager in (False, True):
        llm = LLM(base, device="cuda", enforce_eager=eager, max_num_seqs=16, **opts)
        assert bool(llm.llm_engine.core.executor.worker.runner.graphs) != eager
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False,
                                                             lora_request=per_prompt)]
        assert got == cpu, f"enforce_eager={eager}"
        llm.shutdown()
