"""`pagellm serve --speculative-config '{...}'` (issue 14), n-gram and draft model: the same greedy text as an
engine without speculation, streamed and not, and the speculative-decoding counters on /metrics."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.entrypoints.server_utils import RemoteServer, read_metrics

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
PROMPTS = ["one two three four five one two three four five one two three four five one two",
           "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(",
           "The quick brown fox jumps over the lazy dog."]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm_gguf) -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer, its weights widened so that greedy choices are not
    near-ties (a verify step computes several positions at once: its float sums may differ in the last bit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagellm.model_executor.loader.source import load_tokenizer, resolve_model_source

    folder = tmp_path_factory.mktemp("tiny-spec-served")
    tok = load_tokenizer(resolve_model_source(smollm_gguf))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                         rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    hf.save_pretrained(folder, safe_serialization=True)
    return os.fspath(folder)


@pytest.fixture(scope="module")
def expected(model) -> list[str]:
    llm = LLM(model, dtype="float32", max_model_len=512, kv_cache_memory=16 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def spec(request, model) -> dict:
    """n-gram lookup, or a draft model (the target itself: it drafts what the target says)."""
    return SPEC if request.param == "ngram" else {"model": model, "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def server(model, spec):
    args = [model, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", str(16 * 2**20),
            "--speculative-config", json.dumps(spec)]
    with RemoteServer(args) as srv:
        yield srv


def _body(server: RemoteServer, prompt: str, **extra) -> dict:
    return {"model": server.client().models.list().data[0].id, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, **extra}


def test_greedy_text_identical_with_speculation(server, spec, expected):
    for prompt, want in zip(PROMPTS, expected):
        r = httpx.post(server.url("/v1/completions"), json=_body(server, prompt), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    metrics = read_metrics(server)
    drafts = metrics.get("pagellm:spec_decode_num_drafts_total", 0)
    assert drafts > 0 and metrics["pagellm:spec_decode_num_draft_tokens_total"] >= drafts
    accepted = metrics.get("pagellm:spec_decode_num_accepted_tokens_total", 0)
    assert 0 < accepted <= metrics["pagellm:spec_decode_num_draft_tokens_total"]
    per_pos = [metrics.get(f"pagellm:spec_decode_num_accepted_tokens_per_pos_total{{position={p}}}", 0)
               for p in range(spec["num_speculative_tokens"])]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)  # position p needs p - 1 before


def test_streamed_text_identical_with_speculation(server, expected):
    for prompt, want in zip(PROMPTS, expected):
        text = ""
        with httpx.stream("POST", server.url("/v1/completions"), json=_body(server, prompt, stream=True),
                          timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    text += "".join(c["text"] for c in chunk["choices"])
        assert text == want


def test_stop_string_inside_accepted_tokens(model, expected):
    """Stop strings late in outputs that speculation produces: the text, token ids and reasons are those
    without speculation (a stop string completed mid-step is pinned down in tests/engine/test_detokenizer.py)."""
    base = LLM(model, dtype="float32", max_model_len=512, kv_cache_memory=16 * 2**20)
    spec = LLM(model, dtype="float32", max_model_len=512, kv_cache_memory=16 * 2**20, speculative_config=SPEC)
    params = []
    for text in expected:
        start = next(i for i in range(len(text) // 2, len(text) - 3) if text.find(text[i : i + 3]) == i)
        params.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                     stop=[text[start : start + 3]]))
    want = [o.outputs[0] for o in base.generate(PROMPTS, params, use_tqdm=False)]
    got = [o.outputs[0] for o in spec.generate(PROMPTS, params, use_tqdm=False)]
    assert [(g.text, list(g.token_ids), g.finish_reason, g.stop_reason) for g in got] == \
        [(w.text, list(w.token_ids), w.finish_reason, w.stop_reason) for w in want]
    assert all(w.finish_reason == "stop" for w in want)
    assert spec.llm_engine.core.scheduler.spec_num_accepted_tokens > 0


def test_grammar_and_penalty_requests_beside_speculating_ones(model):
    """Requests that are not speculated (a regex grammar, a repetition penalty, logprobs) run in the same steps
    as requests that verify drafts, and every output equals the one without speculation."""
    from pagellm.sampling_params import StructuredOutputsParams

    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    params = [greedy, greedy,
              SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(
                  regex=r"[a-z]{3,8}( [a-z]{3,8}){2}")),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)]
    prompts = [PROMPTS[0], PROMPTS[1], "Three words:", PROMPTS[0], PROMPTS[1]]
    base = LLM(model, dtype="float32", max_model_len=512, kv_cache_memory=16 * 2**20)
    spec = LLM(model, dtype="float32", max_model_len=512, kv_cache_memory=16 * 2**20, speculative_config=SPEC)
    want = [o.outputs[0] for o in base.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0] for o in spec.generate(prompts, params, use_tqdm=False)]
    assert [(g.text, list(g.token_ids)) for g in got] == [(w.text, list(w.token_ids)) for w in want]
    assert spec.llm_engine.core.scheduler.spec_num_accepted_tokens > 0
    assert len(got[4].logprobs) == MAX_TOKENS
