"""The Responses streaming events made from chat completion chunks (responses_stream.py), without a server: the
order and numbering OpenAI uses, checked by the openai SDK's own stream accumulator (the one behind
`client.responses.stream()`), for text, reasoning (as a reasoning parser streams it), tool calls, a cut output
and an error. The server tests (test_responses_server.py) check the same events from a live model."""

from __future__ import annotations

import pytest

from pagellm.entrypoints.openai.responses_protocol import ResponseObject
from pagellm.entrypoints.openai.responses_stream import ResponseEventWriter

openai = pytest.importorskip("openai")
from openai._models import construct_type_unchecked  # noqa: E402
from openai.lib.streaming.responses import ResponseStreamState  # noqa: E402
from openai.types.responses import ResponseStreamEvent  # noqa: E402


def chunk(delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(prompt: int, completion: int) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def run(chunks: list[dict], with_logprobs: bool = False, error: dict = None) -> list[dict]:
    writer = ResponseEventWriter(ResponseObject(id="resp_1", model="m", status="in_progress", store=False),
                                 with_logprobs)
    events = list(writer.start())
    for c in chunks:
        events += list(writer.feed(c))
    events += list(writer.fail(error) if error is not None else writer.finish())
    return events


def accumulate(events: list[dict]):
    """The SDK's accumulator over the events (it raises on an inconsistent stream); its final response."""
    state = ResponseStreamState(input_tools=[], text_format=openai.omit)
    for e in events:
        state.handle_event(construct_type_unchecked(type_=ResponseStreamEvent, value=e))
    return state


def test_text_events_in_openai_order():
    events = run([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
                  chunk({}, finish_reason="stop"), usage_chunk(5, 2)])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in events[3:8])
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["input_tokens"] == 5
    assert final["usage"]["output_tokens"] == 2 and final["usage"]["total_tokens"] == 7
    assert final["output"] == [events[8]["item"]]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    state = accumulate(events)
    assert state._completed_response.output_text == "Hello"


def test_reasoning_then_text_then_tool_calls():
    events = run([
        chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "think "}),
        chunk({"reasoning_content": "more"}), chunk({"content": "Calling."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "g", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, finish_reason="tool_calls"), usage_chunk(3, 9)])
    final = events[-1]["response"]
    assert final["status"] == "completed"
    kinds = [(item["type"], item.get("name")) for item in final["output"]]
    assert kinds == [("reasoning", None), ("message", None), ("function_call", "f"), ("function_call", "g")]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "think more"}]
    assert final["output"][2]["arguments"] == '{"x": 1}' and final["output"][2]["call_id"] == "call_a"
    assert final["output"][3]["arguments"] == "{}" and final["output"][3]["call_id"] == "call_b"
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2, 3]
    # Each item is done before the next one is added.
    opened = None
    for e in events:
        if e["type"] == "response.output_item.added":
            assert opened is None
            opened = e["output_index"]
        elif e["type"] == "response.output_item.done":
            assert e["output_index"] == opened
            opened = None
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert deltas == ["think ", "more"]
    state = accumulate(events)
    assert [o.type for o in state._completed_response.output] == ["reasoning", "message", "function_call",
                                                                   "function_call"]


def test_cut_output_is_incomplete_with_logprobs():
    lp = {"content": [{"token": "a", "logprob": -0.5, "bytes": [97],
                       "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}]}
    events = run([chunk({"content": "a"}, logprobs=lp), chunk({}, finish_reason="length"), usage_chunk(1, 1)],
                 with_logprobs=True)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["logprobs"] == [
        {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.5,
                                                                         "bytes": [97]}]}]
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"][0]["token"] == "a"


def test_error_in_stream_fails_the_response():
    events = run([chunk({"content": "a"})], error={"message": "the server is shutting down",
                                                   "type": "service_unavailable", "code": "shutting_down"})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == "the server is shutting down" and events[-2]["code"] == "shutting_down"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "shutting_down"
