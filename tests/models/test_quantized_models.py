"""Quantized checkpoints end to end on the CPU: a tiny Llama quantized by the test (RTN, packed in the published
GPTQ / AWQ / compressed-tensors layouts), loaded by `LLM`, and its greedy tokens and logprobs against
transformers in float32 on the weights the checkpoint dequantizes to. Also: dummy weights for every method,
and GPTQ with act-order at tensor_parallel_size=2 equal to one device.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.model_executor.layers.quantization.rtn import quantization_config, quantize_state_dict
from pagellm.model_executor.layers.quantization.w8a8 import FP8
from tests.reference import hf_greedy, random_prompt

LOGPROB_TOL = 1e-4
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)
PROMPTS = [random_prompt(seed, length) for seed, length in ((1, 5), (2, 40), (3, 17))]


def _float_state(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def _write(folder, base: str, tensors: dict[str, torch.Tensor], qc=None) -> str:
    """A model folder: `base`'s config.json (with `qc` as its quantization_config) and these tensors."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    if qc is not None:
        config["quantization_config"] = qc
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """method name -> (quantized folder, float folder of the dequantized weights)."""
    base = tiny_model_dir("llama")
    state = _float_state(base)
    made = {}

    def make(name: str, method: str, **opts):
        if name not in made:
            root = tmp_path_factory.mktemp(f"quant-{name}")
            quantized, dequantized = quantize_state_dict(state, method, **opts)
            made[name] = (_write(root / "q", base, quantized, quantization_config(method, **opts)),
                          _write(root / "deq", base, dequantized))
        return made[name]

    return make


def _generate(path: str, **kwargs):
    opts = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_memory=8 * 2**20, max_model_len=256)
    opts.update(kwargs)
    llm = LLM(path, **opts)
    try:
        return [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("name,method,opts", [
    ("gptq-g32", "gptq", dict(group_size=32)),
    ("gptq-act-order", "gptq", dict(group_size=32, act_order=True)),
    ("gptq-asym-g64", "gptq", dict(group_size=64, sym=False)),
    ("awq-g32", "awq", dict(group_size=32)),
])
def test_4bit_checkpoint_matches_transformers_on_dequantized_weights(checkpoints, name, method, opts):
    from transformers import AutoModelForCausalLM

    quantized, dequantized = checkpoints(name, method, **opts)
    hf = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, _generate(quantized)):
        ref_tokens, ref_logprobs = hf_greedy(hf, prompt["prompt_token_ids"], PARAMS.max_tokens)
        assert out.token_ids == ref_tokens
        for tok, lps, ref in zip(out.token_ids, out.logprobs, ref_logprobs):
            assert abs(lps[tok].logprob - ref[tok].item()) < LOGPROB_TOL


@pytest.mark.parametrize("qdtype,online", [(FP8, "fp8"), (torch.int8, "int8")])
def test_compressed_tensors_checkpoint_equals_quantizing_at_load(checkpoints, tiny_model_dir, qdtype, online):
    """A W8A8 checkpoint holds what quantization='fp8'/'int8' computes from the float weights at load: the two
    engines give the same tokens and logprobs, so the checkpoint's tensors reach the right rows of the merged
    layers. (The layer numerics are in tests/layers/test_quantization.py.)"""
    name = f"ct-{online}"
    quantized, _ = checkpoints(name, "compressed-tensors", qdtype=qdtype)
    got = _generate(quantized)
    ref = _generate(tiny_model_dir("llama"), quantization=online)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        for tok, glp, rlp in zip(g.token_ids, g.logprobs, r.logprobs):
            assert abs(glp[tok].logprob - rlp[tok].logprob) < 1e-5


@pytest.mark.usefixtures("forkserver_workers")  # (tests/conftest.py: workers start in a second)
def test_gptq_act_order_tensor_parallel_matches_one_device(checkpoints):
    """TP=2 (gloo): packed input channels, act-order g_idx and replicated scales split by the parameters' tags."""
    quantized, _ = checkpoints("gptq-act-order", "gptq", group_size=32, act_order=True)
    ref = _generate(quantized)
    got = _generate(quantized, tensor_parallel_size=2, max_num_batched_tokens=64)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        for tok, glp, rlp in zip(g.token_ids, g.logprobs, r.logprobs):
            assert abs(glp[tok].logprob - rlp[tok].logprob) < LOGPROB_TOL


@pytest.mark.parametrize("quantization", ["fp8", "int8", "gptq", "awq", "compressed-tensors"])
def test_dummy_weights_with_every_method(tiny_model_dir, tmp_path, quantization):
    """load_format='dummy' builds every format with random values of a sane spread: the logits stay finite and
    the outputs differ from a uniform guess."""
    from pagellm.model_executor.layers.quantization.base import LinearMethod

    path = tiny_model_dir("llama")
    if quantization == "compressed-tensors":  # random weights need the checkpoint's scheme
        path = _write(tmp_path / "ct", path, {"unused": torch.zeros(1)}, quantization_config(quantization,
                                                                                             qdtype=torch.int8))
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory=8 * 2**20, max_model_len=256,
              load_format="dummy", quantization=quantization)
    try:
        model = llm.llm_engine.core.executor.worker.runner.model
        methods = {type(m.quant_method).__name__ for m in model.modules()
                   if isinstance(getattr(m, "quant_method", None), LinearMethod)}
        assert methods and "UnquantizedLinearMethod" not in methods
        out = llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()
    assert len(out.token_ids) == PARAMS.max_tokens
    lps = [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]
    assert all(torch.isfinite(torch.tensor(lps)))
    assert max(lps) > torch.log(torch.tensor(1 / 512)).item() + 0.01
