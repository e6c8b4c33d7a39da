"""Our Llama/Qwen2/Qwen3 models against transformers in float32 on the same tiny random weights.

Each model runs a prefill and then decodes over the paged KV cache it wrote (our attention path), and its
logits must match transformers' full forward at every position.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.reference import tiny_config
from tests.models.helpers import run_pagellm, run_transformers

from pagellm.config import ModelConfig
from pagellm.model_executor.loader import load_model
from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

ARCHS = ["llama", "llama3", "qwen2", "qwen3", "mistral", "mistral-window", "llama-bias"]
TOL = 1e-4


def make_config(arch: str):
    """conftest's tiny configs, plus Mistral and a Llama with attention/MLP biases."""
    if arch not in ("mistral", "mistral-window", "llama-bias"):
        return tiny_config(arch)
    from transformers import LlamaConfig, MistralConfig

    base = tiny_config("llama").to_dict()
    common = {k: base[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                   "bos_token_id", "eos_token_id")}
    if arch == "mistral":  # the window covers max_model_len (256): every layer attends fully
        return MistralConfig(**common, sliding_window=256, tie_word_embeddings=False)
    if arch == "mistral-window":  # a window shorter than the test's sequence (23 tokens): sliding attention
        return MistralConfig(**common, sliding_window=7, tie_word_embeddings=False)
    return LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


def save_tiny(arch: str, folder, **save_kwargs):
    """A seeded random model of `arch` saved as safetensors; returns the transformers model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.float32)
    with torch.no_grad():  # widen the random init, and give biases values, so mistakes show
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model.eval()


def model_config_for(path: str, dtype=torch.float32, load_format: str = "auto") -> ModelConfig:
    source = resolve_model_source(path)
    hf_config = load_hf_config(source)
    return ModelConfig(model=path, source=source, hf_config=hf_config, dtype=dtype, max_model_len=256,
                       load_format=load_format)


def prompt(vocab: int, n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    made = {}

    def get(arch: str):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"models-{arch}")
            made[arch] = (str(folder), save_tiny(arch, folder))
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_transformers(saved, arch):
    path, hf_model = saved(arch)
    model = load_model(model_config_for(path), "cpu")
    ids = prompt(hf_model.config.vocab_size, 23)  # crosses a block boundary in prefill and in decode
    ours = run_pagellm(model, ids, prefill_len=19)
    ref = run_transformers(hf_model, ids)
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_sharded_checkpoint(tmp_path):
    hf_model = save_tiny("qwen3", tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(model_config_for(str(tmp_path)), "cpu")
    ids = prompt(hf_model.config.vocab_size, 9)
    torch.testing.assert_close(run_pagellm(model, ids, 8), run_transformers(hf_model, ids), atol=TOL, rtol=0)


def test_tied_embeddings_share_one_tensor(saved):
    path, _ = saved("qwen2")  # tie_word_embeddings=True
    model = load_model(model_config_for(path), "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_bfloat16_is_close(saved):
    path, hf_model = saved("llama")
    model = load_model(model_config_for(path, dtype=torch.bfloat16), "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = prompt(hf_model.config.vocab_size, 12)
    ours = run_pagellm(model, ids, 10)
    ref = run_transformers(hf_model, ids)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


def test_missing_weight_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = saved("llama")
    state = load_file(os.path.join(path, "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight.*k_proj"):
        load_model(model_config_for(str(tmp_path)), "cpu")


def test_unsupported_architecture(tmp_path):
    from pagellm.model_executor.models.registry import get_model_class

    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")
    config = json.loads(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(ModelConfig(model=str(tmp_path), source=resolve_model_source(str(tmp_path)),
                               hf_config=SimpleNamespace(**config), dtype=torch.float32, max_model_len=64),
                   "cpu")


def test_arch_config_sliding_window_facts():
    """Mistral slides whenever a window is set; Qwen2 keeps its window off unless use_sliding_window."""
    from transformers import MistralConfig

    from pagellm.arch_config import ArchConfig

    mistral = ArchConfig.from_hf(MistralConfig(sliding_window=128, num_hidden_layers=2))
    assert mistral.sliding_window == 128 and [mistral.layer_window(i) for i in range(2)] == [128, 128]
    qwen2 = ArchConfig.from_hf(tiny_config("qwen2"))
    assert qwen2.sliding_window is None and qwen2.layer_window(0) is None
    assert ArchConfig.from_hf(tiny_config("qwen3")).head_dim == 32


def test_dummy_weights(saved):
    path, hf_model = saved("qwen3")
    mc = model_config_for(path, load_format="dummy")
    mc.seed = 7
    a = load_model(mc, "cpu")
    b = load_model(mc, "cpu")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.all(pa == 1), name
        else:
            assert 0.005 < pa.float().std() < 0.05, name  # initializer_range 0.02
    mc.seed = 8
    c = load_model(mc, "cpu")
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    ids = prompt(hf_model.config.vocab_size, 5)
    assert torch.isfinite(run_pagellm(a, ids, 3)).all()


def test_source_resolution(saved, tmp_path):
    from pagellm.model_executor.loader.source import ModelSource

    path, _ = saved("llama")
    src = resolve_model_source(path)
    assert src == ModelSource(path, "hf", None, None)
    assert src.display_name == os.path.basename(path)
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="local Hugging Face cache.*HF_HUB_OFFLINE=1"):
        resolve_model_source("no-such-org/no-such-model-xyz")  # the tests run offline (tests/conftest.py)


def test_generation_eos_ids(saved, tmp_path):
    from pagellm.model_executor.loader.source import load_generation_config, load_generation_eos_ids

    path, _ = saved("llama")
    src = resolve_model_source(path)
    gen = load_generation_config(src)
    assert gen is None or isinstance(gen, dict)
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    src2 = resolve_model_source(str(tmp_path))
    assert load_generation_eos_ids(src2) == {2, 7}
    assert load_generation_config(src2) == {"eos_token_id": [2, 7]}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_transformers(saved, arch, dtype):
    path, hf_model = saved(arch)
    model = load_model(model_config_for(path, dtype=dtype), "cuda")
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in model.parameters())
    ids = prompt(hf_model.config.vocab_size, 40)
    ref = run_transformers(hf_model, ids)
    ours = run_pagellm(model, ids, prefill_len=33, device="cuda").cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)  # TF32-free, but GPU reduction orders differ
    else:
        assert (ours - ref).abs().max() < 0.1 * ref.abs().max()
    dummy = model_config_for(path, dtype=dtype, load_format="dummy")
    assert torch.isfinite(run_pagellm(load_model(dummy, "cuda"), ids[:5], 3, device="cuda")).all()


def test_registry_records_are_complete():
    """Every record's class imports and follows the model interface; lookups by name, model_type and GGUF
    architecture give the same record; an unknown GGUF architecture is refused by name."""
    from types import SimpleNamespace

    from pagellm.model_executor.models.interface import CausalLM
    from pagellm.model_executor.models.registry import ARCHITECTURES, spec_for, spec_for_gguf

    for spec in ARCHITECTURES:
        cls = spec.model_class()
        assert cls.__name__ == spec.class_name
        assert all(callable(getattr(cls, m, None)) for m in ("forward", "compute_logits", "load_weights"))
        assert spec_for(spec.name) is spec
        for model_type in spec.model_types:
            assert spec_for(SimpleNamespace(model_type=model_type)) is spec
        if spec.gguf_arch:
            assert spec_for_gguf(spec.gguf_arch) is spec
    assert issubclass(spec_for("Gemma3ForCausalLM").model_class(), CausalLM)
    with pytest.raises(ValueError, match="'falcon' is not supported"):
        spec_for_gguf("falcon")
