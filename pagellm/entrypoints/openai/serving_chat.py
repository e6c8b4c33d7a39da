"""POST /v1/chat/completions: messages through the chat template, n, streaming, logprobs."""

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
    DeltaMessage,
    UsageInfo,
    random_id,
)
from pagellm.entrypoints.openai.serving_engine import APIError, OpenAIServing, merge_streams, sse, sse_error
from pagellm.outputs import CompletionOutput, PositionLogprobs


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, req: ChatCompletionRequest) -> Any:
        self.check_model(req.model)
        if req.tools:
            raise APIError("tools: tool calling is not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError("response_format: only {\"type\": \"text\"} is supported", param="response_format")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.to_sampling_params(max_tokens)
        if params.n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(f"n may be at most {MAX_SEQUENCES_PER_REQUEST}", param="n")
        self.engine.check_admission(params.n)
        prompt = await self.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message)
        request_id = random_id("chatcmpl")
        kind = OutputKind.DELTA if req.stream else OutputKind.FINAL_ONLY
        stream = await self.engine.add_request(prompt, params, request_id, priority=req.priority, output_kind=kind)
        num_prompt = len(prompt.prompt_token_ids)
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(req, stream, request_id, created, num_prompt, params.n),
                                     media_type="text/event-stream", background=BackgroundTask(stream.abort))
        try:
            final = None
            async for out in stream:
                final = out
        finally:
            stream.abort()
        choices = []
        completion_tokens = 0
        for c in sorted(final.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=ChatResponseMessage(role="assistant", content=c.text),
                logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            ))
        response = ChatCompletionResponse(
            id=request_id, created=created, model=self.model_name, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                            total_tokens=num_prompt + completion_tokens),
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
                      num_prompt: int, n: int) -> AsyncIterator[str]:
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
                id=request_id, created=created, model=self.model_name, usage=usage,
                choices=[ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                    finish_reason=finish_reason, stop_reason=stop_reason)],
            ))

        finished = [False] * n
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
                    if c.text or c.token_ids:
                        yield chunk(c.index, DeltaMessage(content=c.text), logprobs)
                    if c.finish_reason is not None:
                        finished[c.index] = True
                        yield chunk(c.index, DeltaMessage(), finish_reason=c.finish_reason,
                                    stop_reason=c.stop_reason)
            if include_usage:
                yield sse(ChatCompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[],
                    usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                                    total_tokens=num_prompt + completion_tokens),
                ))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield sse_error(e)
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"
