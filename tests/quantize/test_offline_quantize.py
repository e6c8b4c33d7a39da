"""`pagellm quantize` on a tiny random Llama: SmoothQuant keeps the float model's function, the written
compressed-tensors checkpoint loads through `LLM(path)` and computes what the online `quantization=` path
computes, the `ignore` list keeps layers in float, and bad arguments are ValueErrors naming the field."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagellm import SamplingParams
from pagellm.quantize import quantize_model
from pagellm.quantize.calibration import collect_input_absmax, collect_input_hessians, hf_float_model
from pagellm.quantize.checkpoint import read_float_checkpoint
from pagellm.quantize.smoothing import MAPPINGS, smooth_state_dict
from tests.reference import TINY_VOCAB, random_prompt, tiny_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
PROMPTS = [random_prompt(seed, length) for seed, length in ((1, 6), (2, 30))]
CALIBRATION = [torch.randint(3, TINY_VOCAB, (48,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in range(3)]


def _outputs(path: str, **kwargs):
    llm = tiny_llm(path, **kwargs)
    try:
        return [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)], llm
    finally:
        llm.shutdown()


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothing_leaves_the_float_model_unchanged(tiny_model_dir, arch):
    """Every mapping at once (norm folds, up -> down, v -> o over GQA groups): transformers' float32 logits on the
    smoothed weights equal those on the original weights, while the weights did change."""
    _, config, state = read_float_checkpoint(tiny_model_dir(arch))
    model = hf_float_model(config, state)
    act_max = collect_input_absmax(model, CALIBRATION)
    # Exaggerate some channels so the scales are far from 1.
    act_max = {k: v * torch.linspace(0.1, 30.0, v.numel()) for k, v in act_max.items()}
    smoothed = smooth_state_dict(state, config, act_max, 0.8, MAPPINGS)
    changed = [k for k in state if not torch.equal(state[k], smoothed[k])]
    assert any("input_layernorm" in k for k in changed) and any("o_proj" in k for k in changed)
    assert any("down_proj" in k for k in changed) and any("v_proj" in k for k in changed)
    ids = random_prompt(7, 40)["prompt_token_ids"]
    ref, got = _logits(model, ids), _logits(hf_float_model(config, smoothed), ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_smoothing_flattens_the_activations(tiny_model_dir):
    """alpha=1 moves the whole activation range into the weights: every channel of a smoothed input peaks at
    the same value (1, before the weights' share) on the calibration tokens."""
    _, config, state = read_float_checkpoint(tiny_model_dir("llama"))
    act_max = collect_input_absmax(hf_float_model(config, state), CALIBRATION)
    smoothed = smooth_state_dict(state, config, act_max, 1.0)
    after = collect_input_absmax(hf_float_model(config, smoothed), CALIBRATION)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        torch.testing.assert_close(after[name], torch.ones_like(after[name]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_checkpoint_equals_the_online_path(tiny_model_dir, tmp_path, method):
    """Without smoothing the written checkpoint holds exactly what quantization='fp8'/'int8' computes at load:
    the same tokens and logprobs through LLM(path)."""
    base = tiny_model_dir("llama")
    summary = quantize_model(base, tmp_path / "q", method)
    with open(tmp_path / "q" / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    assert summary["quantized_layers"] == 2 * 7
    got, _ = _outputs(str(tmp_path / "q"))
    ref, _ = _outputs(base, quantization=method)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        for tok, glp, rlp in zip(g.token_ids, g.logprobs, r.logprobs):
            assert abs(glp[tok].logprob - rlp[tok].logprob) < 1e-5


def _prompt_logprobs(path: str, **kwargs) -> list[float]:
    """Teacher-forced logprobs of the prompts' own tokens (no sampled path to diverge on near-ties)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    llm = tiny_llm(path, **kwargs)
    try:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [lps[p["prompt_token_ids"][i]].logprob for o, p in zip(outs, PROMPTS)
            for i, lps in enumerate(o.prompt_logprobs) if lps is not None]


@pytest.mark.parametrize("method,gptq", [("int8", False), ("fp8", True)])
def test_smoothed_checkpoint_is_close_to_the_online_path(tiny_model_dir, tmp_path, method, gptq):
    """A smoothed (and GPTQ-rounded) checkpoint is another rounding of the same float model: teacher-forced,
    its logprobs stay within quantization noise of the online path's (the tiny model's logits are a few
    hundredths apart, so the sampled tokens themselves may flip on near-ties)."""
    base = tiny_model_dir("llama")
    quantize_model(base, tmp_path / "q", method, smoothquant=0.5, gptq=gptq, calibration_ids=CALIBRATION)
    got = _prompt_logprobs(str(tmp_path / "q"))
    ref = _prompt_logprobs(base, quantization=method)
    floats = _prompt_logprobs(base)
    assert len(got) == len(ref) == sum(len(p["prompt_token_ids"]) - 1 for p in PROMPTS)
    to_float = [abs(g - f) for g, f in zip(got, floats)]
    online_to_float = [abs(r - f) for r, f in zip(ref, floats)]
    # As far from float32 as the online path is (on average), and never further from it than its own noise.
    assert sum(to_float) / len(to_float) < 1.5 * sum(online_to_float) / len(online_to_float)
    assert max(abs(g - r) for g, r in zip(got, ref)) < 2 * max(online_to_float) + 0.02
    assert got != ref  # smoothing did change the rounding


def test_ignored_layers_stay_in_float(tiny_model_dir, tmp_path):
    """--ignore keeps layer 0's linears in float in the checkpoint, and the loader builds them unquantized."""
    from pagellm import LLM
    from pagellm.model_executor.layers.quantization.base import UnquantizedLinearMethod
    from pagellm.model_executor.layers.quantization.w8a8 import W8A8LinearMethod

    summary = quantize_model(tiny_model_dir("llama"), tmp_path / "q", "int8", ignore=[r"model\.layers\.0\..*"])
    assert len(summary["ignored_layers"]) == 7 and summary["quantized_layers"] == 7
    with open(tmp_path / "q" / "config.json") as f:
        assert json.load(f)["quantization_config"]["ignore"] == ["lm_head", r"re:model\.layers\.0\..*"]
    llm = LLM(str(tmp_path / "q"), dtype="float32", skip_tokenizer_init=True, kv_cache_memory=8 * 2**20,
              max_model_len=256)
    try:
        model = llm.llm_engine.core.executor.worker.runner.model
        methods = {name: type(m.quant_method) for name, m in model.named_modules() if hasattr(m, "quant_method")}
        out = llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()
    assert methods["model.layers.0.self_attn.qkv_proj"] is UnquantizedLinearMethod
    assert methods["model.layers.0.mlp.down_proj"] is UnquantizedLinearMethod
    assert methods["model.layers.1.mlp.gate_up_proj"] is W8A8LinearMethod
    assert len(out.token_ids) == PARAMS.max_tokens


def test_loader_refuses_half_ignored_merged_layer():
    from pagellm.model_executor.layers.quantization.compressed_tensors import layer_is_ignored

    assert layer_is_ignored(["re:.*_proj"], "model.layers.0.self_attn.qkv_proj")
    assert not layer_is_ignored(["lm_head"], "model.layers.0.mlp.gate_up_proj")
    with pytest.raises(ValueError, match="ignore"):
        layer_is_ignored(["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.qkv_proj")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotation_leaves_the_float_model_unchanged(tiny_model_dir, arch):
    """R1 folded into the weights and R2 into down_proj's: transformers' float32 logits, with down_proj's input
    rotated at run time as the engine does it, equal the original weights' (qwen2: tied embeddings, qkv bias)."""
    from pagellm.quantize.rotation import rotate_state_dict, rotated_float_model

    _, config, state = read_float_checkpoint(tiny_model_dir(arch))
    rotated = rotate_state_dict(state, config, block_size=32)
    assert torch.equal(rotated["model.norm.weight"], torch.ones_like(state["model.norm.weight"]))
    assert not torch.allclose(rotated["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert rotated["model.layers.1.mlp.down_proj.input_rotation"].shape == (32, 32)
    model = rotated_float_model(config, rotated)  # LM head untied, down_proj's input rotated by a forward hook
    ids = random_prompt(7, 40)["prompt_token_ids"]
    torch.testing.assert_close(_logits(model, ids), _logits(hf_float_model(config, state), ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gptq", [False, True])
def test_rotated_int8_checkpoint_runs_close_to_the_online_path(tiny_model_dir, tmp_path, gptq):
    """`--rotate` (and GPTQ calibrated on the rotated model): the engine reads the checkpoint's rotation for
    down_proj (no norm or activation quantizes for it) and stays as close to float32 as plain int8 does (a random
    tiny model has no outlier channels to gain on; on the embedded SmolLM2 it is what meets the quality targets:
    README, Quantization)."""
    from pagellm import LLM
    from pagellm.model_executor.layers.quantization.w8a8 import W8A8LinearMethod

    base = tiny_model_dir("llama")
    summary = quantize_model(base, tmp_path / "q", "int8", rotate=32, gptq=gptq,
                             calibration_ids=CALIBRATION if gptq else None)
    assert summary["rotate"] == 32 and summary["quantized_layers"] == 2 * 7
    with open(tmp_path / "q" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["tie_word_embeddings"] is False
    assert cfg["quantization_config"]["pagellm_input_rotation"]["block_size"] == 32
    llm = LLM(str(tmp_path / "q"), dtype="float32", skip_tokenizer_init=True, kv_cache_memory=8 * 2**20,
              max_model_len=256)
    try:
        layers = dict(llm.llm_engine.core.executor.worker.runner.model.named_modules())
    finally:
        llm.shutdown()
    down, gate_up = layers["model.layers.0.mlp.down_proj"], layers["model.layers.0.mlp.gate_up_proj"]
    assert isinstance(down.quant_method, W8A8LinearMethod) and down.quant_method.rotation_block == 32
    assert down.input_quant_dtype is None and gate_up.input_quant_dtype == torch.int8
    got = _prompt_logprobs(str(tmp_path / "q"))
    ref = _prompt_logprobs(base, quantization="int8")
    floats = _prompt_logprobs(base)
    to_float = [abs(g - f) for g, f in zip(got, floats)]
    online_to_float = [abs(r - f) for r, f in zip(ref, floats)]
    assert sum(to_float) / len(to_float) < 1.5 * sum(online_to_float) / len(online_to_float)
    assert max(to_float) < 2 * max(online_to_float) + 0.02


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="fp8", rotate=32), "rotate"),
    (dict(method="int8", rotate=32, smoothquant=0.5), "rotate"),
    (dict(method="int8", rotate=48), "rotate"),  # does not divide the MLP's width (128)
    (dict(method="int8", rotate=32, ignore=[r".*\.down_proj"]), "ignore"),
    (dict(method="fp4"), "method"),
    (dict(method="fp8", smoothquant=1.5), "smoothquant"),
    (dict(method="fp8", smoothquant=0.5, smooth_mappings=["qk"]), "smooth_mappings"),
    (dict(method="fp8", ignore=["("]), "ignore"),
    (dict(method="fp8", ignore=["nothing_here"]), "ignore"),
    (dict(method="fp8", ignore=[r".*\.q_proj"]), "ignore"),  # half of the merged qkv layer
    (dict(method="fp8", gptq="yes"), "gptq"),
    (dict(method="fp8", gptq=True, calibration_ids=[[]]), "calibration_ids"),
])
def test_bad_arguments_are_value_errors_naming_the_field(tiny_model_dir, tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        quantize_model(tiny_model_dir("llama"), tmp_path / "q", **kwargs)


def test_refuses_a_quantized_model_and_a_used_output(tiny_model_dir, tmp_path):
    quantize_model(tiny_model_dir("llama"), tmp_path / "q", "fp8")
    with pytest.raises(ValueError, match="model"):
        quantize_model(str(tmp_path / "q"), tmp_path / "again", "int8")
    with pytest.raises(ValueError, match="output"):
        quantize_model(tiny_model_dir("llama"), tmp_path / "q", "fp8")


def test_cli_writes_a_checkpoint(tiny_model_dir, tmp_path, capsys):
    from pagellm.entrypoints.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", tiny_model_dir("llama"), "--method", "int8", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_layers"] == 14
    assert os.path.isfile(out / "model.safetensors")
    assert main(["quantize", tiny_model_dir("llama"), "--method", "int8", "--smoothquant", "2",
                 "--output", str(tmp_path / "bad")]) == 2
    assert "smoothquant" in capsys.readouterr().err


def test_hessians_are_shared_by_siblings(tiny_model_dir):
    _, config, state = read_float_checkpoint(tiny_model_dir("llama"))
    h = collect_input_hessians(hf_float_model(config, state), CALIBRATION)
    assert h["model.layers.0.self_attn.q_proj"] is h["model.layers.0.self_attn.v_proj"]
    assert h["model.layers.0.mlp.down_proj"].shape == (128, 128)
