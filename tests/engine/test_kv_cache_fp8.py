"""kv_cache_dtype="fp8" through the whole engine on tiny random models (CPU): the FP8 cache keeps the greedy
tokens and logprobs of a cache in the model's dtype (close, not equal: K/V lose bits), holds twice the blocks
of bf16 (four times float32's) in the same memory, takes its scales from the checkpoint, and bad values are
refused naming the option. Scheduling (batches, chunks, preemption, prefix cache) with an FP8 cache is in
test_schedules.py."""

from __future__ import annotations

import argparse
import json
import random
import shutil

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.engine_args import EngineArgs
from tests.reference import tiny_llm

KV_MEMORY = 4 * 2**20


def _prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(20, 120))]} for _ in range(n)]


def _top(entry: dict) -> int:
    return max(entry.items(), key=lambda kv: kv[1].logprob)[0]


def compare(ref_outputs, fp8_outputs) -> dict:
    """Agreement of an FP8-cache run with a reference run of the same prompts:
    - teacher-forced, over the prompts (prompt logprobs): top-1 agreement and |logprob difference| of the
      prompt's own tokens;
    - generated, over the positions where both runs have the same context (up to each sequence's first
      different token): top-1 agreement, |logprob difference| of the reference's token, and at each first
      difference, how far below the reference's top logprob the FP8 run's token was (a near tie, if small)."""
    prompt_same = prompt_total = 0
    prompt_diffs, gen_diffs, tie_gaps = [], [], []
    gen_same = gen_total = 0
    for ref, fp8 in zip(ref_outputs, fp8_outputs):
        for tok, a, b in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:], fp8.prompt_logprobs[1:]):
            prompt_same += _top(a) == _top(b)
            prompt_total += 1
            prompt_diffs.append(abs(a[tok].logprob - b[tok].logprob))
        ra, rb = ref.outputs[0], fp8.outputs[0]
        for i, (ta, tb) in enumerate(zip(ra.token_ids, rb.token_ids)):
            gen_total += 1
            if tb in rb.logprobs[i] and ta in rb.logprobs[i]:
                gen_diffs.append(abs(ra.logprobs[i][ta].logprob - rb.logprobs[i][ta].logprob))
            if ta != tb:
                ref_lp = ra.logprobs[i]
                tie_gaps.append(ref_lp[ta].logprob - ref_lp[tb].logprob if tb in ref_lp else float("inf"))
                break
            gen_same += 1
    return {
        "prompt_top1": prompt_same / prompt_total,
        "prompt_mean_abs_logprob_diff": sum(prompt_diffs) / len(prompt_diffs),
        "prompt_max_abs_logprob_diff": max(prompt_diffs),
        "gen_top1": gen_same / gen_total,
        "gen_mean_abs_logprob_diff": sum(gen_diffs) / max(1, len(gen_diffs)),
        "divergence_gaps": tie_gaps,
    }


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp8_cache_keeps_greedy_tokens_and_logprobs(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = _prompts(8, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5, prompt_logprobs=1, ignore_eos=True)
    ref = tiny_llm(path, max_model_len=512).generate(prompts, params, use_tqdm=False)
    fp8 = tiny_llm(path, max_model_len=512, kv_cache_dtype="fp8").generate(prompts, params, use_tqdm=False)
    m = compare(ref, fp8)
    # Measured (float32 model, these seeds; llama / qwen3): teacher-forced top-1 0.957 / 0.941, mean |diff|
    # 0.016 / 0.022 nats, max 0.106 / 0.101; generated top-1 0.97 / 0.93, divergences at gaps <= 0.075 nats.
    assert m["prompt_top1"] >= 0.9, m
    assert m["prompt_mean_abs_logprob_diff"] < 0.05, m
    assert m["prompt_max_abs_logprob_diff"] < 0.4, m
    assert m["gen_top1"] >= 0.85, m
    assert m["gen_mean_abs_logprob_diff"] < 0.05, m
    # Where the greedy paths part, the two candidates were near ties in the reference itself.
    assert all(gap < 0.3 for gap in m["divergence_gaps"]), m


def test_block_count_follows_the_cache_dtype(tiny_model_dir):
    """Same kv_cache_memory: FP8 (1 byte) holds 2x the blocks of a bf16 cache and 4x those of a float32 one."""
    path = tiny_model_dir("llama")

    def blocks(**kwargs) -> int:
        llm = tiny_llm(path, kv_cache_memory=KV_MEMORY, **kwargs)
        runner = llm.llm_engine.core.executor.worker.runner
        want = runner.dtype if kwargs.get("kv_cache_dtype", "auto") == "auto" else torch.float8_e4m3fn
        assert all(c.dtype == want for c in runner.kv_caches)
        return llm.llm_engine.config.cache_config.num_blocks

    fp32, fp32_fp8 = blocks(), blocks(kv_cache_dtype="fp8")
    bf16, bf16_fp8 = blocks(dtype="bfloat16"), blocks(dtype="bfloat16", kv_cache_dtype="fp8_e4m3")
    # 2 layers x (K, V) x 16 tokens x 2 KV heads x 16 dims = 2048 elements a block.
    assert (fp32, bf16, fp32_fp8) == (KV_MEMORY // 8192, KV_MEMORY // 4096, KV_MEMORY // 2048)
    assert bf16_fp8 == 2 * bf16 and fp32_fp8 == 4 * fp32


def test_bad_kv_cache_dtype_is_refused(tiny_model_dir):
    path = tiny_model_dir("llama")
    for bad in ("fp16", "fp8_e5m2", "int8", ""):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory=KV_MEMORY, kv_cache_dtype=bad)
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser(exit_on_error=False))
    assert EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    assert EngineArgs.from_cli_args(parser.parse_args([])).kv_cache_dtype == "auto"
    with pytest.raises(argparse.ArgumentError, match="kv-cache-dtype"):
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_checkpoint_scales_are_loaded_and_used(tiny_model_dir, tmp_path):
    """A checkpoint carrying per-layer K/V scales under compressed-tensors' names: they reach every layer's
    Attention, and the engine reading its cache through them still agrees with the float cache (a write or a
    read that ignored a scale of 0.02 would scale K by 50 and break the attention)."""
    import safetensors.torch

    src = tiny_model_dir("llama")
    folder = tmp_path / "scaled"
    shutil.copytree(src, folder)
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.02)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor([0.05])
    weights["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor(0.03, dtype=torch.bfloat16)
    weights["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor(0.5)
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with open(folder / "config.json") as f:
        assert "quantization_config" not in json.load(f)

    llm = tiny_llm(str(folder), max_model_len=512, kv_cache_dtype="fp8")
    model = llm.llm_engine.core.executor.worker.runner.model
    got = [(layer.self_attn.attn.k_scale.item(), layer.self_attn.attn.v_scale.item()) for layer in model.model.layers]
    assert [v for pair in got for v in pair] == pytest.approx([0.02, 0.05, 0.03, 0.5], rel=1e-2)

    prompts = _prompts(6, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5, prompt_logprobs=1, ignore_eos=True)
    ref = tiny_llm(src, max_model_len=512).generate(prompts, params, use_tqdm=False)
    m = compare(ref, llm.generate(prompts, params, use_tqdm=False))
    assert m["prompt_top1"] >= 0.85 and m["prompt_mean_abs_logprob_diff"] < 0.08, m
    # The scales are in the cache: layer 0's K codes are K / 0.02, far above the |K| < ~10 of this model.
    k_codes = llm.llm_engine.core.executor.worker.runner.kv_caches[0][0].float().abs()
    assert k_codes.max().item() > 40.0
