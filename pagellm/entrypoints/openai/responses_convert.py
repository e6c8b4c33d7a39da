"""The Responses API over the chat path: a Responses request as a chat completion request (messages, tools,
tool_choice, response_format), the chat answer as Responses output items, and chat error names as Responses
field names.

The chat path (chat template, sampling, structured output, tool parsing) is the one place these are done; this
module only translates, so /v1/responses behaves as /v1/chat/completions does for the same conversation.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional

from pydantic import ValidationError

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest
from pagellm.entrypoints.openai.responses_protocol import (
    FormatJSONObject,
    FormatJSONSchema,
    FunctionCallInput,
    FunctionCallItem,
    FunctionCallOutputInput,
    IncompleteDetails,
    InputMessage,
    OutputLogprob,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from pagellm.entrypoints.openai.serving_engine import APIError, to_api_error, validation_error

# A chat request's field -> the Responses field that set it (for errors: their param and first word).
_FIELD_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format", "logprobs": "include", "structured_outputs": "text.format"}


def item_id(prefix: str) -> str:
    """An output item's or a response's id, in OpenAI's style (`msg_...`, `fc_...`, `rs_...`, `resp_...`)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def responses_error(e: BaseException) -> APIError:
    """An error of the chat path told in the Responses request's field names."""
    err = to_api_error(e)
    if err.param is None:
        return err
    top = err.param.split(".")[0]
    name = _FIELD_NAMES.get(top)
    if name is None:
        return err
    message = err.message
    if message.startswith(top):
        message = name + message[len(top):]
    return APIError(message, err.status, err.type, name.split(".")[0], err.code)


# ---- request ----


def chat_messages(req: ResponsesRequest, history: list[Any]) -> list[dict[str, Any]]:
    """The conversation as chat messages: instructions (a system message), the stored history of
    previous_response_id, then the input. Consecutive function calls become one assistant message's tool_calls;
    reasoning items are dropped."""
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    items = history + ([InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input)
    for item in items:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallInput):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputInput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    if not messages:
        raise APIError("input: needs at least one message (reasoning items alone say nothing)", param="input")
    return messages


def chat_request(req: ResponsesRequest, history: list[Any]) -> ChatCompletionRequest:
    """The chat completion request that generates this response."""
    body: dict[str, Any] = {
        "messages": chat_messages(req, history),
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p,
        "stream": bool(req.stream), "stream_options": {"include_usage": True} if req.stream else None,
        "user": req.user,
    }
    if req.wants_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    if req.tools:
        body["tools"] = [{"type": "function", "function": {
            k: v for k, v in (("name", t.name), ("description", t.description), ("parameters", t.parameters),
                              ("strict", t.strict)) if v is not None}} for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {
            "type": "function", "function": {"name": choice.name}}
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, FormatJSONObject):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, FormatJSONSchema):
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise responses_error(validation_error(e.errors())) from None


def echoed_fields(req: ResponsesRequest) -> dict[str, Any]:
    """What a response object repeats of its request."""
    tool_choice: Any = req.tool_choice if req.tool_choice is not None else "auto"
    return dict(
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, top_logprobs=req.top_logprobs,
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
        tool_choice=tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
        parallel_tool_calls=req.parallel_tool_calls is not False,
        text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text is not None and req.text.format is not None else {"format": {"type": "text"}},
        previous_response_id=req.previous_response_id, metadata=req.metadata or {}, user=req.user,
    )


# ---- response ----


def output_logprobs(chat_logprobs: Optional[dict[str, Any]]) -> list[OutputLogprob]:
    """A chat choice's (or chunk's) logprobs as an output_text part's."""
    if not chat_logprobs:
        return []
    return [OutputLogprob(token=e["token"], logprob=e["logprob"], bytes=e.get("bytes") or [],
                          top_logprobs=[{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes") or []}
                                        for t in e.get("top_logprobs") or []])
            for e in chat_logprobs.get("content") or []]


def usage_of(chat_usage: Optional[dict[str, Any]]) -> Optional[ResponseUsage]:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ResponseUsage(input_tokens=chat_usage["prompt_tokens"], output_tokens=chat_usage["completion_tokens"],
                         total_tokens=chat_usage["total_tokens"], input_tokens_details={"cached_tokens": cached})


def status_of(finish_reason: Optional[str]) -> tuple[str, Optional[IncompleteDetails]]:
    """The response's status from the chat's finish_reason: cut by max_output_tokens is `incomplete`."""
    if finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    return "completed", None


def output_items(choice: dict[str, Any], with_logprobs: bool) -> list[Any]:
    """A chat choice as output items: its reasoning (where a reasoning parser gave it), its text as a message
    (left out when the model only called functions), then one function_call item per tool call."""
    message = choice["message"]
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    items: list[Any] = []
    reasoning = message.get("reasoning_content")
    if reasoning:
        items.append(ReasoningItem(id=item_id("rs"), content=[ReasoningText(text=reasoning)], status=status))
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if content or not calls:
        part = OutputText(text=content or "",
                          logprobs=output_logprobs(choice.get("logprobs")) if with_logprobs else None)
        items.append(OutputMessage(id=item_id("msg"), status=status, content=[part]))
    for call in calls:
        items.append(FunctionCallItem(id=item_id("fc"), call_id=call["id"], name=call["function"]["name"],
                                      arguments=call["function"]["arguments"], status="completed"))
    return items


def response_from_chat(chat: dict[str, Any], req: ResponsesRequest, response_id: str, created_at: int,
                       model: str, stored: bool) -> ResponseObject:
    """The response object of a whole (not streamed) chat completion."""
    choice = chat["choices"][0]
    status, incomplete = status_of(choice.get("finish_reason"))
    return ResponseObject(id=response_id, created_at=created_at, model=model, status=status,
                          output=output_items(choice, req.wants_logprobs), usage=usage_of(chat.get("usage")),
                          incomplete_details=incomplete, store=stored, **echoed_fields(req))


def as_input_items(output: list[Any]) -> list[Any]:
    """A response's output items as the input items they are when the conversation goes on."""
    items: list[Any] = []
    for item in output:
        if isinstance(item, OutputMessage):
            items.append(InputMessage(role="assistant", content="".join(p.text for p in item.content)))
        elif isinstance(item, FunctionCallItem):
            items.append(FunctionCallInput(type="function_call", call_id=item.call_id, name=item.name,
                                           arguments=item.arguments))
    return items
