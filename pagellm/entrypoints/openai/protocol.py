"""Pydantic models of the OpenAI-compatible API: completions, chat completions, models, tokenization, errors.

Field names and defaults follow OpenAI's API, plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...). Ranges are checked by SamplingParams, whose
errors name the field; here only types and the API's own caps are checked.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from pagellm.sampling_params import SamplingParams, StructuredOutputsParams

# Caps of one HTTP request (besides SamplingParams' caps on n, logprobs, stop strings, logit_bias).
MAX_PROMPTS_PER_REQUEST = 1024  # prompts of one /v1/completions request
MAX_SEQUENCES_PER_REQUEST = 1024  # prompts x n
MAX_CHAT_MESSAGES = 4096


def rename_field(message: str, field: str) -> str:
    """An error about structured_outputs, told in the name of the field the client used."""
    if field == "structured_outputs":
        return message
    return re.sub(r"^structured_outputs(\.[a-z_]+)?", field, message)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # Unknown fields are ignored, as clients send provider-specific extras.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# ---- errors ----


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- shared pieces ----


class StreamOptions(OpenAIModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class SamplingFields(OpenAIModel):
    """Sampling fields shared by completions and chat completions."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    priority: int = 0
    # Structured output: OpenAI's response_format, vLLM's structured_outputs object and its older guided_* names.
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def structured_outputs_params(self) -> tuple[Optional[StructuredOutputsParams], Optional[str]]:
        """(the request's grammar, the field that set it). ValueError naming the field when malformed."""
        sources: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text") if isinstance(rf, dict) else None
            if kind == "json_object":
                sources.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict):
                    raise ValueError("response_format: type json_schema needs a json_schema object")
                schema = js.get("schema", js.get("json_schema"))
                if schema is None:
                    raise ValueError("response_format: json_schema.schema is required")
                sources.append(("response_format", {"json": schema}))
            elif kind != "text":
                raise ValueError(f"response_format: type must be text, json_object or json_schema, got {kind!r}")
        if self.structured_outputs is not None:
            so = {k: v for k, v in self.structured_outputs.items() if v is not None and k not in (
                "disable_additional_properties", "whitespace_pattern", "structural_tag")}
            if so.get("json_object") is False:
                so.pop("json_object")
            sources.append(("structured_outputs", so))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                sources.append((name, {key: value}))
        if not sources:
            return None, None
        if len(sources) > 1:
            raise ValueError(f"{sources[1][0]}: only one of response_format, structured_outputs and guided_* "
                             f"may be set (also got {sources[0][0]})")
        name, kwargs = sources[0]
        try:
            return StructuredOutputsParams(**kwargs), name
        except TypeError as e:
            raise ValueError(f"{name}: {e}") from None
        except ValueError as e:
            raise ValueError(rename_field(str(e), name)) from None

    def _sampling_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                              ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0)):
            value = getattr(self, name)
            kwargs[name] = default if value is None else value
        logit_bias = None
        if self.logit_bias is not None:
            logit_bias = {}
            for key, value in self.logit_bias.items():
                try:
                    logit_bias[int(key)] = value
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        kwargs.update(
            n=self.n, logit_bias=logit_bias, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )
        return kwargs


# ---- /v1/completions ----


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    add_special_tokens: bool = True

    def to_sampling_params(self, max_tokens: Optional[int]) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs if prompt_logprobs is None else max(prompt_logprobs, self.logprobs)
        structured, _ = self.structured_outputs_params()
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs,
                              structured_outputs=structured, **self._sampling_kwargs())


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class CompletionStreamChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---- /v1/chat/completions ----


class ChatContentPart(OpenAIModel):
    type: str
    text: Optional[str] = None


class ChatMessage(OpenAIModel):
    role: str
    content: Optional[Union[str, list[ChatContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # assistant messages that called tools
    tool_call_id: Optional[str] = None  # role "tool": the call this message answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = True

    def to_sampling_params(self, max_tokens: Optional[int],
                           structured: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        logprobs = None
        if self.logprobs:
            logprobs = self.top_logprobs or 0
        elif self.top_logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if structured is None:
            structured, _ = self.structured_outputs_params()
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured_outputs=structured,
                              **self._sampling_kwargs())


class ChatLogProb(OpenAIModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(OpenAIModel):
    content: Optional[list[ChatLogProbsContent]] = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(OpenAIModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatResponseMessage(OpenAIModel):
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class DeltaMessage(OpenAIModel):
    """What a stream chunk adds; unset parts are left out (OpenAI sends the role only in the first chunk and an
    empty delta with the finish reason)."""

    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---- models, tokenization, version ----


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagellm"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str
