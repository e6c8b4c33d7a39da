"""Units of structured output and tool calling that need no model: bitmask application, parameter checks,
the grammar cache, the tool-call parsers on recorded model text, streaming reassembly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagellm import SamplingParams, StructuredOutputsParams
from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagellm.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    StreamingToolState,
    parse_required,
    required_schema,
)
from pagellm.model_executor.layers.sampler import apply_grammar_bitmask


def _bitmask(allowed: list[int], words: int) -> np.ndarray:
    bits = np.zeros(words * 32, dtype=np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").view(np.int32).copy()


def test_apply_grammar_bitmask_rows_and_padding():
    logits = torch.randn(3, 100)  # 100 logits; bitmask covers 64 tokens (2 words): columns 64..99 masked
    before = logits.clone()
    apply_grammar_bitmask(logits, [_bitmask([0, 5, 31, 32, 63], 2), None, _bitmask([7], 2)])
    finite = torch.isfinite(logits)
    assert finite[0].nonzero().flatten().tolist() == [0, 5, 31, 32, 63]
    assert torch.equal(logits[1], before[1])
    assert finite[2].nonzero().flatten().tolist() == [7]
    assert torch.equal(logits[0, [0, 5, 31, 32, 63]], before[0, [0, 5, 31, 32, 63]])


def test_apply_grammar_bitmask_wider_than_logits():
    logits = torch.zeros(1, 40)
    apply_grammar_bitmask(logits, [_bitmask([1, 39, 40, 63], 2)])  # bits past the logits are ignored
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [1, 39]


def test_params_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^structured_outputs"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"^structured_outputs"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match=r"^structured_outputs\.choice"):
        StructuredOutputsParams(choice=[1, 2])
    with pytest.raises(ValueError, match=r"^structured_outputs"):
        SamplingParams(structured_outputs="json")
    p = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert p.structured_outputs.regex == "[0-9]+"
    # Same schema, different key order: one cache key.
    a = StructuredOutputsParams(json={"a": 1, "b": 2}).key()
    b = StructuredOutputsParams(json='{"b": 2, "a": 1}').key()
    assert a == b


def test_validation_cache_is_bounded_and_errors_name_the_kind():
    from pagellm import structured_output as so

    with pytest.raises(ValueError, match=r"^structured_outputs\.regex"):
        so.validate_structured_outputs(StructuredOutputsParams(regex="(unclosed"))
    for i in range(so.CACHE_SIZE + 20):
        so.validate_structured_outputs(StructuredOutputsParams(regex=f"a{{{i}}}"))
    assert len(so._validated) <= so.CACHE_SIZE


def test_validation_timeout(monkeypatch):
    """A grammar that compiles too slowly is refused after the timeout, not waited for."""
    import threading
    import time

    from pagellm import structured_output as so

    real = so._check
    release = threading.Event()
    monkeypatch.setattr(so, "_check", lambda params: (release.wait(60), real(params))[1])
    t0 = time.monotonic()
    try:
        with pytest.raises(ValueError, match=r"^structured_outputs: the grammar took longer than 0.2 s"):
            so.validate_structured_outputs(StructuredOutputsParams(regex="x{1,99}y{1,99}z{1,99}"), timeout=0.2)
        assert time.monotonic() - t0 < 30  # the check itself would take 60 s
    finally:
        release.set()


def test_protocol_maps_response_format_and_guided_names():
    def so(**kw):
        return CompletionRequest(prompt="x", **kw).to_sampling_params(8).structured_outputs

    assert so(response_format={"type": "json_object"}).json_object is True
    assert so(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
              ).json == {"type": "object"}
    assert so(response_format={"type": "text"}) is None
    assert so(structured_outputs={"regex": "a+"}).regex == "a+"
    assert so(guided_json={"type": "object"}).json == {"type": "object"}
    assert so(guided_regex="a+").regex == "a+"
    assert so(guided_choice=["a", "b"]).choice == ["a", "b"]
    assert so(guided_grammar='start: "a"').grammar == 'start: "a"'
    with pytest.raises(ValueError, match=r"^guided_choice"):
        so(guided_choice=[])
    with pytest.raises(ValueError, match=r"^response_format"):
        so(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(ValueError, match=r"^response_format"):
        so(response_format={"type": "xml"})
    with pytest.raises(ValueError, match=r"^guided_regex: only one"):
        so(response_format={"type": "json_object"}, guided_regex="a")
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], guided_regex="[ab]")
    assert chat.to_sampling_params(4).structured_outputs.regex == "[ab]"


# ---- tool parsers on recorded model text ----

# Qwen2.5-7B-Instruct (hermes format), two parallel calls after some content.
QWEN_TEXT = ('Let me check both cities.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
             '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Tokyo"}}\n</tool_call>')
# Hermes-2-Pro: one call, no content.
HERMES_TEXT = '<tool_call>\n{"arguments": {"query": "pagellm"}, "name": "search"}\n</tool_call>'
# Llama-3.1-8B-Instruct JSON tool calls: plain, with python_tag, and two separated by ';'.
LLAMA_TEXT = '{"name": "get_weather", "parameters": {"city": "San Francisco, CA"}}'
LLAMA_TAG_TEXT = '<|python_tag|>{"name": "search", "parameters": {"query": "llama 3"}}'
LLAMA_TWO_TEXT = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                  '{"name": "get_time", "parameters": {"tz": "CET"}}')


def test_hermes_parser():
    p = HermesToolParser()
    content, calls = p.extract(QWEN_TEXT)
    assert content == "Let me check both cities."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_weather", {"city": "Tokyo"})]
    content, calls = p.extract(HERMES_TEXT)
    assert content is None and calls[0].name == "search" and json.loads(calls[0].arguments) == {"query": "pagellm"}
    assert p.extract("just text") == ("just text", [])
    assert p.extract("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])


def test_llama3_json_parser():
    p = Llama3JsonToolParser()
    for text, expected in ((LLAMA_TEXT, [("get_weather", {"city": "San Francisco, CA"})]),
                           (LLAMA_TAG_TEXT, [("search", {"query": "llama 3"})]),
                           (LLAMA_TWO_TEXT, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})])):
        content, calls = p.extract(text)
        assert content is None
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert p.extract("The weather is nice.") == ("The weather is nice.", [])


@pytest.mark.parametrize("parser, text", [
    (HermesToolParser(), QWEN_TEXT), (HermesToolParser(), HERMES_TEXT), (HermesToolParser(), "no tools <tool"),
    (Llama3JsonToolParser(), LLAMA_TWO_TEXT), (Llama3JsonToolParser(), LLAMA_TAG_TEXT),
    (Llama3JsonToolParser(), "  plain answer"),
])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streaming_reassembles_the_same_calls(parser, text, step):
    state = StreamingToolState(parser)
    content, calls = "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        c, new = state.feed(piece, final=i == len(pieces) - 1)
        content += c
        calls += new
    whole_content, whole_calls = parser.extract(text)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert content.strip() == (whole_content or "").strip()


def test_required_schema_round_trip():
    import jsonschema

    tools = [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
        {"type": "function", "function": {"name": "b"}}]
    schema = required_schema(tools)
    text = '[{"name":"a","parameters":{"x":1}},{"name":"b","parameters":{}}]'
    jsonschema.validate(json.loads(text), schema)
    assert [(c.name, json.loads(c.arguments)) for c in parse_required(text)] == [("a", {"x": 1}), ("b", {})]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    with pytest.raises(ValueError):  # cut by max_tokens
        parse_required(text[:-3])


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_required_calls_stream_name_first_then_arguments_in_pieces(step):
    """Fed in pieces of any size, a required-mode output gives each call's name once, then arguments pieces
    that join into the raw text parse_required gives for the whole output (braces inside strings included)."""
    from pagellm.entrypoints.openai.tool_parsers import RequiredCallStream

    text = ('[ {"name": "get_weather", "parameters": {"city": "Pa\\"ris}", "x": [1, {"a": "]"}]}} ,\n'
            '{"name":"search","parameters": {}}]')
    reader, names, args = RequiredCallStream(), [], {}
    pieces = 0
    for i in range(0, len(text), step):
        for index, name, piece in reader.feed(text[i : i + step]):
            if name is not None:
                assert index == len(names) and index not in args
                names.append(name)
                args[index] = ""
            else:
                args[index] += piece
                pieces += 1
    whole = parse_required(text)
    assert names == [c.name for c in whole] == ["get_weather", "search"]
    assert [args[i] for i in range(len(names))] == [c.arguments for c in whole]
    assert json.loads(whole[0].arguments) == {"city": 'Pa"ris}', "x": [1, {"a": "]"}]}
    if step == 1:
        assert pieces > 20  # the arguments really came in pieces


@pytest.mark.parametrize("doc", [
    '{"a": [1, 2.5e-3, {"b": "x\\"y\\u00e9"}], "c": true, "d": null, "e": false, "f": -0.5, "g": {}, "h": []}',
    '{"k":{"k2":[[],[{}],"s\\\\"]}}',
    '{ }',
    '{"x" : [ 1 , 2 ] , "y":"}]"}',
])
def test_json_completion_of_every_prefix(doc):
    """Every prefix of a JSON document plus its completion parses; a whole document needs nothing."""
    from pagellm.structured_output.json_closer import json_completion

    json.loads(doc)
    for i in range(len(doc) + 1):
        suffix = json_completion(doc[:i])
        assert suffix is not None, doc[:i]
        json.loads(doc[:i] + suffix)
    assert json_completion(doc) == ""
    assert json_completion("") == "{}"
    assert json_completion(doc + " x") is None
    assert json_completion('{"a" 1') is None
