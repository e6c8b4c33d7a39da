"""No 500 from any request body, and the protocol details of issue 13 (items 3 and 5), on a live server.

One server for the module: a random 2-layer Llama with the SmolLM2 tokenizer (so text prompts reach the
tokenizer), --max-model-len 128. Each finding of the issue failed before its fix: lone surrogates reached the
tokenizer (500), integers of 2**64 overflowed in the engine (500), a guided_json string nested 5,000 deep hit a
RecursionError (500), 405s had no Allow header, /detokenize took [false] for token 0, and /openapi.json did
not say what the server requires.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from tests.entrypoints.server_utils import RemoteServer

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagellm.sampling_params import MAX_JSON_DEPTH

HUGE = 2**64
# What must never reach a client: Python's own words for its exceptions.
LEAKS = re.compile(r"Traceback|Error\b|Exception\b|<class|__init__|validation errors? for|\bNone\b")


@pytest.fixture(scope="module")
def server(tiny_so_model):
    args = [tiny_so_model, "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", str(16 * 2**20)]
    with RemoteServer(args) as srv:
        yield srv


def post(server: RemoteServer, path: str, body: object) -> httpx.Response:
    """POST a body given as a dict (sent as JSON, surrogates escaped as JSON does) or as raw bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url(path), content=content, headers={"Content-Type": "application/json"}, timeout=60)


def assert_400(r: httpx.Response, param: str | None, *words: str) -> dict:
    """A 400 in OpenAI's envelope, naming `param`, its message in words a user reads (and saying `words`)."""
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if param is not None:
        assert err["message"].startswith(param), err
    assert not LEAKS.search(err["message"]), err
    for word in words:
        assert word in err["message"], err
    return err


# ---- strings that are not valid Unicode (a lone surrogate) ----


def test_surrogate_in_completion_prompt(server):
    assert_400(post(server, "/v1/completions", {"prompt": "\ud800", "max_tokens": 2}), "prompt", "Unicode")
    assert_400(post(server, "/v1/completions", {"prompt": ["ok", "a\udfff"], "max_tokens": 2}), "prompt", "Unicode")


def test_surrogate_in_chat_message(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2})
    err = assert_400(r, "messages", "Unicode")
    assert err["message"].startswith("messages.0.content")
    r = post(server, "/v1/chat/completions",
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}], "max_tokens": 2})
    assert_400(r, "messages", "Unicode")


def test_surrogate_in_tokenize(server):
    assert_400(post(server, "/tokenize", {"prompt": "\ud800"}), "prompt", "Unicode")
    assert_400(post(server, "/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}), "messages", "Unicode")


@pytest.mark.parametrize("field,value", [
    ("stop", ["\ud800"]),
    ("guided_regex", "a\ud800"),
    ("guided_choice", ["a", "\ud800"]),
    ("user", "\ud800"),
    ("logit_bias", {"\ud800": 1}),
])
def test_surrogate_in_any_field(server, field, value):
    assert_400(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value}), field, "Unicode")


# ---- integers outside their ranges ----


@pytest.mark.parametrize("field,value", [
    ("stop_token_ids", [HUGE]),
    ("top_k", HUGE),
    ("min_tokens", HUGE),
    ("max_tokens", HUGE),
    ("seed", HUGE),
    ("n", HUGE),
    ("logprobs", HUGE),
    ("priority", HUGE),
    ("priority", -HUGE),
    ("logit_bias", {str(HUGE): 1}),
])
def test_integers_of_2_64_are_400(server, field, value):
    r = post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, field: value})
    assert_400(r, field)


def test_huge_token_ids_in_prompts_are_400(server):
    r = post(server, "/v1/completions", {"prompt": [HUGE], "max_tokens": 2})
    assert_400(r, "prompt_token_ids")
    assert_400(post(server, "/detokenize", {"tokens": [HUGE]}), "tokens")


# ---- nesting ----


def test_guided_json_string_nested_5000_deep(server):
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    r = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "guided_json": deep})
    assert_400(r, "guided_json", "nested deeper", str(MAX_JSON_DEPTH))
    r = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "guided_json": "[" * 5000 + "]" * 5000})
    assert_400(r, "guided_json", "nested deeper")
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                              "structured_outputs": {"json": "[" * 5000 + "]" * 5000}})
    assert_400(r, "structured_outputs", "nested deeper")


def _nested(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth):
        value = {"type": "array", "items": value}
    return value


@pytest.mark.parametrize("field,value", [
    ("guided_json", _nested(200)),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(200)}}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": _nested(200)}}]),
    ("structured_outputs", {"json": _nested(200)}),
])
def test_free_form_fields_are_depth_checked(server, field, value):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, field: value}
    assert_400(post(server, "/v1/chat/completions", body), field, "nested deeper")


def test_tool_call_arguments_nested_5000_deep(server):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    body = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "1"}], "max_tokens": 2}
    assert_400(post(server, "/v1/chat/completions", body), "messages", "nested deeper")


def test_a_body_nested_deeper_than_the_parser_goes(server):
    r = post(server, "/v1/completions", b'{"prompt": "x", "guided_json": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert_400(r, None)


# ---- strict integers and booleans ----


def test_detokenize_refuses_booleans_as_token_ids(server):
    assert_400(post(server, "/detokenize", {"tokens": [False]}), "tokens", "integer")
    assert_400(post(server, "/detokenize", {"tokens": ["1"]}), "tokens", "integer")
    r = post(server, "/detokenize", {"tokens": [1.0, 2]})  # JSON's integer: a number without a fraction
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value,word", [
    ("max_tokens", True, "integer"),
    ("n", "2", "integer"),
    ("top_k", 2.5, "integer"),
    ("ignore_eos", 1, "boolean"),
    ("stream", "false", "boolean"),
    ("temperature", "0.5", "number"),
    ("temperature", True, "number"),
])
def test_strict_types(server, field, value, word):
    assert_400(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value}), field, word)


def test_strict_types_in_the_models():
    for kwargs in (dict(ignore_eos=1), dict(n=True), dict(stop_token_ids=[True]), dict(prompt=[False])):
        with pytest.raises(ValueError):
            CompletionRequest(**{"prompt": "x", **kwargs})
    assert CompletionRequest(prompt=[1.0, 2], n=2.0).prompt == [1, 2]


def test_every_budget_field_is_checked(server):
    """max_completion_tokens wins over max_tokens, and with echo the larger of logprobs and prompt_logprobs is
    used: the other one is still checked against its range."""
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0, "max_completion_tokens": 1}
    assert_400(post(server, "/v1/chat/completions", chat), "max_tokens")
    body = {"prompt": "x", "max_tokens": 1, "echo": True, "logprobs": 1, "prompt_logprobs": -5}
    assert_400(post(server, "/v1/completions", body), "prompt_logprobs")


# ---- responses are JSON whatever the sampler ruled out ----


def _floats(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [f for item in value for f in _floats(item)]
    return []


def test_logprobs_of_ruled_out_tokens_are_finite(server):
    """Under a grammar the tokens it rules out have logprob -inf, which JSON cannot carry: the response
    failed to render and came back as a 400 with Python's words. They are reported at -9999 (as vLLM does)."""
    body = {"prompt": "0", "max_tokens": 3, "logprobs": 3, "guided_choice": ["0"]}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text[:300]
    logprobs = r.json()["choices"][0]["logprobs"]
    values = _floats(logprobs["token_logprobs"]) + _floats(logprobs["top_logprobs"])
    assert -9999.0 in values and all(v >= -9999.0 for v in values), values
    chat = {"messages": [{"role": "user", "content": "0"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 3,
            "guided_choice": ["0"], "stream": True}
    r = post(server, "/v1/chat/completions", chat)
    assert r.status_code == 200 and "data: [DONE]" in r.text and "-9999.0" in r.text, r.text[:300]
    assert "Infinity" not in r.text and '"error"' not in r.text, r.text[:300]


def test_tool_parsers_refuse_deep_model_output():
    """A model may write brackets deeper than json.loads recurses: no tool call, not a RecursionError."""
    from pagellm.entrypoints.openai.tool_parsers import HermesToolParser, Llama3JsonToolParser, parse_required

    deep = "[" * 5000 + "]" * 5000
    assert HermesToolParser().extract(f'<tool_call>{{"name": "f", "arguments": {deep}}}</tool_call>')[1] == []
    assert Llama3JsonToolParser().extract(f'{{"name": "f", "parameters": {deep}}}')[1] == []
    with pytest.raises(ValueError):
        parse_required(deep)


# ---- every 400 names its field, in words ----


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b'"just a string"', None),
    ({"max_tokens": 2}, "prompt"),
    ({"prompt": "", "max_tokens": 2}, "prompt"),
    ({"prompt": [], "max_tokens": 2}, "prompt"),
    ({"prompt": [[]], "max_tokens": 2}, "prompt"),
    ({"prompt": "x", "structured_outputs": {"jsn": {}}}, "structured_outputs"),
    ({"prompt": "x", "guided_json": "{"}, "guided_json"),
    ({"prompt": "x", "logit_bias": {" 1": 1}}, "logit_bias"),
    ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
])
def test_completion_400s_name_their_field(server, body, param):
    assert_400(post(server, "/v1/completions", body), param)


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "wizard", "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "assistant", "tool_calls": [{"function": {}}]}],
    [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}],
])
def test_chat_400s_name_their_field(server, messages):
    assert_400(post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}), "messages")


# ---- 405 with Allow ----


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/v1/completions", "POST"),
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/tokenize", "POST"),
    ("POST", "/health", "GET"),
    ("TRACE", "/v1/models", "GET"),
])
def test_405_says_what_is_allowed(server, method, path, allowed):
    r = httpx.request(method, server.url(path), timeout=30)
    assert r.status_code == 405, r.status_code
    assert allowed in [m.strip() for m in r.headers["allow"].split(",")], r.headers
    assert "error" in r.json()


# ---- /openapi.json tells what the server requires, and what it answers ----


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(server.url("/openapi.json"), timeout=30).json()


def _field(openapi: dict, model: str, name: str) -> dict:
    return openapi["components"]["schemas"][model]["properties"][name]


def _branches(schema: dict) -> list[dict]:
    return schema.get("anyOf", [schema])


def test_openapi_says_messages_and_prompts_are_non_empty(openapi):
    assert _field(openapi, "ChatCompletionRequest", "messages")["minItems"] == 1
    branches = _branches(_field(openapi, "CompletionRequest", "prompt"))
    strings = [b for b in branches if b.get("type") == "string"]
    lists = [b for b in branches if b.get("type") == "array"]
    assert strings and all(b["minLength"] == 1 for b in strings)
    assert len(lists) == 3 and all(b["minItems"] == 1 for b in lists)


def test_openapi_publishes_ranges(openapi):
    top_k = [b for b in _branches(_field(openapi, "CompletionRequest", "top_k")) if b.get("type") == "integer"][0]
    assert top_k["minimum"] == -1 and top_k["maximum"] == 2**31 - 1
    n = _field(openapi, "ChatCompletionRequest", "n")
    assert n["minimum"] == 1 and n["maximum"] == 128
    ids = [b for b in _branches(_field(openapi, "CompletionRequest", "stop_token_ids")) if b.get("type") == "array"]
    assert ids[0]["items"]["maximum"] == 2**31 - 1


def test_openapi_documents_health_ping_and_metrics(openapi, server):
    for path in ("/health", "/ping"):
        responses = openapi["paths"][path]["get"]["responses"]
        assert "content" not in responses["200"], responses  # an empty body
        assert responses["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        r = httpx.get(server.url(path), timeout=30)
        assert r.status_code == 200 and r.content == b""
    metrics = openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    r = httpx.get(server.url("/metrics"), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_openapi_lists_no_422(openapi):
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_the_models_and_the_published_schema_agree():
    """The schema the server publishes is its models' schema (one source)."""
    assert ChatCompletionRequest.model_json_schema()["properties"]["messages"]["minItems"] == 1


# ---- and through it all the server kept serving ----


def test_still_serving(server):
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url("/health"), timeout=30).status_code == 200
