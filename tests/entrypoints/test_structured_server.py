"""Structured output and tool calling through a live server and the `openai` SDK.

A random 2-layer model with the SmolLM2 tokenizer: 50 sampled requests (temperature 1) per grammar, half of
them streamed, all concurrent; every output must finish by its grammar and validate. Tool calling with
tool_choice required / named / auto (hermes parser). Then the embedded SmolLM2 (slow) behind the server: a few
of each grammar, streamed and not, all concurrent (tests/structured_output holds SmolLM2 to 50 of each grammar
through `LLM`; here it is the server's path that is checked).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from tests.entrypoints.server_utils import SMOLLM_ARGS, RemoteServer
from tests.structured_output.cases import CHOICES, REGEX, SCHEMAS, check_choice, check_json, check_regex

N = 50
N_SMOLLM = 4  # requests of each grammar on SmolLM2 behind the server: two streamed, two not
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 16}},
                       "required": ["query"], "additionalProperties": False}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_so_model):
    args = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", str(64 * 2**20),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with RemoteServer([tiny_so_model, *args]) as srv:
        yield srv


def _extra(kind: str):
    """(request kwargs, check) of each grammar, through every spelling the API accepts."""
    cases = []
    for name, schema in SCHEMAS.items():
        cases.append((f"response_format-{name}", {"response_format": {
            "type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}},
            lambda t, s=schema: check_json(t, s)))
    cases.append(("structured_outputs-regex", {"extra_body": {"structured_outputs": {"regex": REGEX}}},
                  check_regex))
    cases.append(("guided_choice", {"extra_body": {"guided_choice": CHOICES}}, check_choice))
    cases.append(("guided_json", {"extra_body": {"guided_json": SCHEMAS["person"]}},
                  lambda t: check_json(t, SCHEMAS["person"])))
    return cases


def _completion_kwargs(kwargs: dict) -> dict:
    """The SDK's completions.create has no response_format argument: send it in the body."""
    if "response_format" in kwargs:
        return {"extra_body": {"response_format": kwargs["response_format"]}}
    return kwargs


async def _one(client, endpoint: str, kwargs: dict, stream: bool, seed: int) -> tuple[str, str]:
    common = dict(model=(await client.models.list()).data[0].id, temperature=1.0, seed=seed, max_tokens=200)
    if endpoint == "chat":
        if stream:
            text, finish = "", None
            async for chunk in await client.chat.completions.create(messages=MSG, stream=True, **common, **kwargs):
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    finish = ch.finish_reason or finish
            return text, finish
        out = await client.chat.completions.create(messages=MSG, **common, **kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason
    kwargs = _completion_kwargs(kwargs)
    if stream:
        text, finish = "", None
        async for chunk in await client.completions.create(prompt="JSON:", stream=True, **common, **kwargs):
            for ch in chunk.choices:
                text += ch.text
                finish = ch.finish_reason or finish
        return text, finish
    out = await client.completions.create(prompt="JSON:", **common, **kwargs)
    return out.choices[0].text, out.choices[0].finish_reason


def test_many_requests_every_grammar_streamed_and_not(server):
    async def run():
        client = server.async_client()
        jobs, checks = [], []
        for name, kwargs, check in _extra("all"):
            for i in range(N):
                endpoint = "chat" if i % 4 < 2 else "completions"
                jobs.append(_one(client, endpoint, kwargs, stream=i % 2 == 1, seed=i))
                checks.append((name, endpoint, i % 2 == 1, check))
        return checks, await asyncio.gather(*jobs)

    checks, results = asyncio.run(run())
    for (name, endpoint, stream, check), (text, finish) in zip(checks, results):
        assert finish == "stop", (name, endpoint, stream, text, finish)
        check(text)


def test_json_object_on_a_random_model_always_parses(server):
    """json_object has no bounds, and a random model rarely closes its object by itself: near max_tokens the
    engine closes it (finish_reason "length"). Every output of 50, streamed and not, on both endpoints parses."""
    kwargs = {"response_format": {"type": "json_object"}}

    async def run():
        client = server.async_client()
        model = (await client.models.list()).data[0].id
        jobs = []
        for i in range(N):
            endpoint = "chat" if i % 4 < 2 else "completions"
            jobs.append(_one(client, endpoint, kwargs, stream=i % 2 == 1, seed=i))
        # and with a budget too small for much more than the closing
        jobs.append(client.chat.completions.create(model=model, messages=MSG, max_tokens=8, seed=1, **kwargs))
        return await asyncio.gather(*jobs)

    *results, short = asyncio.run(run())
    for text, finish in results:
        assert finish in ("stop", "length"), (text, finish)
        check_json(text, None)
    assert {finish for _, finish in results} == {"stop", "length"}  # some closed by themselves, some were closed
    check_json(short.choices[0].message.content, None)
    assert short.usage.completion_tokens <= 8


def test_bad_grammars_are_400(server):
    client = server.client()
    model = client.models.list().data[0].id
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format"),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: nothing_defined"}}}, "structured_outputs"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=MSG, max_tokens=5, **kwargs)
        assert e.value.body["param"] == param, e.value.body
        assert e.value.body["message"].startswith(param)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="x", max_tokens=5, **_completion_kwargs(kwargs))
    # Tools errors.
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=model, messages=MSG, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert client.completions.create(model=model, prompt="x", max_tokens=2).usage.completion_tokens == 2


def _reassemble(stream) -> tuple[list[dict], str, str]:
    calls: dict[int, dict] = {}
    content, finish = "", None
    first_fields = {}
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                if tc.index not in calls:
                    # The first delta of a call carries id, type and the function's name.
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                    first_fields[tc.index] = True
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    return [calls[i] for i in sorted(calls)], content, finish


def _check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


async def _areassemble(stream) -> tuple[list[dict], str, str]:
    chunks = [chunk async for chunk in stream]
    return _reassemble(chunks)


def test_tool_choice_required_and_named(server):
    """20 requests of each, streamed and not, concurrently: the arguments always parse and match the schema;
    a streamed call reassembles into the call the same seed gives unstreamed."""
    named = {"type": "function", "function": {"name": "get_weather"}}

    async def run():
        client = server.async_client()
        model = (await client.models.list()).data[0].id
        common = dict(model=model, messages=MSG, tools=TOOLS, temperature=1.0, max_tokens=300)
        jobs = []
        for i in range(10):
            for choice in ("required", named):
                jobs.append(client.chat.completions.create(tool_choice=choice, seed=i, **common))
                jobs.append(_areassemble(await client.chat.completions.create(
                    tool_choice=choice, seed=i, stream=True, **common)))
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for k in range(0, len(results), 2):
        out, (calls, content, finish) = results[k], results[k + 1]
        is_named = (k // 2) % 2 == 1
        choice = out.choices[0]
        assert choice.finish_reason == ("stop" if is_named else "tool_calls")
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
            _check_call(call.function.name, call.function.arguments)
        if is_named:
            assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        assert finish == choice.finish_reason and content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_tool_choice_auto_with_the_hermes_parser(server):
    """The model emits a Hermes tool call (forced here by a grammar, as a random model would not): the server
    returns it as tool_calls, streamed and not; plain text stays content."""
    client = server.client()
    model = client.models.list().data[0].id
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius", '
            '"days": 3}}\n</tool_call>')
    force = {"guided_choice": [text]}
    out = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, max_tokens=100,
                                         extra_body=force)
    msg = out.choices[0]
    assert msg.finish_reason == "tool_calls"
    assert msg.message.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.message.tool_calls] == [
        ("get_weather", {"city": "Lima", "unit": "celsius", "days": 3})]
    calls, content, finish = _reassemble(client.chat.completions.create(
        model=model, messages=MSG, tools=TOOLS, max_tokens=100, extra_body=force, stream=True))
    assert finish == "tool_calls" and content.strip() == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Lima", "unit": "celsius", "days": 3})]
    out = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, max_tokens=20,
                                         extra_body={"guided_choice": ["It is sunny."]})
    assert out.choices[0].message.content == "It is sunny." and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


def test_tool_messages_render_into_the_prompt(server):
    messages = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    r = httpx.post(server.url("/tokenize"), json={"messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    prompt = httpx.post(server.url("/detokenize"), json={"tokens": r.json()["tokens"]}, timeout=30).json()["prompt"]
    assert "<tool_call>" in prompt and '"city": "Paris"' in prompt
    assert "18 degrees and sunny" in prompt
    client = server.client()
    out = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, tools=TOOLS,
                                         tool_choice="none", max_tokens=3)
    assert out.choices[0].message.content is not None


@pytest.fixture(scope="module")
def smollm_server(smollm_gguf):
    """SmolLM2 without --enable-auto-tool-choice, and a KV cache that holds every request of
    test_smollm_server at once."""
    with RemoteServer(SMOLLM_ARGS + ["--kv-cache-memory", str(256 * 2**20)]) as srv:
        yield srv


@pytest.mark.slow
def test_auto_needs_the_flag(smollm_server):
    client = smollm_server.client(timeout=600)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        client.chat.completions.create(model=model, messages=MSG, tools=TOOLS)
    out = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, tool_choice="required",
                                         max_tokens=300, temperature=1.0, seed=0)
    assert out.choices[0].message.tool_calls


@pytest.mark.slow
def test_smollm_server(smollm_server):
    """The embedded SmolLM2 behind the server: N_SMOLLM requests each of json_object, the three schemas, a regex,
    a choice list and guided_json, half of them streamed, all concurrent, every output parses and validates; tool
    calls (required, and a named function streamed) too."""
    srv = smollm_server

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
