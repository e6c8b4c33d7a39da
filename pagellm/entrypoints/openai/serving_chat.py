"""POST /v1/chat/completions: messages through the chat template, n, streaming, logprobs, structured output
(response_format, structured_outputs, guided_*) and tool calling (tools, tool_choice)."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from pagellm.engine.async_llm import RequestStream
from pagellm.engine.output_processor import OutputKind
from pagellm.entrypoints.openai.protocol import (
    MAX_SEQUENCES_PER_REQUEST,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
    prompt_logprobs_field,
    random_id,
)
from pagellm.entrypoints.chat_utils import template_text
from pagellm.entrypoints.openai.reasoning_parsers import ReasoningParser, ReasoningStream, get_reasoning_parser
from pagellm.entrypoints.openai.tool_parsers import (
    ParsedToolCall,
    RequiredCallStream,
    StreamingToolState,
    ToolParser,
    check_tools,
    get_tool_parser,
    infer_tool_parser,
    named_tool,
    parameters_schema,
    parse_required,
    required_schema,
    tool_call_id,
)
from pagellm.sampling_params import StructuredOutputsParams
from pagellm.entrypoints.openai.serving_engine import APIError, OpenAIServing, merge_streams, sse, sse_error
from pagellm.entrypoints.openai.tenants import Ticket, engine_kwargs
from pagellm.outputs import CompletionOutput, PositionLogprobs


class _ToolMode:
    """How one chat request treats tools: none | auto (a parser reads the text) | required | named."""

    def __init__(self, kind: str, parser: Optional[ToolParser] = None, name: Optional[str] = None) -> None:
        self.kind = kind
        self.parser = parser
        self.name = name

    def extract(self, text: str, finish_reason: Optional[str]) -> tuple[Optional[str], list[ParsedToolCall]]:
        """(content, tool calls) of a whole output."""
        if self.kind == "named":
            return None, [ParsedToolCall(self.name, text)]
        if self.kind == "required":
            try:
                calls = parse_required(text)
            except ValueError:  # cut by max_tokens: no complete calls
                return text, []
            return None, calls
        if self.kind == "auto":
            return self.parser.extract(text)
        return text, []

    def finish_reason(self, reason: Optional[str], calls: bool) -> Optional[str]:
        if calls and reason == "stop" and self.kind in ("auto", "required"):
            return "tool_calls"
        return reason


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args: Any, enable_auto_tool_choice: Optional[bool] = None,
                 tool_call_parser: Optional[str] = None, reasoning_parser: Optional[str] = None,
                 **kwargs: Any) -> None:
        """Auto tool choice (None: on when the parser is known) reads tool calls with `tool_call_parser`, by
        default the one the chat template's format implies (infer_tool_parser)."""
        super().__init__(*args, **kwargs)
        if tool_call_parser is None:
            tool_call_parser = infer_tool_parser(template_text(self.tokenizer, self.chat_template))
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice: the chat template's tool-call format is not one pagellm "
                             "recognises: name it with --tool-call-parser")
        self.enable_auto_tool_choice = tool_call_parser is not None if enable_auto_tool_choice is None \
            else enable_auto_tool_choice
        self.tool_call_parser = tool_call_parser
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)  # a bad name fails at start-up
        self.reasoning_parser = get_reasoning_parser(reasoning_parser) if reasoning_parser else None

    def _reasoning(self, mode: _ToolMode, params: Any) -> Optional[ReasoningParser]:
        """The reasoning parser for this request: not when its output is JSON by grammar (a JSON answer, a forced
        tool call: no room for thinking); a regex or grammar may spell the thinking out, and then it is read."""
        so = params.structured_outputs
        if self.reasoning_parser is None or mode.kind not in ("none", "auto") or (
                so is not None and (so.json is not None or so.json_object)):
            return None
        return self.reasoning_parser

    def _tool_mode(self, req: ChatCompletionRequest,
                   structured: Optional[StructuredOutputsParams]) -> tuple[_ToolMode, Optional[StructuredOutputsParams]]:
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError("tool_choice: needs tools", param="tool_choice")
            return _ToolMode("none"), structured
        try:
            tools = check_tools(req.tools)
        except ValueError as e:
            raise APIError(str(e), param="tools") from None
        if choice is None:
            choice = "auto"
        if choice == "none":
            return _ToolMode("none"), structured
        if choice == "auto":
            if not self.enable_auto_tool_choice:
                raise APIError('tool_choice: "auto" tool choice is off on this server (--no-enable-auto-tool-choice'
                               '); use "required", a named function or "none"', param="tool_choice")
            return _ToolMode("auto", parser=get_tool_parser(self.tool_call_parser)), structured
        if structured is not None:
            raise APIError("tool_choice: required or a named function cannot be combined with response_format, "
                           "structured_outputs or guided_*", param="tool_choice")
        if choice == "required":
            schema = required_schema(tools, parallel=req.parallel_tool_calls is not False)
            return _ToolMode("required"), StructuredOutputsParams(json=schema)
        if isinstance(choice, dict):
            try:
                tool = named_tool(tools, choice)
            except ValueError as e:
                raise APIError(str(e), param="tool_choice") from None
            return (_ToolMode("named", name=tool["function"]["name"]),
                    StructuredOutputsParams(json=parameters_schema(tool)))
        raise APIError(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                       param="tool_choice")

    async def create_chat_completion(self, req: ChatCompletionRequest, ticket: Optional[Ticket] = None) -> Any:
        lora = self.check_model(req.model)
        structured, field = req.structured_outputs_params()
        mode, structured_for_tools = self._tool_mode(req, structured)
        if structured_for_tools is not structured:
            structured, field = structured_for_tools, "tools"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.to_sampling_params(max_tokens, structured, self.sampling_defaults)
        if params.n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(f"n may be at most {MAX_SEQUENCES_PER_REQUEST}", param="n")
        await self.check_structured_outputs(params, field)
        self.engine.check_admission(params.n)
        tools = req.tools if mode.kind != "none" else None
        prompt = await self.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                        tools=tools, chat_template_kwargs=req.chat_template_kwargs)
        if max_tokens is None and "max_tokens" in self.sampling_defaults:  # the model's default, within the room
            room = self.max_model_len - len(prompt.prompt_token_ids)
            params.max_tokens = max(1, min(self.sampling_defaults["max_tokens"], room))
        self.engine.processor.check_work([prompt], params)
        request_id = random_id("chatcmpl")
        kind = OutputKind.DELTA if req.stream else OutputKind.FINAL_ONLY
        if ticket is not None:  # the API key's tokens per minute
            ticket.reserve_for([len(prompt.prompt_token_ids)], params, self.max_model_len)
        stream = await self.engine.add_request(prompt, params, request_id, priority=req.priority, output_kind=kind,
                                               lora_request=lora, **engine_kwargs(ticket))
        if ticket is not None:
            ticket.track([stream])
        num_prompt = len(prompt.prompt_token_ids)
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(req, stream, request_id, created, num_prompt, params.n, mode,
                                                  self._reasoning(mode, params)),
                                     media_type="text/event-stream", background=BackgroundTask(stream.abort))
        try:
            final = None
            async for out in stream:
                final = out
        finally:
            stream.abort()
        choices = []
        completion_tokens = 0
        reasoning = self._reasoning(mode, params)
        for c in sorted(final.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            thinking, text = reasoning.extract(c.text) if reasoning is not None else (None, c.text)
            content, calls = mode.extract(text or "", c.finish_reason)
            if text is None and not calls:
                content = None  # all thinking (cut before its end)
            message = ChatResponseMessage(role="assistant", content=content, reasoning_content=thinking, tool_calls=[
                ToolCall(id=tool_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
                for call in calls])
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=message,
                logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
                finish_reason=mode.finish_reason(c.finish_reason, bool(calls)), stop_reason=c.stop_reason,
            ))
        response = ChatCompletionResponse(
            id=request_id, created=created, model=self.response_model(req.model), choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                            total_tokens=num_prompt + completion_tokens),
            prompt_logprobs=None if req.prompt_logprobs is None or final.prompt_logprobs is None
            else prompt_logprobs_field(final.prompt_logprobs, req.prompt_logprobs),
        )
        return JSONResponse(response.model_dump())

    def _logprobs(self, c: CompletionOutput, k: int, token_ids: Optional[list[int]] = None,
                  positions: Optional[list[PositionLogprobs]] = None) -> ChatLogProbs:
        token_ids = c.token_ids if token_ids is None else token_ids
        positions = (c.logprobs or []) if positions is None else positions
        content = []
        for token_id, position in zip(token_ids, positions):
            lp = position.get(token_id)
            token = self.token_str(token_id, lp)
            top = [ChatLogProb(token=(t := self.token_str(tok, e)), logprob=e.logprob,
                               bytes=list(t.encode("utf-8", errors="replace")))
                   for tok, e in self.top_entries(position, k)]
            content.append(ChatLogProbsContent(
                token=token, logprob=lp.logprob if lp is not None else float("-inf"),
                bytes=list(token.encode("utf-8", errors="replace")), top_logprobs=top,
            ))
        return ChatLogProbs(content=content)

    async def _stream(self, req: ChatCompletionRequest, stream: RequestStream, request_id: str, created: int,
                      num_prompt: int, n: int, mode: Optional[_ToolMode] = None,
                      reasoning: Optional[ReasoningParser] = None) -> AsyncIterator[str]:
        mode = mode or _ToolMode("none")
        thinking_streams = [ReasoningStream(reasoning) for _ in range(n)] if reasoning is not None else None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        completion_tokens = 0

        def chunk(index: int, delta: DeltaMessage, logprobs: Optional[ChatLogProbs] = None,
                  finish_reason: Optional[str] = None, stop_reason: Any = None) -> str:
            usage = None
            if continuous:
                usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                                  total_tokens=num_prompt + completion_tokens)
            return sse(ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.response_model(req.model), usage=usage,
                choices=[ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                    finish_reason=finish_reason, stop_reason=stop_reason)],
            ))

        finished = [False] * n
        auto_states = [StreamingToolState(mode.parser) for _ in range(n)] if mode.kind == "auto" else None
        required_readers = [RequiredCallStream() for _ in range(n)] if mode.kind == "required" else None
        num_calls = [0] * n

        # OpenAI's order for a tool call: id, type and function name first (empty arguments), then the arguments
        # (in one or more pieces).
        def call_start(index: int, i: int, name: str) -> str:
            return chunk(index, DeltaMessage(tool_calls=[DeltaToolCall(
                index=i, id=tool_call_id(), type="function", function=DeltaFunctionCall(name=name, arguments=""))]))

        def call_args(index: int, i: int, arguments: str, logprobs: Optional[ChatLogProbs] = None) -> str:
            return chunk(index, DeltaMessage(tool_calls=[DeltaToolCall(
                index=i, function=DeltaFunctionCall(arguments=arguments))]), logprobs)

        def call_chunks(index: int, calls: list[ParsedToolCall]) -> list[str]:
            out = []
            for call in calls:
                i = num_calls[index]
                num_calls[index] += 1
                out += [call_start(index, i, call.name), call_args(index, i, call.arguments)]
            return out

        try:
            for i in range(n):
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            async for _, ro in merge_streams([stream]):
                for c in ro.outputs:
                    if finished[c.index]:
                        continue
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    completion_tokens += len(c.token_ids)
                    logprobs = self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None
                    final = c.finish_reason is not None
                    text = c.text
                    if thinking_streams is not None:
                        thought, text = thinking_streams[c.index].feed(c.text, final)
                        if thought:
                            yield chunk(c.index, DeltaMessage(reasoning_content=thought), logprobs)
                            logprobs = None  # sent with the thinking
                    if mode.kind == "none":
                        if text or (c.token_ids and logprobs is not None) or (c.token_ids and not thinking_streams):
                            yield chunk(c.index, DeltaMessage(content=text), logprobs)
                    elif mode.kind == "named":
                        if num_calls[c.index] == 0 and (c.text or final):
                            num_calls[c.index] = 1
                            yield call_start(c.index, 0, mode.name)
                        if c.text:
                            yield call_args(c.index, 0, c.text, logprobs)
                    elif mode.kind == "required":  # each call's name, then its arguments as they grow
                        for i, name, args in required_readers[c.index].feed(c.text):
                            if name is not None:
                                num_calls[c.index] += 1
                                yield call_start(c.index, i, name)
                            else:
                                yield call_args(c.index, i, args, logprobs)
                    else:
                        content, calls = auto_states[c.index].feed(text, final)
                        if content:
                            yield chunk(c.index, DeltaMessage(content=content), logprobs)
                        for piece in call_chunks(c.index, calls):
                            yield piece
                    if final:
                        finished[c.index] = True
                        yield chunk(c.index, DeltaMessage(),
                                    finish_reason=mode.finish_reason(c.finish_reason, num_calls[c.index] > 0),
                                    stop_reason=c.stop_reason)
            if include_usage:
                yield sse(ChatCompletionStreamResponse(
                    id=request_id, created=created, model=self.response_model(req.model), choices=[],
                    usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                                    total_tokens=num_prompt + completion_tokens),
                ))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield sse_error(e)
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"
