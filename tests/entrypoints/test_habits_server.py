"""The server as vLLM users start and call it (issue 17): `python -m pagellm.entrypoints.openai.api_server
--model M`, generation_config.json's defaults for the fields a request leaves out, a Qwen3-style chat template
(it reads tools and enable_thinking: the hermes tool parser is inferred from it), `--reasoning-parser qwen3`
(reasoning_content, streamed as its own deltas), chat_template_kwargs, best_of. One server for the module."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer

GENERATION_CONFIG = {"temperature": 0.0, "max_new_tokens": 6, "eos_token_id": 2}
# Qwen3's template, cut to what the tests need: tools in the system message, <tool_call> calls, and an empty
# thinking block in the prompt when enable_thinking is false.
QWEN3_LIKE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "Call a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
THINKING = "<think>\nThe user asks about Paris.\n</think>\n\nIt is sunny."
THINKING_THEN_CALL = ('<think>\nA tool knows.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                      '{"city": "Paris"}}\n</tool_call>')


@pytest.fixture(scope="module")
def server(tiny_so_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-like") / "model"
    shutil.copytree(tiny_so_model, folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    (folder / "chat_template.jinja").write_text(QWEN3_LIKE_TEMPLATE)
    args = ["--model", str(folder), "--served-model-name", "qwen3-like", "--dtype", "float32",
            "--max-model-len", "1024", "--kv-cache-memory", str(64 * 2**20), "--reasoning-parser", "qwen3"]
    with RemoteServer(args, entry=["-m", "pagellm.entrypoints.openai.api_server"]) as srv:
        yield srv


def _stream(client, **kwargs) -> tuple[str, str, str]:
    """(reasoning_content, content, finish_reason) of a streamed chat, each delta holding one of the two."""
    thinking, content, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            delta = ch.delta.model_dump()
            assert not (delta.get("reasoning_content") and delta.get("content")), delta
            thinking += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            finish = ch.finish_reason or finish
    return thinking, content, finish


def test_reasoning_content_apart_from_the_answer(server):
    """The model's thinking (forced here by a regex, as a random model would not think) comes back as
    reasoning_content, the answer as content; streamed, the two come as their own deltas and add up the same."""
    client = server.client()
    force = {"structured_outputs": {"regex": THINKING.replace(".", "\\.").replace("?", "\\?")}}
    out = client.chat.completions.create(model="qwen3-like", messages=MSG, max_tokens=60, extra_body=force)
    message = out.choices[0].message
    assert message.reasoning_content == "\nThe user asks about Paris.\n" and message.content == "It is sunny."
    assert _stream(client, model="qwen3-like", messages=MSG, max_tokens=60, extra_body=force) == (
        "\nThe user asks about Paris.\n", "It is sunny.", "stop")
    # With tools (auto, the hermes parser inferred from the template): thinking first, then the call.
    force = {"guided_choice": [THINKING_THEN_CALL]}
    out = client.chat.completions.create(model="qwen3-like", messages=MSG, tools=TOOLS, max_tokens=80,
                                         extra_body=force)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == "\nA tool knows.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    # An answer without thinking is all content.
    out = client.chat.completions.create(model="qwen3-like", messages=MSG, max_tokens=20,
                                         extra_body={"guided_choice": ["Just sunny."]})
    assert out.choices[0].message.content == "Just sunny." and out.choices[0].message.reasoning_content is None


def test_chat_template_kwargs_and_generation_defaults(server):
    client = server.client()
    on = client.chat.completions.create(model="qwen3-like", messages=MSG, max_tokens=1)
    off = client.chat.completions.create(model="qwen3-like", messages=MSG, max_tokens=1,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the empty thinking block in the prompt
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs: add_generation_prompt has its own"):
        client.chat.completions.create(model="qwen3-like", messages=MSG, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    # No temperature and no max_tokens: generation_config.json's (0.0: greedy, and 6 tokens at most).
    a, b = (client.chat.completions.create(model="qwen3-like", messages=MSG) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 6
    assert a.usage.completion_tokens == 6 or a.choices[0].finish_reason == "stop"
    # A request's own values win.
    sampled = {client.chat.completions.create(model="qwen3-like", messages=MSG, temperature=1.0, seed=s,
                                              max_tokens=8).choices[0].message.content for s in range(4)}
    assert len(sampled) > 1


def test_best_of_on_completions(server):
    client = server.client()
    out = client.completions.create(model="qwen3-like", prompt="Once", max_tokens=5, n=2, temperature=1.0, seed=1,
                                    extra_body={"best_of": 4})
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="qwen3-like", prompt="Once", max_tokens=5, n=2, stream=True,
                                  extra_body={"best_of": 4})
    with pytest.raises(openai.BadRequestError, match=r"best_of \(1\) must be at least n \(2\)"):
        client.completions.create(model="qwen3-like", prompt="Once", max_tokens=5, n=2, extra_body={"best_of": 1})
