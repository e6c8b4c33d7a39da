"""Phi-3 against transformers in float32: fused qkv_proj / gate_up_proj checkpoints, a sliding window shorter
than the sequence, greedy tokens and logprobs through the engine, and the refusal of longrope scaling."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import run_pagellm, run_transformers
from tests.models.test_models import model_config_for, prompt
from tests.reference import tiny_config

from pagellm.model_executor.loader import load_model

TOL = 1e-4


def phi3_config(**overrides):
    config = tiny_config("phi3")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_phi3(folder, **overrides):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(phi3_config(**overrides)).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


@pytest.mark.parametrize("window", [None, 7])
def test_tiny_phi3_matches_transformers(tmp_path, window):
    from safetensors import safe_open

    hf_model = save_phi3(tmp_path, sliding_window=window)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the checkpoint holds the fused tensors
        assert "model.layers.0.self_attn.qkv_proj.weight" in f.keys()
        assert "model.layers.0.mlp.gate_up_proj.weight" in f.keys()
    model = load_model(model_config_for(str(tmp_path)), "cpu")
    ids = prompt(512, 23)
    ours = run_pagellm(model, ids, prefill_len=19)
    torch.testing.assert_close(ours, run_transformers(hf_model, ids), atol=TOL, rtol=0)


def test_tiny_phi3_engine_greedy_matches_transformers(tmp_path):
    from tests.reference import hf_greedy, tiny_llm

    from pagellm import SamplingParams

    hf_model = save_phi3(tmp_path)
    llm = tiny_llm(str(tmp_path))
    prompts = [prompt(512, n, seed=s) for s, n in ((1, 6), (2, 19))]
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0, ignore_eos=True)
    for p, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params)):
        tokens, logprobs = hf_greedy(hf_model, p, 10)
        assert out.outputs[0].token_ids == tokens
        for step, tok in enumerate(tokens):
            assert abs(out.outputs[0].logprobs[step][tok].logprob - float(logprobs[step][tok])) < 1e-3


def test_phi3_longrope_is_refused():
    from pagellm.model_executor.models.phi3 import Phi3ForCausalLM

    half = 8  # head_dim 16 / 2
    config = phi3_config(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                          "short_factor": [1.0] * half, "long_factor": [2.0] * half,
                                          "original_max_position_embeddings": 256})
    with pytest.raises(NotImplementedError, match="longrope"):
        Phi3ForCausalLM(config)
