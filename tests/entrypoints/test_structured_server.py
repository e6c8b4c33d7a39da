"""Structured output and tool calling through a live server and the `openai` SDK.

A random 2-layer model with the SmolLM2 tokenizer: sampled requests (temperature 1) of every grammar, each
spelling of it once per (endpoint, streamed or not), all concurrent; every output must finish by its grammar
and validate. Tool calling with tool_choice required / named / auto (the hermes parser, inferred: the server
runs as the README's plain `pagellm serve`, with no tool flags), as LangChain's bind_tools and the openai SDK's
parse helpers use them.
Then the embedded SmolLM2 (slow) behind the server: a few of each grammar, streamed and not, all concurrent
(tests/structured_output holds SmolLM2 to 8 of each grammar through `LLM`; here it is the server's path that is
checked).
"""

from __future__ import annotations

import asyncio
import copy
import json

import httpx
import jsonschema
import openai
import pytest
from tests.entrypoints.server_utils import RemoteServer
from tests.structured_output.cases import CHOICES, REGEX, SCHEMAS, check_choice, check_json, check_regex

N = 24  # json_object requests on the random model
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
    """No tool flags: SmolLM2's template ignores tools, so the server writes them in the Hermes format and
    reads the calls with the hermes parser, auto tool choice on."""
    args = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", str(64 * 2**20)]
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


_MODELS: dict[str, str] = {}


async def _model_of(client) -> str:
    """The served model's name, asked once per server (call it before starting concurrent requests): hundreds of
    concurrent requests that each asked first failed now and then on a busy machine with a connection error."""
    key = str(client.base_url)
    if key not in _MODELS:
        _MODELS[key] = (await client.models.list()).data[0].id
    return _MODELS[key]


async def _one(client, endpoint: str, kwargs: dict, stream: bool, seed: int,
               max_tokens: int = 200) -> tuple[str, str, object]:
    """(text, finish_reason, stop_reason) of one request."""
    common = dict(model=await _model_of(client), temperature=1.0, seed=seed, max_tokens=max_tokens)
    if endpoint == "chat":
        if stream:
            text, finish, why = "", None, None
            async for chunk in await client.chat.completions.create(messages=MSG, stream=True, **common, **kwargs):
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    finish, why = (ch.finish_reason, getattr(ch, "stop_reason", None)) if ch.finish_reason \
                        else (finish, why)
            return text, finish, why
        out = await client.chat.completions.create(messages=MSG, **common, **kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason, getattr(out.choices[0], "stop_reason")
    kwargs = _completion_kwargs(kwargs)
    if stream:
        text, finish, why = "", None, None
        async for chunk in await client.completions.create(prompt="JSON:", stream=True, **common, **kwargs):
            for ch in chunk.choices:
                text += ch.text
                finish, why = (ch.finish_reason, getattr(ch, "stop_reason", None)) if ch.finish_reason \
                    else (finish, why)
        return text, finish, why
    out = await client.completions.create(prompt="JSON:", **common, **kwargs)
    return out.choices[0].text, out.choices[0].finish_reason, getattr(out.choices[0], "stop_reason")


def test_many_requests_every_grammar_streamed_and_not(server):
    """4 of each spelling of each grammar at once: each (endpoint, streamed or not) pair once."""
    async def run():
        client = server.async_client()
        await _model_of(client)  # once, before the concurrent requests
        jobs, checks = [], []
        for name, kwargs, check in _extra("all"):
            for i in range(4):
                endpoint = "chat" if i % 4 < 2 else "completions"
                jobs.append(_one(client, endpoint, kwargs, stream=i % 2 == 1, seed=i))
                checks.append((name, endpoint, i % 2 == 1, check))
        return checks, await asyncio.gather(*jobs)

    checks, results = asyncio.run(run())
    for (name, endpoint, stream, check), (text, finish, _) in zip(checks, results):
        assert finish == "stop", (name, endpoint, stream, text, finish)
        check(text)


def test_json_schema_closes_at_a_small_max_tokens(server):
    """A JSON schema's strings, numbers and arrays may run on: near max_tokens the engine closes the JSON the
    schema's way (its required keys, its enums), so every output validates, streamed and not, on both endpoints,
    with finish_reason "stop" (stop_reason "json_closed" where the engine closed it)."""
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
        "level": {"enum": ["low", "high"]}, "score": {"type": "number"}},
        "required": ["name", "tags", "level", "score"], "additionalProperties": False}
    kwargs = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}

    async def run():
        client = server.async_client()
        await _model_of(client)
        return await asyncio.gather(*[_one(client, "chat" if i % 4 < 2 else "completions", kwargs,
                                           stream=i % 2 == 1, seed=i, max_tokens=40) for i in range(16)])

    results = asyncio.run(run())
    for text, finish, why in results:
        assert finish == "stop" and why in (None, "json_closed"), (text, finish, why)
        check_json(text, schema)
    assert "json_closed" in {why for _, _, why in results}


def test_openai_sdk_parse_helper_takes_a_closed_answer(server):
    """client.chat.completions.parse refuses finish_reason "length" (LengthFinishReasonError): an answer the
    engine closed finishes "stop", so the helper parses it even at a budget far too small for the model."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        landmarks: list[str]

    client = server.client()
    for seed in range(3):
        out = client.chat.completions.parse(model=client.models.list().data[0].id, messages=MSG,
                                            response_format=City, max_tokens=30, temperature=1.0, seed=seed)
        assert isinstance(out.choices[0].message.parsed, City), out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"


def test_json_object_on_a_random_model_always_parses(server):
    """json_object has no bounds, and a random model rarely closes its object by itself: near max_tokens the
    engine closes it (finish_reason "stop", stop_reason "json_closed", so that clients take the answer). Every
    output of 24, streamed and not, on both endpoints parses."""
    kwargs = {"response_format": {"type": "json_object"}}

    async def run():
        client = server.async_client()
        model = await _model_of(client)
        jobs = []
        for i in range(N):
            endpoint = "chat" if i % 4 < 2 else "completions"
            jobs.append(_one(client, endpoint, kwargs, stream=i % 2 == 1, seed=i))
        # and with a budget too small for much more than the closing
        jobs.append(client.chat.completions.create(model=model, messages=MSG, max_tokens=8, seed=1, **kwargs))
        return await asyncio.gather(*jobs)

    *results, short = asyncio.run(run())
    for text, finish, why in results:
        assert finish == "stop", (text, finish)
        check_json(text, None)
    assert {why for _, _, why in results} == {None, "json_closed"}  # some closed by themselves, some were closed
    check_json(short.choices[0].message.content, None)
    assert short.choices[0].finish_reason == "stop" and short.choices[0].stop_reason == "json_closed"
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


OPEN_TOOL = {"type": "function", "function": {
    "name": "make_note", "description": "Save a note",
    "parameters": {"type": "object", "required": ["title", "tags"], "properties": {
        "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object", "properties": {"n": {"type": "integer"}}}}}}}


def test_required_tool_call_always_parses_at_a_small_max_tokens(server):
    """A tool whose schema is open (unbounded strings and arrays, no additionalProperties): the arguments are
    held to the declared properties (strict, as OpenAI's), and closed near max_tokens, so the call always
    parses: finish_reason "tool_calls", streamed and not."""
    schema = copy.deepcopy(OPEN_TOOL["function"]["parameters"])
    schema["additionalProperties"] = schema["properties"]["meta"]["additionalProperties"] = False

    async def run():
        client = server.async_client()
        model = (await client.models.list()).data[0].id
        common = dict(model=model, messages=MSG, tools=[OPEN_TOOL], tool_choice="required", temperature=1.0,
                      max_tokens=40)  # the shortest call takes 26 tokens
        jobs = [client.chat.completions.create(seed=i, **common) for i in range(8)]
        jobs += [_areassemble(await client.chat.completions.create(seed=i, stream=True, **common))
                 for i in range(4)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for out in results[:8]:
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.stop_reason in (None, "json_closed")
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schema)
    for calls, content, finish in results[8:]:
        assert finish == "tool_calls" and calls and content == ""
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), schema)


def test_what_langchain_sends(server):
    """LangChain's bind_tools sends tools with no tool_choice (auto) and reads tool_calls; its
    with_structured_output(method="json_mode") sends response_format json_object and parses the content. Both
    against the plain server, through the openai SDK as LangChain does (and through langchain_openai itself when
    it is installed)."""
    client = server.client()
    model = client.models.list().data[0].id
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius", "days": 2}}'
            '\n</tool_call>')
    out = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, max_tokens=80,
                                         extra_body={"guided_choice": [call]})
    assert out.choices[0].finish_reason == "tool_calls"
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Tokyo", "unit": "celsius", "days": 2}
    out = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, max_tokens=5)  # free text
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for seed in range(4):
        out = client.chat.completions.create(model=model, messages=MSG, max_tokens=12, temperature=1.0, seed=seed,
                                             response_format={"type": "json_object"})
        assert isinstance(json.loads(out.choices[0].message.content), dict)
        assert out.choices[0].finish_reason == "stop"
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:
        return
    chat = ChatOpenAI(model=model, base_url=server.url("/v1"), api_key="unused", max_tokens=80,
                      extra_body={"guided_choice": [call]})
    msg = chat.bind_tools([TOOLS[0]]).invoke("What is the weather in Tokyo?")
    assert msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"]["city"] == "Tokyo"
    json_mode = ChatOpenAI(model=model, base_url=server.url("/v1"), api_key="unused", max_tokens=12)
    assert isinstance(json_mode.with_structured_output(None, method="json_mode").invoke("JSON please"), dict)


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
