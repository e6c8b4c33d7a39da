"""Streamed responses: the chunks of a streamed chat completion as the Responses API's events.

The order is OpenAI's: response.created and response.in_progress; then for each output item
response.output_item.added, its parts (response.content_part.added, deltas, the part's done events) and
response.output_item.done; then response.completed (or response.incomplete when max_output_tokens cut the
output, or an `error` event and response.failed). Each event carries a sequence_number from 0; items are
numbered by output_index, parts by content_index. An item is closed when the next one opens.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from pagellm.entrypoints.openai.responses_convert import item_id, output_logprobs, status_of, usage_of
from pagellm.entrypoints.openai.responses_protocol import (
    FunctionCallItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
)


def sse_event(event: dict[str, Any]) -> str:
    """One server-sent event as OpenAI sends them: the event's type on an `event:` line, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class _OpenItem:
    """The output item being written: its kind, index, id and what it has gathered so far."""

    def __init__(self, kind: str, index: int, id: str, call_id: str = "", name: str = "") -> None:
        self.kind = kind  # "message" | "reasoning" | "function_call"
        self.index = index
        self.id = id
        self.call_id = call_id
        self.name = name
        self.text = ""
        self.logprobs: list[Any] = []


class ResponseEventWriter:
    """Turns chat completion chunks (dicts, one choice) into Responses events (dicts), in order."""

    def __init__(self, base: ResponseObject, with_logprobs: bool) -> None:
        self.base = base  # the response as created: id, model, echoed request fields
        self.with_logprobs = with_logprobs
        self.sequence = 0
        self.output: list[Any] = []  # the items closed so far
        self.open: Optional[_OpenItem] = None
        self.calls: dict[int, _OpenItem] = {}  # a chat tool call's index -> its function_call item
        self.finish_reason: Optional[str] = None
        self.usage: Optional[dict[str, Any]] = None
        self.response: Optional[dict[str, Any]] = None  # the last event's response (completed, incomplete, failed)

    def _event(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self, status: str, **fields: Any) -> dict[str, Any]:
        return self.base.model_copy(update={"status": status, "output": list(self.output), **fields}).model_dump()

    def start(self) -> Iterator[dict[str, Any]]:
        yield self._event("response.created", response=self._snapshot("in_progress"))
        yield self._event("response.in_progress", response=self._snapshot("in_progress"))

    # ---- items ----

    def _item(self, item: _OpenItem, status: str) -> Any:
        if item.kind == "message":
            return OutputMessage(id=item.id, status=status, content=[] if status == "in_progress" else [
                self._text_part(item)])
        if item.kind == "reasoning":
            return ReasoningItem(id=item.id, status=status, content=[] if status == "in_progress" else [
                ReasoningText(text=item.text)])
        return FunctionCallItem(id=item.id, call_id=item.call_id, name=item.name, status=status,
                                arguments=item.text if status != "in_progress" else "")

    def _text_part(self, item: _OpenItem) -> OutputText:
        return OutputText(text=item.text, logprobs=item.logprobs if self.with_logprobs else None)

    def _open(self, kind: str, prefix: str, **names: str) -> Iterator[dict[str, Any]]:
        yield from self._close()
        item = _OpenItem(kind, len(self.output), item_id(prefix), **names)
        self.open = item
        yield self._event("response.output_item.added", output_index=item.index,
                          item=self._item(item, "in_progress").model_dump())
        where = dict(item_id=item.id, output_index=item.index, content_index=0)
        if kind == "message":
            yield self._event("response.content_part.added", **where,
                              part=OutputText(text="", logprobs=[] if self.with_logprobs else None).model_dump())
        elif kind == "reasoning":
            yield self._event("response.content_part.added", **where, part=ReasoningText(text="").model_dump())

    def _close(self, status: str = "completed") -> Iterator[dict[str, Any]]:
        item = self.open
        if item is None:
            return
        self.open = None
        where = dict(item_id=item.id, output_index=item.index)
        if item.kind == "message":
            part = self._text_part(item)
            yield self._event("response.output_text.done", **where, content_index=0, text=item.text,
                              logprobs=[lp.model_dump() for lp in part.logprobs or []])
            yield self._event("response.content_part.done", **where, content_index=0, part=part.model_dump())
        elif item.kind == "reasoning":
            yield self._event("response.reasoning_text.done", **where, content_index=0, text=item.text)
            yield self._event("response.content_part.done", **where, content_index=0,
                              part=ReasoningText(text=item.text).model_dump())
        else:
            yield self._event("response.function_call_arguments.done", **where, arguments=item.text)
        done = self._item(item, status)
        self.output.append(done)
        yield self._event("response.output_item.done", output_index=item.index, item=done.model_dump())

    # ---- chunks ----

    def feed(self, chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of one chat completion chunk."""
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.open is None or self.open.kind != "reasoning":
                    yield from self._open("reasoning", "rs")
                self.open.text += delta["reasoning_content"]
                yield self._event("response.reasoning_text.delta", item_id=self.open.id,
                                  output_index=self.open.index, content_index=0, delta=delta["reasoning_content"])
            if delta.get("content"):
                if self.open is None or self.open.kind != "message":
                    yield from self._open("message", "msg")
                logprobs = output_logprobs(choice.get("logprobs")) if self.with_logprobs else []
                self.open.text += delta["content"]
                self.open.logprobs += logprobs
                yield self._event("response.output_text.delta", item_id=self.open.id, output_index=self.open.index,
                                  content_index=0, delta=delta["content"],
                                  logprobs=[lp.model_dump() for lp in logprobs])
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                if call.get("id") is not None:  # a new call: its id and name come first
                    yield from self._open("function_call", "fc", call_id=call["id"], name=function.get("name", ""))
                    self.calls[call["index"]] = self.open
                item = self.calls.get(call["index"])
                if function.get("arguments") and item is not None and item is self.open:
                    item.text += function["arguments"]
                    yield self._event("response.function_call_arguments.delta", item_id=item.id,
                                      output_index=item.index, delta=function["arguments"])
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def finish(self) -> Iterator[dict[str, Any]]:
        """The closing events once the chat stream has ended: response.completed or response.incomplete."""
        status, incomplete = status_of(self.finish_reason)
        yield from self._close("incomplete" if status == "incomplete" else "completed")
        self.response = self._snapshot(status, usage=usage_of(self.usage), incomplete_details=incomplete)
        yield self._event(f"response.{status}", response=self.response)

    def fail(self, error: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of an error in the chat stream (an OpenAI error envelope's `error`): `error`, then
        response.failed with the items closed so far."""
        self.open = None
        yield self._event("error", code=error.get("code"), message=error.get("message", ""),
                          param=error.get("param"))
        failed = ResponseError(code=str(error.get("code") or "server_error"), message=error.get("message", ""))
        self.response = self._snapshot("failed", error=failed)
        yield self._event("response.failed", response=self.response)
