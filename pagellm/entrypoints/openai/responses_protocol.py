"""Pydantic models of OpenAI's Responses API (POST /v1/responses): the request, its input items, the response
object and its output items.

Only what a text model served here can honour is accepted: text input, function tools, text.format (text,
json_object, json_schema). A field that asks for what the server cannot do (background, a stored prompt or
conversation, images, built-in tools) is refused by name rather than ignored; fields that only tune OpenAI's
own service (service_tier, prompt_cache_key, reasoning, truncation, ...) are accepted and ignored. Streaming
events are plain dicts (responses_stream.py), as their many kinds are only ever written, never read here.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator

from pagellm.entrypoints.openai.protocol import (
    MAX_CHAT_MESSAGES,
    Int,
    OpenAIModel,
    RequestBody,
    RequestModel,
    ranged,
)

# include[] values this server answers (others are accepted and have no effect).
INCLUDE_LOGPROBS = "message.output_text.logprobs"


# ---- input items ----


class InputText(RequestModel):
    """A text part of an input message. output_text and refusal are the parts of an earlier assistant message
    sent back (as the output of a response holds them)."""

    type: Literal["input_text", "output_text", "refusal"]
    text: Optional[str] = None
    refusal: Optional[str] = None

    @property
    def value(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


class InputMessage(RequestModel):
    """A message: a role and text (a string or text parts). `type` may be left out, as OpenAI allows."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[InputText]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.value for p in self.content)


class FunctionCallInput(RequestModel):
    """A function call the model made in an earlier turn (an output item sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputInput(RequestModel):
    """The result of a function call, given to the model."""

    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.value for p in self.output)


class ReasoningInput(RequestModel):
    """A reasoning item of an earlier turn sent back: accepted, and (as chat templates do) not shown again."""

    type: Literal["reasoning"]


# An input item's kind, by its `type` (a message may leave it out). The tags are not field names (they hold a
# space), so that an error's path names the item's fields only: `input.2.content`, not `input.2.message.content`.
_ITEM_TAGS = {"message": "a message", "function_call": "a function_call", "function_call_output":
              "a function_call_output", "reasoning": "a reasoning"}


def _item_kind(value: Any) -> Optional[str]:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return _ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[Union[
    Annotated[InputMessage, Tag(_ITEM_TAGS["message"])],
    Annotated[FunctionCallInput, Tag(_ITEM_TAGS["function_call"])],
    Annotated[FunctionCallOutputInput, Tag(_ITEM_TAGS["function_call_output"])],
    Annotated[ReasoningInput, Tag(_ITEM_TAGS["reasoning"])],
], Discriminator(_item_kind, custom_error_type="invalid_item", custom_error_message=(
    "each item must be a message or an item of type function_call, function_call_output or reasoning"))]


# ---- tools and text format ----


class FunctionTool(RequestModel):
    """A function the model may call (Responses' flat form: name and parameters beside type)."""

    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolChoiceFunction(RequestModel):
    type: Literal["function"]
    name: str


class FormatText(RequestModel):
    type: Literal["text"]


class FormatJSONObject(RequestModel):
    type: Literal["json_object"]


class FormatJSONSchema(RequestModel):
    type: Literal["json_schema"]
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class TextConfig(RequestModel):
    format: Optional[Annotated[Union[FormatText, FormatJSONObject, FormatJSONSchema],
                               Field(discriminator="type")]] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


# ---- the request ----


class ResponsesRequest(RequestBody):
    model: Optional[str] = None
    input: Union[str, Annotated[list[InputItem], Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[ranged(Int, "max_tokens")] = None
    temperature: Optional[ranged(float, "temperature")] = None
    top_p: Optional[ranged(float, "top_p")] = None
    top_logprobs: Optional[ranged(Int, "logprobs")] = None
    include: Optional[list[str]] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    stream: Optional[bool] = False
    store: Optional[bool] = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    background: Optional[bool] = None
    conversation: Optional[Any] = None
    prompt: Optional[Any] = None

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: Optional[bool]) -> Optional[bool]:
        if value:
            raise ValueError("background: background responses are not supported (leave it out or false)")
        return value

    @field_validator("conversation", "prompt")
    @classmethod
    def _not_served(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name}: not supported by this server (send the input itself)")
        return value

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.top_logprobs) or INCLUDE_LOGPROBS in (self.include or [])


# ---- the response ----


class OutputTopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] = Field(default_factory=list)


class OutputLogprob(OutputTopLogprob):
    top_logprobs: list[OutputTopLogprob] = Field(default_factory=list)


class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: Optional[list[OutputLogprob]] = None


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(OpenAIModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = Annotated[Union[OutputMessage, FunctionCallItem, ReasoningItem], Field(discriminator="type")]


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: Literal["max_output_tokens"]


class ResponseError(OpenAIModel):
    code: str
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(OpenAIModel):
    """The response: what the request asked for (echoed) and what was generated (`output`, `usage`)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    model: str
    status: ResponseStatus
    output: list[OutputItem] = Field(default_factory=list)
    usage: Optional[ResponseUsage] = None
    error: Optional[ResponseError] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_logprobs: Optional[int] = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Union[str, dict[str, Any]] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    previous_response_id: Optional[str] = None
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    user: Optional[str] = None


class DeletedResponse(OpenAIModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
