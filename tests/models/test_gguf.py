"""GGUF loading. Fast tests write tiny GGUF files (llama arch with llama.cpp's q/k row permutation, qwen2 with
biases, qwen3 with q/k norms; Q8_0 and F32 tensors) and compare with transformers on the same weights. The slow
tests load the embedded SmolLM2 GGUF and compare with transformers' own GGUF loader, and the whole engine's greedy
tokens and logprobs on it with transformers' (in this file so that one test process pays for transformers'
40-second conversion of the GGUF, instead of two waiting on each other)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.reference import hf_forced_logprobs, tiny_config
from tests.models.helpers import run_pagellm, run_transformers

from pagellm import SamplingParams
from pagellm.config import ModelConfig
from pagellm.model_executor.loader import load_model
from pagellm.model_executor.loader.source import (
    gguf_config,
    load_generation_eos_ids,
    load_hf_config,
    load_tokenizer,
    resolve_model_source,
)

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


ENGINE_LOGPROB_TOL = 1e-3  # absolute, the float32 engine against float32 transformers


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of llama-arch models (interleave the two rotary halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module...>.<weight|bias>
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_tiny_gguf(arch: str, path: str):
    """A tiny GGUF of `arch` ("llama" | "qwen2" | "qwen3") and the transformers model holding exactly the
    weights it stores (2-D tensors go through Q8_0)."""
    import gguf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(arch)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    qtype = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
                q = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype)).reshape(p.shape))
            else:
                p.normal_(0.0, 0.1) if name.endswith("bias") else p.uniform_(0.5, 1.5)
            data = p.numpy().copy()
            if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
                data = llama_cpp_permute(data, heads)
            if p.dim() > 1:
                w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype),
                             raw_dtype=qtype)
            else:
                w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def model_config_for(path: str, dtype=torch.float32) -> ModelConfig:
    source = resolve_model_source(path)
    return ModelConfig(model=path, source=source, hf_config=load_hf_config(source), dtype=dtype, max_model_len=256)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_matches_transformers(tmp_path, arch):
    path = str(tmp_path / f"tiny-{arch}.gguf")
    hf = write_tiny_gguf(arch, path)
    mc = model_config_for(path)
    assert mc.source.kind == "gguf" and mc.source.gguf_file == f"tiny-{arch}.gguf"
    config = mc.hf_config
    assert config.architectures == [type(hf).__name__]
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (config.num_key_value_heads, config.vocab_size) == (hf.config.num_key_value_heads, hf.config.vocab_size)
    assert getattr(config, "head_dim", None) in (None, getattr(hf.config, "head_dim", None))
    model = load_model(mc, "cpu")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (21,), generator=g).tolist()
    torch.testing.assert_close(run_pagellm(model, ids, 18), run_transformers(hf, ids), atol=1e-4, rtol=0)


def test_folder_with_one_gguf(tmp_path):
    write_tiny_gguf("qwen2", str(tmp_path / "m.gguf"))
    src = resolve_model_source(str(tmp_path))
    assert (src.kind, src.gguf_file, src.display_name) == ("gguf", "m.gguf", "m")
    assert load_generation_eos_ids(src) == {2}
    write_tiny_gguf("qwen2", str(tmp_path / "n.gguf"))
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model_source(str(tmp_path))


def test_own_gguf_parser_matches_gguf_reader(tmp_path):
    import gguf

    from pagellm.model_executor.loader.gguf_loader import GGUFFile

    path = str(tmp_path / "t.gguf")
    write_tiny_gguf("llama", path)
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert [t.name for t in reader.tensors] == list(f.tensors)
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, int(t.tensor_type))
            assert info.dims == tuple(int(d) for d in t.shape)
            np.testing.assert_array_equal(f.dequantize(t.name).numpy().reshape(-1),
                                          gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1))
        assert f.metadata["llama.attention.head_count_kv"] == 2
        assert f.metadata["general.name"] == "tiny-llama"


# ---- the embedded model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm_gguf_logits_match_transformers(smollm_gguf, hf_smollm):
    hf_model, hf_tokenizer = hf_smollm
    mc = model_config_for(smollm_gguf)
    model = load_model(mc, "cpu")
    ids = hf_tokenizer("The capital of France is Paris. The capital of Germany is").input_ids
    ours = run_pagellm(model, ids + [12], prefill_len=len(ids))  # a prefill, then one decode
    ref = run_transformers(hf_model, ids + [12])
    assert (ours - ref).abs().max() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm_gguf_config_and_tokenizer_match_transformers(smollm_gguf, hf_smollm):
    hf_model, hf_tokenizer = hf_smollm
    source = resolve_model_source(None)
    assert source.file_path == smollm_gguf
    ours = gguf_config(smollm_gguf)
    ref = hf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim", "model_type"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    tok = load_tokenizer(source)
    assert type(tok) is type(hf_tokenizer)
    for text in ["Hello world", "  two spaces\nnew line\ttab", "émoji 🤖 中文 ü", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text).input_ids == hf_tokenizer(text).input_ids, text
    assert tok.chat_template and tok.chat_template == hf_tokenizer.chat_template
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 2)
    messages = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert load_generation_eos_ids(source) == {2}


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_torch_dequantize_is_bit_identical_to_gguf(qtype_name):
    import gguf

    from pagellm.model_executor.loader.gguf_loader import dequantize_torch

    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)
    q = gguf.quants.quantize(data, qtype)
    q.setflags(write=False)
    ours = dequantize_torch(q, int(qtype)).numpy().reshape(48, 96)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(q, qtype))


def test_smollm_greedy_matches_transformers(smollm_llm, hf_smollm):
    model, tokenizer = hf_smollm
    texts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "def fibonacci(n):",
        "Once upon a time, in a land far away, there lived a",
        "List three colours:",
        "Translate to French: Good morning, how are you today? I hope the weather is nice where you are.",
        "1, 2, 3, 4,",
        "Explain in one sentence why the sky is blue, and then explain why sunsets are red, "
        "and finally say what colour the sky is on Mars and why it differs from the Earth.",
    ]
    ids = [tokenizer.encode(t) for t in texts]
    assert len({len(i) for i in ids}) >= 6  # prompts of different lengths
    outputs = smollm_llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=32, logprobs=1), use_tqdm=False)
    for prompt_ids, out in zip(ids, outputs):
        assert out.prompt_token_ids == prompt_ids
        seq = out.outputs[0]
        tokens = list(seq.token_ids)
        # transformers' greedy continuation is the engine's when each token is the argmax of transformers' logits
        # after the same prefix (checked in one forward pass per prompt instead of 32 decoding steps),
        # and it stops where the engine stops: at EOS (then EOS was transformers' argmax too), else at 32 tokens.
        ref_logprobs = hf_forced_logprobs(model, prompt_ids, tokens)
        assert ref_logprobs.argmax(-1).tolist() == tokens, (out.prompt, seq.text)
        for tok, pos_lps, ref in zip(tokens, seq.logprobs, ref_logprobs):
            assert abs(pos_lps[tok].logprob - ref[tok].item()) < ENGINE_LOGPROB_TOL
        assert tokenizer.eos_token_id not in tokens[:-1]
        if tokens[-1] == tokenizer.eos_token_id:
            assert seq.finish_reason == "stop"
        else:
            assert seq.finish_reason == "length" and len(tokens) == 32
        assert seq.text == tokenizer.decode(seq.token_ids, skip_special_tokens=True)
