"""The OpenAI-compatible server on the embedded SmolLM2, through the official `openai` SDK.

One live server for the module (float32, --max-model-len 1024, --api-key set), started as a subprocess on a
free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest
from tests.entrypoints.server_utils import SMOLLM_ARGS, RemoteServer, read_metrics, wait_until
from tests.entrypoints.test_structured_server import MSG, N_SMOLLM, TOOLS, _areassemble, _check_call, _extra
from tests.structured_output.cases import check_json

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def server():
    """SmolLM2 with no tool flags (the README's serve command plus a key), and a KV cache that holds every
    request of test_smollm_structured_server at once."""
    with RemoteServer(SMOLLM_ARGS + ["--kv-cache-memory", str(256 * 2**20)], api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


metrics = read_metrics  # name{labels} -> value of every sample


def wait_for_metrics(server, condition, what: str) -> dict[str, float]:
    """/metrics once condition(metrics) holds (the core publishes its numbers after each change; a busy machine
    may take a while)."""
    def ready():
        m = metrics(server)
        return m if condition(m) else None
    return wait_until(ready, 60, what)


def assert_still_serving(client) -> None:
    out = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=2,
                                    temperature=0)
    assert out.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------------------------
# completions
# ---------------------------------------------------------------------------------------------------------------


def model_name(client) -> str:
    return client.models.list().data[0].id


def test_models_version_health(server, client):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].id == "SmolLM2-135M-Instruct"
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    assert httpx.get(server.url("/version"), timeout=10).json()["version"]
    spec = httpx.get(server.url("/openapi.json"), timeout=10).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert path in spec["paths"]


def test_completion_stream_equals_non_stream(client):
    model = model_name(client)
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == 5 and full.usage.total_tokens == 29
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == 5


def test_completion_token_prompts_and_batches(server, client):
    model = model_name(client)
    tokenized = httpx.post(server.url("/tokenize"), json={"prompt": PROMPT}, headers=server.headers(),
                           timeout=30).json()
    ids = tokenized["tokens"]
    assert tokenized["count"] == len(ids) == 5
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    # two prompts x n=2: choices are ordered prompt-major, greedy sequences are equal
    batch = client.completions.create(model=model, prompt=[PROMPT, "def fib(n):"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text[: len(batch.choices[0].text)]
    assert batch.choices[2].text == batch.choices[3].text
    assert batch.usage.completion_tokens == 24
    batch_ids = client.completions.create(model=model, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert len(batch_ids.choices) == 2 and batch_ids.usage.prompt_tokens == 8


def test_completion_n2_seed_reproducible(client):
    model = model_name(client)
    kw = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # sequence i samples with seed + i
    streamed = list(client.completions.create(**kw, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_completion_logprobs(client):
    model = model_name(client)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-5)  # greedy: the chosen is the best
        assert top[token] == pytest.approx(logprob)
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                              stream=True))
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    values = [v for c in streamed for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert tokens == lp.tokens
    assert values == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_completion_echo(client):
    """lm-eval-harness scores a prompt with echo=True, logprobs=1 and max_tokens 0 or 1."""
    model = model_name(client)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == 5 + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 1
    only = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == PROMPT
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:5], abs=1e-5)
    assert only.usage.completion_tokens == 0
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                              stream=True))
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text


def test_prompt_logprobs_as_vllm_returns_them(server):
    """vLLM's prompt_logprobs: in each completions choice, at the top of a chat response (its rendered prompt);
    per position (none for the first) token id -> logprob, rank and the token's text."""
    headers = server.headers()
    ids = httpx.post(server.url("/tokenize"), json={"prompt": PROMPT}, headers=headers, timeout=60).json()["tokens"]
    r = httpx.post(server.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2},
                   headers=headers, timeout=600)
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        assert 2 <= len(plp[pos]) <= 3
        entry = plp[pos][str(ids[pos])]
        text = httpx.post(server.url("/detokenize"), json={"tokens": [ids[pos]]}, headers=headers,
                          timeout=60).json()["prompt"]
        assert entry["decoded_token"] == text and entry["rank"] >= 1 and entry["logprob"] <= 0
    chat = httpx.post(server.url("/v1/chat/completions"), json={"messages": CHAT, "max_tokens": 1,
                                                                 "prompt_logprobs": 0}, headers=headers, timeout=600)
    body = chat.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None
    assert all(len(p) == 1 for p in body["prompt_logprobs"][1:])
    plain = httpx.post(server.url("/v1/chat/completions"), json={"messages": CHAT, "max_tokens": 1},
                       headers=headers, timeout=600).json()
    assert plain["prompt_logprobs"] is None


def test_completion_stop(client):
    model = model_name(client)
    free = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert "." in free
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=["."])
    assert out.choices[0].text == free.split(".")[0]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 8
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=["."],
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_string_stops_the_core(server, client):
    """The detokenizer finds stop strings in the API process; the core must stop generating too."""
    before = metrics(server)["pagellm:generation_tokens_total"]
    out = client.completions.create(model=model_name(client), prompt=PROMPT, max_tokens=600, temperature=0,
                                    stop=["."], extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].stop_reason == "."
    # The core publishes its freed blocks after its last output of the request: wait for them, then count.
    m = wait_for_metrics(server, lambda m: m["pagellm:kv_cache_usage_perc"] == 0, "the core to stop the request")
    assert m["pagellm:generation_tokens_total"] - before < 10  # not 600


# ---------------------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------------------


def test_chat(server, client):
    model = model_name(client)
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    tokenized = httpx.post(server.url("/tokenize"), json={"messages": CHAT}, headers=server.headers(),
                           timeout=30).json()
    assert tokenized["count"] == out.usage.prompt_tokens

    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens

    parts = client.chat.completions.create(
        model=model, max_completion_tokens=12, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])
    assert parts.choices[0].message.content == choice.message.content


def test_chat_n_logprobs_stop_seed(client):
    model = model_name(client)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, n=2,
                                         logprobs=True, top_logprobs=2)
    assert len(out.choices) == 2 and out.choices[0].message.content == out.choices[1].message.content
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens // 2
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
    kw = dict(model=model, messages=CHAT, max_tokens=10, temperature=1.0, seed=7)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    word = full.choices[0].message.content.split()[1]
    stopped = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in stopped.choices[0].message.content


# ---------------------------------------------------------------------------------------------------------------
# errors: the SDK's exception class for each, and the server keeps serving
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(temperature=-1), "temperature", ["temperature"]),
    (dict(n=1_000_000), "n", ["n must be"]),
    (dict(logprobs=10_000), "logprobs", ["logprobs"]),
    (dict(stop=[f"s{i}" for i in range(5000)]), "stop", ["stop"]),
    (dict(max_tokens=5000), "max_tokens", ["max_tokens", "5000", "1024"]),
    (dict(max_tokens="many"), "max_tokens", ["max_tokens"]),
    (dict(top_p=0), "top_p", ["top_p"]),
    (dict(logit_bias={"x": 1}), "logit_bias", ["logit_bias"]),
    (dict(prompt=[0] * 1100), "prompt", ["1100", "1024"]),
    (dict(prompt=[10**9]), "prompt_token_ids", ["prompt_token_ids"]),
    (dict(prompt=""), "prompt", ["prompt"]),
    (dict(prompt=[]), "prompt", ["prompt"]),
])
def test_completion_bad_request(client, kwargs, param, words):
    request = dict(model=model_name(client), prompt=PROMPT, max_tokens=4)
    request.update(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    err = info.value.body
    assert info.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
    assert_still_serving(client)


def test_chat_bad_request(client):
    model = model_name(client)
    bad = [
        dict(messages=[]),
        dict(messages=[{"role": "wizard", "content": "hi"}]),
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        dict(messages=CHAT, max_tokens=100_000),
        dict(messages=CHAT, top_logprobs=50, logprobs=True),
        dict(messages=[{"role": "user", "content": "hi " * 50_000}]),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, **kwargs)
    assert_still_serving(client)


def test_unknown_model_and_route(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    r = httpx.get(server.url("/v1/nothing-here"), headers=server.headers(), timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert_still_serving(client)


def test_api_key(server, client):
    bad = openai.OpenAI(base_url=server.url("/v1"), api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model_name(client), prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model_name(client), messages=CHAT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "//v1/models"),
                         ("GET", "/health/../v1/models"), ("GET", "/%761/models"), ("GET", "/v1/models/")):
        r = httpx.request(method, server.url(path), json={}, timeout=10)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(server.url(path), timeout=30).status_code == 200, path
    assert_still_serving(client)


def test_hostile_bodies(server, client):
    url = server.url("/v1/completions")
    headers = {**server.headers(), "Content-Type": "application/json"}
    cases = [
        b"{not json",
        b'{"prompt": "\xff\xfe\xfa", "max_tokens": 2}',  # invalid UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        b'{"prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}",
        b'"just a string"',
        json.dumps({"prompt": PROMPT, "max_tokens": 2, "n": 10**30}).encode(),
        json.dumps({"prompt": PROMPT, "max_tokens": 2, "stop": ["x" * 100_000]}).encode(),
        json.dumps({"prompt": [PROMPT] * 5000, "max_tokens": 2}).encode(),
    ]
    for body in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=60)
        assert r.status_code == 400, (body[:40], r.status_code, r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"
    big = b'{"prompt": "' + b"a" * (10 * 2**20) + b'"}'
    r = httpx.post(url, content=big, headers=headers, timeout=60)
    assert r.status_code == 413
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model_name(client), prompt="a" * (10 * 2**20), max_tokens=2)
    assert info.value.status_code == 413

    async def chunked() -> int:  # no Content-Length: the cap counts the bytes as they come
        async def body():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"a" * 2**20
            yield b'"}'
        async with httpx.AsyncClient(timeout=60) as c:
            return (await c.post(url, content=body(), headers=headers)).status_code

    assert asyncio.run(chunked()) == 413
    assert_still_serving(client)


# ---------------------------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------------------------


def test_tokenize_detokenize(server):
    h = server.headers()
    tok = httpx.post(server.url("/tokenize"), json={"prompt": PROMPT}, headers=h, timeout=30).json()
    assert tok["max_model_len"] == 1024 and tok["count"] == len(tok["tokens"])
    detok = httpx.post(server.url("/detokenize"), json={"tokens": tok["tokens"]}, headers=h, timeout=30).json()
    assert detok["prompt"] == PROMPT
    r = httpx.post(server.url("/detokenize"), json={"tokens": [-1]}, headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


# ---------------------------------------------------------------------------------------------------------------
# concurrency, disconnects, metrics
# ---------------------------------------------------------------------------------------------------------------


def test_concurrent_streams_and_aborts_free_blocks(server, client):
    """32 streaming clients at once: 16 run to completion and match the greedy answer computed alone; 16 ask
    for 800 tokens and disconnect after two chunks. Then no KV block stays allocated."""
    model = model_name(client)
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time", "The three primary colors are"]
    expected = {p: client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0).choices[0].text
                for p in prompts}
    before = metrics(server)

    async def run() -> tuple[list[str], int]:
        aclient = server.async_client()

        async def complete(p: str) -> str:
            stream = await aclient.completions.create(model=model, prompt=p, max_tokens=16, temperature=0,
                                                      stream=True)
            return "".join([c.choices[0].text async for c in stream])

        async def abandon(p: str) -> int:
            stream = await aclient.completions.create(model=model, prompt=p, max_tokens=800, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
            got = 0
            async for _ in stream:
                got += 1
                if got == 2:
                    break
            await stream.close()
            return got

        jobs = [complete(prompts[i % 4]) for i in range(16)] + [abandon(prompts[i % 4]) for i in range(16)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=600)
        await aclient.close()
        return results[:16], sum(results[16:])

    texts, abandoned_chunks = asyncio.run(run())
    for i, text in enumerate(texts):
        assert text == expected[prompts[i % 4]], i
    assert abandoned_chunks == 32
    # The abandoned requests would run for 800 tokens (minutes); aborted, they free their blocks at once.
    m = wait_for_metrics(server, lambda m: m["pagellm:kv_cache_usage_perc"] == 0
                         and m["pagellm:num_requests_running"] == 0, "the aborted requests to free their blocks")
    assert m["pagellm:kv_cache_usage_perc"] == 0.0
    assert m["pagellm:num_requests_running"] == 0 and m["pagellm:num_requests_waiting"] == 0
    done = sum(v for k, v in m.items() if k.startswith("pagellm:request_success_total")) - \
        sum(v for k, v in before.items() if k.startswith("pagellm:request_success_total"))
    assert done == 16  # the abandoned ones never finished
    assert_still_serving(client)


def test_metrics_move(server, client):
    before = metrics(server)
    out = client.completions.create(model=model_name(client), prompt=PROMPT * 8, max_tokens=7, temperature=0)
    after = metrics(server)
    assert after["pagellm:generation_tokens_total"] - before["pagellm:generation_tokens_total"] == 7
    assert after["pagellm:prompt_tokens_total"] - before["pagellm:prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["pagellm:request_success_total{finished_reason=length}"] - \
        before.get("pagellm:request_success_total{finished_reason=length}", 0) == 1
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):
        assert after[f"pagellm:{h}_count"] - before[f"pagellm:{h}_count"] == 1, h
    assert after["pagellm:prefix_cache_queries_total"] > before["pagellm:prefix_cache_queries_total"]
    # the same long prompt again: its full blocks come from the prefix cache
    client.completions.create(model=model_name(client), prompt=PROMPT * 8, max_tokens=2, temperature=0)
    again = metrics(server)
    assert again["pagellm:prefix_cache_hits_total"] - after["pagellm:prefix_cache_hits_total"] >= 16
    assert again["pagellm:kv_cache_usage_perc"] == 0.0
    for name in ("pagellm:num_preemptions_total", "pagellm:num_requests_waiting", "pagellm:kv_cache_num_blocks"):
        assert name in again


# ---- structured output and tools on the embedded model (tests/entrypoints/test_structured_server.py has the rest)
@pytest.mark.slow
def test_auto_tool_choice_on_the_plain_server(server):
    """SmolLM2's template ignores tools: the README's plain serve still takes tool_choice auto (the tools go
    into the system message in the Hermes format); whatever the model answers comes back as content or as
    tool calls that parse. (tool_choice "required" on this server: test_smollm_structured_server.)"""
    client = server.client(timeout=600)
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, max_tokens=60, temperature=0)
    for call in out.choices[0].message.tool_calls or []:
        json.loads(call.function.arguments)
    assert out.choices[0].message.content or out.choices[0].message.tool_calls


@pytest.mark.slow
def test_smollm_structured_server(server):
    """The embedded SmolLM2 behind the server: N_SMOLLM requests each of json_object, the three schemas, a regex,
    a choice list and guided_json, half of them streamed, all concurrent, every output parses and validates; tool
    calls (required, and a named function streamed) too: the plain server (no tool flags) takes tool_choice
    "required" and answers with tool calls."""
    srv = server

    async def run():
        client = srv.async_client(timeout=600)
        model = (await client.models.list()).data[0].id
        prompt = [{"role": "user", "content":
                   "Reply with a small JSON object about a cat, like {\"name\":\"Tom\",\"age\":3}."}]

        async def chat(stream, seed, **kw):
            kw = dict(model=model, messages=prompt, seed=seed, max_tokens=200, **kw)
            if not stream:
                out = await client.chat.completions.create(**kw)
                return out.choices[0].message.content, out.choices[0].finish_reason
            text, finish = "", None
            async for chunk in await client.chat.completions.create(stream=True, **kw):
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    finish = ch.finish_reason or finish
            return text, finish

        # json_object as in tests/structured_output (a penalty keeps SmolLM2 from looping over keys)
        cases = [("json_object", {"response_format": {"type": "json_object"}, "temperature": 0.8,
                                  "frequency_penalty": 1.0}, lambda t: check_json(t, None))]
        cases += [(name, {**kwargs, "temperature": 0.5}, check) for name, kwargs, check in _extra("all")]
        jobs, checks = [], []
        for name, kwargs, check in cases:
            for i in range(N_SMOLLM):
                jobs.append(chat(i % 2 == 1, i, **kwargs))
                checks.append((name, i % 2 == 1, check))
        common = dict(model=model, messages=MSG, tools=TOOLS, temperature=0.7, max_tokens=200)
        jobs += [client.chat.completions.create(tool_choice="required", seed=i, **common) for i in range(2)]
        jobs += [_areassemble(await client.chat.completions.create(
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=i, stream=True,
            **common)) for i in range(2)]
        return checks, await asyncio.gather(*jobs)

    checks, results = asyncio.run(run())
    for (name, stream, check), (text, finish) in zip(checks, results):
        assert finish == "stop", (name, stream, text, finish)
        check(text)
    rest = results[len(checks):]
    for out in rest[:2]:
        assert out.choices[0].finish_reason == "tool_calls"
        for call in out.choices[0].message.tool_calls:
            _check_call(call.function.name, call.function.arguments)
    for calls, _, finish in rest[2:]:
        assert [c["name"] for c in calls] == ["get_weather"]
        _check_call("get_weather", calls[0]["arguments"])
