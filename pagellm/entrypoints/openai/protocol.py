"""Pydantic models of the OpenAI-compatible API: completions, chat completions, models, tokenization, errors.

Field names and defaults follow OpenAI's API, plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...). Request models check types strictly (true is
not 1, "1" is not 1) and the shape the server needs (a non-empty prompt, at least one message). Ranges and caps
are checked by SamplingParams, whose errors name the field; the models publish them in /openapi.json
(`ranged`, `documented`) so that the schema tells what the server requires.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from pagellm.entrypoints.openai.logprob_fields import (  # noqa: F401 - the handlers import them from here
    LOGPROB_FLOOR,
    TOKEN_ID_KEY,
    Logprob,
    PromptLogprobs,
    prompt_logprobs_field,
)

from pagellm.sampling_params import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS,
    RANGES,
    SamplingParams,
    StructuredOutputsParams,
    check_json_value,
    check_range,
)

# Caps of one HTTP request (besides SamplingParams' caps on n, logprobs, stop strings, logit_bias).
MAX_PROMPTS_PER_REQUEST = 1024  # prompts of one /v1/completions request
MAX_SEQUENCES_PER_REQUEST = 1024  # prompts x n
MAX_CHAT_MESSAGES = 4096
MAX_DETOKENIZE_TOKENS = 1 << 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def documented(type_: Any, **schema: Any) -> Any:
    """type_, with JSON-schema keywords for a rule that the server checks elsewhere (SamplingParams, a
    handler), with its own message: /openapi.json tells the rule, pydantic does not check it twice."""
    return Annotated[type_, Field(json_schema_extra=schema)]


def ranged(type_: Any, key: str, **schema: Any) -> Any:
    """type_, with the range RANGES[key] (checked by SamplingParams) in its JSON schema."""
    allowed = RANGES[key]
    bounds: dict[str, Any] = {}
    if allowed.low is not None:
        bounds["exclusiveMinimum" if allowed.low_open else "minimum"] = allowed.low
    if allowed.high is not None:
        bounds["maximum"] = allowed.high
    return documented(type_, **bounds, **schema)


def _integral(value: Any) -> Any:
    """2.0 -> 2: JSON Schema's integer is any number without a fraction. true, "2" and 2.5 still fail (strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The integer of every request field: strict, so a boolean or a string is not taken for a number.
Int = Annotated[int, BeforeValidator(_integral)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = ranged(Int, "token_id")  # the vocabulary check (processor, /detokenize) is tighter still
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopString = documented(str, minLength=1, maxLength=MAX_STOP_STRING_LEN)


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


class RequestModel(OpenAIModel):
    """A request body or a part of one: strict types, so that true is not the integer 1 and "1" not a number."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class RequestBody(RequestModel):
    """A whole request body. Before its fields are read, each value is checked to nest at most MAX_JSON_DEPTH
    levels and to hold only valid Unicode text (no lone surrogates): tokenizers, encoders, grammar compilers
    and json.dumps crash or recurse on the rest."""

    @model_validator(mode="before")
    @classmethod
    def _check_json_values(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.model_fields:
                if name in data:
                    check_json_value(name, data[name])
        return data


# ---- errors ----


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- shared pieces ----


class StreamOptions(RequestModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class SamplingFields(RequestBody):
    """Sampling fields shared by completions and chat completions."""

    model: Optional[str] = None
    n: ranged(Int, "n") = 1
    temperature: Optional[ranged(float, "temperature")] = None
    top_p: Optional[ranged(float, "top_p")] = None
    top_k: Optional[ranged(Int, "top_k")] = None
    min_p: Optional[ranged(float, "min_p")] = None
    presence_penalty: Optional[ranged(float, "presence_penalty")] = 0.0
    frequency_penalty: Optional[ranged(float, "frequency_penalty")] = 0.0
    repetition_penalty: Optional[ranged(float, "repetition_penalty")] = None
    logit_bias: Optional[documented(dict[str, ranged(float, "logit_bias")], maxProperties=MAX_LOGIT_BIAS,
                                    propertyNames={"pattern": TOKEN_ID_KEY})] = None
    seed: Optional[ranged(Int, "seed")] = None
    stop: Optional[Union[StopString, documented(list[StopString], maxItems=MAX_STOP_STRINGS)]] = None
    stop_token_ids: Optional[documented(list[TokenId], maxItems=MAX_STOP_TOKEN_IDS)] = None
    ignore_eos: bool = False
    min_tokens: ranged(Int, "min_tokens") = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    priority: ranged(Int, "priority") = 0
    # Structured output: OpenAI's response_format, vLLM's structured_outputs object and its older guided_* names.
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[documented(list[str], minItems=1, maxItems=MAX_CHOICES)] = None
    guided_grammar: Optional[str] = None
    # vLLM's extension: the logprobs of each prompt token and the top prompt_logprobs at its position.
    prompt_logprobs: Optional[ranged(Int, "prompt_logprobs")] = None

    @field_validator("priority")
    @classmethod
    def _check_priority(cls, value: int) -> int:
        check_range("priority", value)  # the engine keeps priorities as integers of 32 bits
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _check_prompt_logprobs(cls, value: Optional[int]) -> Optional[int]:
        if value is not None:  # with echo, the larger of it and logprobs reaches SamplingParams: check it here
            check_range("prompt_logprobs", value)
        return value

    @model_validator(mode="after")
    def _check_prompt_logprobs_stream(self) -> "SamplingFields":
        if self.stream and self.prompt_logprobs:  # as vLLM: 0 passes (nothing to send)
            raise ValueError("prompt_logprobs: not available with stream=true (they come in the whole response)")
        return self

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
            return StructuredOutputsParams.from_dict(kwargs), name
        except ValueError as e:
            raise ValueError(rename_field(str(e), name)) from None

    def _sampling_kwargs(self, defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """SamplingParams' arguments; a field left out takes the model's default (`defaults`, from its
        generation_config.json), else SamplingParams' own."""
        kwargs: dict[str, Any] = {}
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                              ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0)):
            value = getattr(self, name)
            kwargs[name] = (defaults or {}).get(name, default) if value is None else value
        logit_bias = None
        if self.logit_bias is not None:
            logit_bias = {}
            for key, value in self.logit_bias.items():
                if not re.fullmatch(TOKEN_ID_KEY, key):
                    raise ValueError("logit_bias keys must be token ids in decimal digits")
                logit_bias[int(key)] = value
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
    prompt: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
                  TokenIds, Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)]]
    # 0 only with echo: the prompt comes back, nothing is generated.
    max_tokens: Optional[documented(Int, minimum=0, maximum=MAX_TOKENS)] = 16
    echo: bool = False
    logprobs: Optional[ranged(Int, "logprobs")] = None
    best_of: Optional[Int] = None
    suffix: Optional[str] = None
    add_special_tokens: bool = True

    @property
    def returned_prompt_logprobs(self) -> Optional[int]:
        """How many top logprobs each choice's prompt_logprobs holds (vLLM: with echo, logprobs stands in for a
        prompt_logprobs left out); None: no prompt_logprobs in the response."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    def to_sampling_params(self, max_tokens: Optional[int],
                           defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of: best_of > n needs stream=false (the best sequences are known only at the end)")
        if self.suffix:
            raise ValueError("suffix: not supported")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs if prompt_logprobs is None else max(prompt_logprobs, self.logprobs)
        structured, _ = self.structured_outputs_params()
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs,
                              structured_outputs=structured, best_of=self.best_of, **self._sampling_kwargs(defaults))


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[Logprob]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, Logprob]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: PromptLogprobs = None  # of the choice's prompt (the same for the n choices of one prompt)


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


class ChatTextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImageURL(RequestModel):
    url: str  # data:image/...;base64,... (file:// and http(s):// only where the server's flags allow them)
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted, not used: the model's processor decides


class ChatImagePart(RequestModel):
    """An image (vision models): it takes the model's image tokens where it stands among the message's parts."""

    type: Literal["image_url"]
    image_url: ImageURL


ChatContentPart = Annotated[Union[ChatTextPart, ChatImagePart], Field(discriminator="type")]


class CalledFunction(RequestModel):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"  # JSON text, as OpenAI sends it, or the object itself


class CalledTool(RequestModel):
    """A tool call of an earlier assistant message, sent back in the conversation."""

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(RequestModel):
    role: Literal[CHAT_ROLES]
    content: Optional[Union[str, list[ChatContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[CalledTool]] = None  # assistant messages that called tools
    tool_call_id: Optional[str] = None  # role "tool": the call this message answers


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]


class ChatCompletionRequest(SamplingFields):
    messages: Messages
    max_tokens: Optional[ranged(Int, "max_tokens")] = None
    max_completion_tokens: Optional[ranged(Int, "max_tokens")] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[ranged(Int, "logprobs")] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None  # more chat template variables, e.g. enable_thinking
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = True

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _check_budget(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None:  # max_completion_tokens wins when both are set: check the other one here
            check_range(info.field_name, value, "max_tokens")
        return value

    def to_sampling_params(self, max_tokens: Optional[int], structured: Optional[StructuredOutputsParams] = None,
                           defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
        logprobs = None
        if self.logprobs:
            logprobs = self.top_logprobs or 0
        elif self.top_logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if structured is None:
            structured, _ = self.structured_outputs_params()
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
                              structured_outputs=structured, **self._sampling_kwargs(defaults))


class ChatLogProb(OpenAIModel):
    token: str
    logprob: Logprob
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
    reasoning_content: Optional[str] = None  # --reasoning-parser: the model's thinking, apart from its answer
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
    prompt_logprobs: PromptLogprobs = None  # vLLM's extension, of the one prompt (the rendered messages)


class DeltaMessage(OpenAIModel):
    """What a stream chunk adds; unset parts are left out (OpenAI sends the role only in the first chunk and an
    empty delta with the finish reason)."""

    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
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
    parent: Optional[str] = None  # a LoRA adapter's base model
    max_model_len: Optional[int] = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestBody):
    """Exactly one of prompt and messages (neither may be null)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: Optional[str] = None
    prompt: str = None  # type: ignore[assignment]  # absent, never null: the schema's oneOf tells which
    messages: Messages = None  # type: ignore[assignment]
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestBody):
    model: Optional[str] = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_DETOKENIZE_TOKENS)]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str
