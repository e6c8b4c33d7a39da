"""LoRA through LLM: greedy tokens and logprobs of adapters (several, and the base, in one batch) equal to
transformers in float32 with each adapter merged into the weights (PEFT's computation); the prefix cache never
shares blocks across adapters; bad adapters fail naming the field."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagellm import SamplingParams
from pagellm.lora import LoRARequest
from tests.lora.helpers import make_adapter, merged_reference
from tests.reference import hf_greedy, random_prompt, tiny_llm

LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """The base folder and three adapters: every projection (rank 8), attention q/v only (rank 4, rsLoRA), MLP
    only (rank 8)."""
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("adapters")
    return base, {
        "all": make_adapter(str(root / "all"), base, rank=8, seed=1),
        "qv": make_adapter(str(root / "qv"), base, rank=4, seed=2, targets=["q_proj", "v_proj"], rslora=True),
        "mlp": make_adapter(str(root / "mlp"), base, rank=8, seed=3, targets=["gate_proj", "up_proj", "down_proj"]),
    }


def _check(outputs, prompts, loras, refs, max_tokens):
    for prompt, lora, out in zip(prompts, loras, outputs):
        ref_tokens, ref_logprobs = hf_greedy(refs[lora], prompt["prompt_token_ids"], max_tokens)
        seq = out.outputs[0]
        assert seq.token_ids == ref_tokens, f"adapter {lora}"
        for tok, lp, ref in zip(seq.token_ids, seq.logprobs, ref_logprobs):
            assert abs(lp[tok].logprob - ref[tok].item()) < LOGPROB_TOL


def test_adapters_and_base_in_one_batch_match_merged_transformers(adapters):
    base, paths = adapters
    refs = {name: merged_reference(base, path) for name, path in paths.items()}
    refs[None] = merged_reference(base, None)
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(paths.items())}
    # Every adapter differs from the base (else the test would prove nothing).
    probe = random_prompt(99, 12)["prompt_token_ids"]
    base_tokens = hf_greedy(refs[None], probe, 8)[0]
    assert all(hf_greedy(refs[n], probe, 8)[0] != base_tokens for n in paths)

    # max_loras=2 with three adapters: the scheduler holds the third back until a slot frees; small steps mix
    # prefill chunks of some requests with decodes of others.
    llm = tiny_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_batched_tokens=48)
    loras = [None, "all", "qv", "all", None, "mlp", "qv", "mlp"]
    prompts = [random_prompt(i, 10 + 7 * i) for i in range(len(loras))]
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)
    outputs = llm.generate(prompts, params, use_tqdm=False,
                           lora_request=[None if n is None else requests[n] for n in loras])
    _check(outputs, prompts, loras, refs, 10)
    # One adapter for every prompt.
    outputs = llm.generate(prompts[:3], params, use_tqdm=False, lora_request=requests["mlp"])
    _check(outputs, prompts[:3], ["mlp"] * 3, refs, 10)


def test_prefix_cache_keys_include_the_adapter(adapters):
    base, paths = adapters
    llm = tiny_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8)
    prompt = random_prompt(7, 50)  # three full blocks
    params = SamplingParams(temperature=0.0, max_tokens=6)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    lora = LoRARequest("all", 1, paths["all"])
    with_lora = llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0]
    with_lora_again = llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0]
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert with_lora.num_cached_tokens == 0  # the base's blocks are not the adapter's
    assert with_lora_again.num_cached_tokens == 48
    ref = hf_greedy(merged_reference(base, paths["all"]), prompt["prompt_token_ids"], 6)[0]
    assert with_lora.outputs[0].token_ids == ref == with_lora_again.outputs[0].token_ids


def test_bad_adapters_fail_naming_the_field(adapters, tmp_path):
    base, paths = adapters
    llm = tiny_llm(base, enable_lora=True, max_lora_rank=4)
    prompt = random_prompt(1, 5)
    with pytest.raises(ValueError, match="lora_path: .* is not a folder"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("gone", 1, str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="lora_path: .* has no adapter_config.json"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("empty", 2, str(empty)))
    (empty / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="lora_path: .* has no adapter_model.safetensors"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("empty", 2, str(empty)))
    with pytest.raises(ValueError, match="r: the adapter's rank 8 exceeds max_lora_rank 4"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("all", 3, paths["all"]))
    with pytest.raises(ValueError, match="lora_int_id: must be a positive integer"):
        LoRARequest("x", 0, paths["all"])
    # The engine still serves after the refusals.
    assert llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids

    plain = tiny_llm(base)
    with pytest.raises(ValueError, match="lora_request: LoRA is not enabled"):
        plain.generate(prompt, use_tqdm=False, lora_request=LoRARequest("qv", 1, paths["qv"]))
    with pytest.raises(ValueError, match="lora_modules: adapters need enable_lora"):
        tiny_llm(base, lora_modules=[f"qv={paths['qv']}"])
    with pytest.raises(ValueError, match="r: the adapter's rank 8 exceeds max_lora_rank 4"):
        tiny_llm(base, enable_lora=True, max_lora_rank=4, lora_modules=[f"all={paths['all']}"])


def test_peft_reads_the_test_adapters_as_the_merged_reference(adapters):
    """The adapters the tests make are PEFT's format: PEFT itself gives the merged reference's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base, paths = adapters
    ids = torch.tensor([random_prompt(3, 20)["prompt_token_ids"]])
    for path in paths.values():
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                               path).eval()
        with torch.inference_mode():
            got = model(ids).logits
            want = merged_reference(base, path)(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert os.path.isfile(os.path.join(paths["all"], "adapter_model.safetensors"))


@pytest.mark.usefixtures("forkserver_workers")  # (tests/conftest.py: workers start in a second)
def test_pipeline_parallel_stages_apply_their_layers_adapters(adapters):
    """At pipeline_parallel_size=2 each stage's runner holds the adapter slots of its own layers."""
    base, paths = adapters
    llm = tiny_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, pipeline_parallel_size=2)
    try:
        lora = LoRARequest("all", 1, paths["all"])
        prompts = [random_prompt(20 + i, 9 + 4 * i) for i in range(4)]
        loras = [None, lora, None, lora]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False,
                            lora_request=loras)
        refs = {None: merged_reference(base, None), "all": merged_reference(base, paths["all"])}
        for prompt, l, out in zip(prompts, loras, outs):
            want = hf_greedy(refs[None if l is None else "all"], prompt["prompt_token_ids"], 6)[0]
            assert out.outputs[0].token_ids == want
    finally:
        llm.shutdown()
