"""A conversation -> prompt token ids through the chat template: one function for `LLM.chat` and the server.

Tools reach the template as its `tools` variable. A template that does not declare tools (SmolLM2's) would drop
them: the tools are then written into the system message in the Hermes format (`<tools>` ... `</tools>`, calls
as `<tool_call>{...}</tool_call>`), which the hermes tool parser reads back.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

# apply_chat_template's own parameters: chat_template_kwargs may not set them behind their parameters' backs.
_RESERVED = frozenset({"conversation", "messages", "tokenize", "return_dict", "chat_template", "tools",
                       "documents", "add_generation_prompt", "continue_final_message", "padding", "truncation",
                       "max_length", "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs"})

TOOLS_SYSTEM_PROMPT = (
    "You may call one or more functions to answer. The functions are described in JSON Schema inside "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, reply with a JSON object holding its name "
    "and arguments inside <tool_call></tool_call>, one block per call:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>'
)


def template_text(tokenizer: Any, chat_template: Optional[str] = None) -> str:
    """The chat template in use: the given one, else the tokenizer's ("" when there is none)."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()), "")
    return str(template)


def template_declares_tools(template: str) -> bool:
    """Whether the template reads its `tools` variable (else tools given to it would be dropped)."""
    return re.search(r"\btools\b", template) is not None


def check_chat_template_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError("chat_template_kwargs must be an object of template variables")
    reserved = sorted(_RESERVED & set(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs: {reserved[0]} has its own parameter; set it there")
    return dict(kwargs)


def with_tools_in_system(conversation: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tools described in its system message (added first when it has none)."""
    described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = TOOLS_SYSTEM_PROMPT.format(tools=described)
    if conversation and conversation[0].get("role") == "system":
        first = dict(conversation[0])
        first["content"] = (str(first.get("content") or "") + "\n\n" + text).lstrip()
        return [first, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


def render_chat(tokenizer: Any, conversation: list[dict[str, Any]], chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: Optional[list[dict[str, Any]]] = None,
                chat_template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
    """The prompt token ids of a conversation (ValueError naming the parameter when they contradict)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message: cannot be used with add_generation_prompt")
    kwargs = check_chat_template_kwargs(chat_template_kwargs)
    if continue_final_message:
        kwargs["continue_final_message"] = True
    if tools:
        if template_declares_tools(template_text(tokenizer, chat_template)):
            kwargs["tools"] = tools
        else:
            conversation = with_tools_in_system(conversation, tools)
    out = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                        add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True, **kwargs)
    return list(out["input_ids"])
