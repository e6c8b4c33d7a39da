"""Reasoning parsers, the tool-call parser a chat template implies, strict tool schemas, and the Hermes tools
prompt for templates that ignore tools: units, no engine."""

from __future__ import annotations

import pytest

from pagellm.entrypoints.chat_utils import render_chat, template_declares_tools, with_tools_in_system
from pagellm.entrypoints.openai.reasoning_parsers import ReasoningStream, get_reasoning_parser
from pagellm.entrypoints.openai.tool_parsers import infer_tool_parser, strict_schema

OUTPUTS = [
    "<think>Let me think.\nTwo and two.</think>\n\nIt is 4.",
    "<think>cut before the end",
    "No thinking here.",
    "  <think>x</think>y",
    "<think></think>answer",
    "<th",
    "",
    "</think>done",
    "thinking without the tag</think>\n\nanswer <think>not again</think>",
]


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
def test_streamed_deltas_add_up_to_the_whole_output(name):
    parser = get_reasoning_parser(name)
    for text in OUTPUTS:
        whole = parser.extract(text)
        for step in (1, 2, 3, 7):
            stream, thinking, answer = ReasoningStream(parser), "", ""
            pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
            for i, piece in enumerate(pieces):
                t, a = stream.feed(piece, final=i == len(pieces) - 1)
                thinking, answer = thinking + t, answer + a
            assert (thinking or None, answer or None) == whole, (name, text, step)


def test_qwen3_and_deepseek_r1_split():
    qwen3, r1 = get_reasoning_parser("qwen3"), get_reasoning_parser("deepseek_r1")
    assert qwen3.extract(OUTPUTS[0]) == ("Let me think.\nTwo and two.", "It is 4.")
    assert r1.extract(OUTPUTS[0]) == ("Let me think.\nTwo and two.", "It is 4.")
    assert qwen3.extract("No thinking here.") == (None, "No thinking here.")  # thinking off: all answer
    assert r1.extract("No thinking here.") == ("No thinking here.", None)  # the prompt opened the thinking
    assert r1.extract(OUTPUTS[-1]) == ("thinking without the tag", "answer <think>not again</think>")
    assert qwen3.extract("<think>cut before the end") == ("cut before the end", None)
    with pytest.raises(ValueError, match="reasoning_parser"):
        get_reasoning_parser("nope")


def test_tool_parser_inferred_from_the_template():
    assert infer_tool_parser("{{ messages }}") == "hermes"  # no tools: pagellm writes them as Hermes
    assert infer_tool_parser("{% if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}") == "hermes"
    assert infer_tool_parser("{% if tools %}{{ tools }}<|start_header_id|>ipython{% endif %}") == "llama3_json"
    assert infer_tool_parser("{% for tool in tools %}[TOOL]{{ tool }}{% endfor %}") is None
    assert not template_declares_tools("{{ toolshed }}") and template_declares_tools("{{ tools|tojson }}")


def test_strict_schema_closes_every_object_unless_declared():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "c": {"type": "array", "items": {"type": "object", "properties": {"d": {"type": "integer"}}}},
        "e": {"type": "object", "additionalProperties": {"type": "string"}},
        "f": {"anyOf": [{"type": "object", "properties": {}}, {"type": "null"}]}}}
    out = strict_schema(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["properties"]["e"]["additionalProperties"] == {"type": "string"}  # the schema says otherwise
    assert out["properties"]["f"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]  # the request's own schema is not changed


class _Tok:
    """apply_chat_template's contract, enough to see what reaches the template."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, conversation, **kwargs):
        self.seen = (conversation, kwargs)
        return {"input_ids": [1, 2, 3]}


def test_render_chat_tools_and_template_kwargs():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    tok = _Tok()
    assert render_chat(tok, [{"role": "user", "content": "hi"}], tools=tools,
                       chat_template_kwargs={"enable_thinking": False}) == [1, 2, 3]
    conversation, kwargs = tok.seen
    assert conversation[0]["role"] == "system" and "get_weather" in conversation[0]["content"]
    assert "<tool_call>" in conversation[0]["content"] and "tools" not in kwargs
    assert kwargs["enable_thinking"] is False
    tok.chat_template = "{% for t in tools %}{{ t }}{% endfor %}{{ messages }}"
    render_chat(tok, [{"role": "user", "content": "hi"}], tools=tools)
    assert tok.seen[1]["tools"] == tools and tok.seen[0] == [{"role": "user", "content": "hi"}]
    merged = with_tools_in_system([{"role": "system", "content": "Be brief."}], tools)
    assert len(merged) == 1 and merged[0]["content"].startswith("Be brief.\n\n")
    with pytest.raises(ValueError, match="chat_template_kwargs: tools"):
        render_chat(tok, [{"role": "user", "content": "hi"}], chat_template_kwargs={"tools": []})
    with pytest.raises(ValueError, match="continue_final_message"):
        render_chat(tok, [{"role": "user", "content": "hi"}], continue_final_message=True)


def _chat_serving(template: str, **kwargs):
    from types import SimpleNamespace

    from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat

    engine = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template),
                             model_config=SimpleNamespace(max_model_len=512, sampling_defaults={}),
                             config=SimpleNamespace(lora_config=None))
    return OpenAIServingChat(engine, "m", None, **kwargs)


def test_auto_tool_choice_defaults_and_switches():
    from pagellm.entrypoints.openai.protocol import ChatCompletionRequest
    from pagellm.entrypoints.openai.serving_engine import APIError

    tools = [{"type": "function", "function": {"name": "f"}}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools)
    serving = _chat_serving("{{ messages }}")  # no flags: on, hermes (tools written into the system message)
    assert serving.enable_auto_tool_choice and serving.tool_call_parser == "hermes"
    assert serving._tool_mode(req, None)[0].kind == "auto"
    assert _chat_serving("{{ tools }}<|python_tag|>").tool_call_parser == "llama3_json"
    assert _chat_serving("{{ tools }}<|python_tag|>", tool_call_parser="hermes").tool_call_parser == "hermes"
    off = _chat_serving("{{ messages }}", enable_auto_tool_choice=False)
    with pytest.raises(APIError, match="no-enable-auto-tool-choice"):
        off._tool_mode(req, None)
    unknown = "{% for t in tools %}[AVAILABLE_TOOLS]{{ t }}{% endfor %}"
    assert not _chat_serving(unknown).enable_auto_tool_choice  # a format we cannot read: auto stays off
    with pytest.raises(ValueError, match="--tool-call-parser"):
        _chat_serving(unknown, enable_auto_tool_choice=True)
