"""POST /v1/completions: text or token-id prompts (one or many), n, streaming, logprobs, echo."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Optional

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from pagellm.engine.async_llm import RequestStream
from pagellm.engine.output_processor import OutputKind
from pagellm.engine.processor import ProcessedPrompt
from pagellm.entrypoints.openai.protocol import (
    MAX_SEQUENCES_PER_REQUEST,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
    prompt_logprobs_field,
    random_id,
)
from pagellm.entrypoints.openai.serving_engine import APIError, OpenAIServing, merge_streams, sse, sse_error
from pagellm.entrypoints.openai.tenants import Ticket, engine_kwargs
from pagellm.outputs import CompletionOutput, PositionLogprobs, RequestOutput


def _prompt_list(prompt: Any) -> list[Any]:
    """str | list[str] | list[int] | list[list[int]] -> a list of prompts (str or list[int])."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


class _ChoiceLogprobs:
    """Builds OpenAI's legacy logprobs object for one choice, piece by piece (streaming) or at once."""

    def __init__(self, serving: OpenAIServing, k: int) -> None:
        self.serving = serving
        self.k = k
        self.offset = 0

    def _add(self, result: CompletionLogProbs, token_id: int, position: Optional[PositionLogprobs]) -> None:
        s = self.serving
        if position is None:  # the first prompt token: no logprob
            token = s.token_str(token_id)
            result.tokens.append(token)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            lp = position.get(token_id)
            token = s.token_str(token_id, lp)
            result.tokens.append(token)
            result.token_logprobs.append(lp.logprob if lp is not None else None)
            top = {s.token_str(t, e): e.logprob for t, e in s.top_entries(position, self.k)}
            if lp is not None:
                top.setdefault(token, lp.logprob)
            result.top_logprobs.append(top)
        result.text_offset.append(self.offset)
        self.offset += len(token)

    def build(self, token_ids: list[int], positions: list[Optional[PositionLogprobs]]) -> CompletionLogProbs:
        result = CompletionLogProbs()
        for token_id, position in zip(token_ids, positions):
            self._add(result, token_id, position)
        return result

    def extend(self, result: CompletionLogProbs, other: CompletionLogProbs) -> CompletionLogProbs:
        result.text_offset += other.text_offset
        result.token_logprobs += other.token_logprobs
        result.tokens += other.tokens
        result.top_logprobs += other.top_logprobs
        return result


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest, ticket: Optional[Ticket] = None) -> Any:
        lora = self.check_model(req.model)
        prompts = _prompt_list(req.prompt)  # never empty, at most MAX_PROMPTS_PER_REQUEST: the model checks
        echo_only = req.echo and req.max_tokens == 0
        params = req.to_sampling_params(1 if echo_only else req.max_tokens, self.sampling_defaults)
        if len(prompts) * params.num_sequences > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(f"n: prompts x n (or best_of) may be at most {MAX_SEQUENCES_PER_REQUEST}, got "
                           f"{len(prompts)} x {params.num_sequences}", param="n")
        await self.check_structured_outputs(params, req.structured_outputs_params()[1])
        self.engine.check_admission(len(prompts) * params.num_sequences)
        processed = [await self.process_prompt(p, req.add_special_tokens) for p in prompts]
        self.engine.processor.check_work(processed, params)
        request_id = random_id("cmpl")
        kind = OutputKind.DELTA if req.stream else OutputKind.FINAL_ONLY
        if ticket is not None:  # the API key's tokens per minute
            ticket.reserve_for([len(p.prompt_token_ids) for p in processed], params, self.max_model_len)
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(processed):
                streams.append(await self.engine.add_request(
                    prompt, params, f"{request_id}-{i}", priority=req.priority, output_kind=kind,
                    group_id=request_id,  # the prompts of one call share the scheduler's fair share
                    lora_request=lora, **engine_kwargs(ticket)))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        if ticket is not None:
            ticket.track(streams)
        ctx = _Context(self, req, request_id, processed, params.n, echo_only)
        if req.stream:
            return StreamingResponse(ctx.stream(streams), media_type="text/event-stream",
                                     background=BackgroundTask(_abort_all, streams))
        try:
            finals = await asyncio.gather(*(_last(s) for s in streams))
        finally:
            _abort_all(streams)
        return JSONResponse(ctx.full_response(finals).model_dump())


def _abort_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.abort()


async def _last(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    return last


class _Context:
    """One completion request's state while its response is built."""

    def __init__(self, serving: OpenAIServing, req: CompletionRequest, request_id: str,
                 prompts: list[ProcessedPrompt], n: int, echo_only: bool) -> None:
        self.serving = serving
        self.req = req
        self.request_id = request_id
        self.prompts = prompts
        self.n = n
        self.echo_only = echo_only
        self.created = int(time.time())
        self.model = serving.response_model(req.model)  # the adapter's name, or the base model's
        self._prompt_texts: dict[int, str] = {}
        self._prompt_lps: dict[int, list] = {}

    def prompt_text(self, i: int) -> str:
        if i not in self._prompt_texts:
            p = self.prompts[i]
            if p.prompt is not None:
                text = p.prompt
            elif self.serving.tokenizer is not None:
                text = self.serving.tokenizer.decode(p.prompt_token_ids)
            else:
                text = ""
            self._prompt_texts[i] = text
        return self._prompt_texts[i]

    def _prompt_logprobs(self, builder: _ChoiceLogprobs, i: int, ro: RequestOutput) -> CompletionLogProbs:
        ids = self.prompts[i].prompt_token_ids
        # In DELTA mode the prompt's logprobs come once, complete: keep them for the prompt's other choices.
        if ro.prompt_logprobs is not None and len(ro.prompt_logprobs) >= len(ids):
            self._prompt_lps[i] = ro.prompt_logprobs
        positions: list[Optional[PositionLogprobs]] = list(self._prompt_lps.get(i) or ro.prompt_logprobs or [])
        positions += [None] * (len(ids) - len(positions))
        return builder.build(ids, positions)

    def choice_parts(self, i: int, ro: RequestOutput, c: CompletionOutput, first: bool,
                     builder: Optional[_ChoiceLogprobs]) -> tuple[str, Optional[CompletionLogProbs], int]:
        """Text, logprobs and number of new tokens of one choice from one output (delta or final)."""
        text = "" if self.echo_only else c.text
        token_ids = [] if self.echo_only else c.token_ids
        logprobs = None
        if builder is not None:
            logprobs = CompletionLogProbs()
            if first and self.req.echo:
                builder.extend(logprobs, self._prompt_logprobs(builder, i, ro))
            if token_ids:
                builder.extend(logprobs, builder.build(token_ids, list(c.logprobs or [])))
        if first and self.req.echo:
            text = self.prompt_text(i) + text
        return text, logprobs, len(token_ids)

    def usage(self, completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(p.prompt_token_ids) for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    def full_response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        completion_tokens = 0
        k = self.req.returned_prompt_logprobs
        for i, ro in enumerate(finals):
            prompt_logprobs = None
            if k is not None and ro.prompt_logprobs is not None:
                prompt_logprobs = prompt_logprobs_field(ro.prompt_logprobs, k)
            for c in sorted(ro.outputs, key=lambda c: c.index):
                builder = _ChoiceLogprobs(self.serving, self.req.logprobs) if self.req.logprobs is not None \
                    else None
                text, logprobs, num_tokens = self.choice_parts(i, ro, c, True, builder)
                completion_tokens += num_tokens
                choices.append(CompletionResponseChoice(
                    index=i * self.n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason, prompt_logprobs=prompt_logprobs,
                ))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=self.usage(completion_tokens))

    async def stream(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        req = self.req
        num_choices = len(streams) * self.n
        started = [False] * num_choices
        finished = [False] * num_choices
        builders = [_ChoiceLogprobs(self.serving, req.logprobs) if req.logprobs is not None else None
                    for _ in range(num_choices)]
        completion_tokens = 0
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        try:
            async for i, ro in merge_streams(streams):
                for c in ro.outputs:
                    idx = i * self.n + c.index
                    if finished[idx]:
                        continue
                    first = not started[idx]
                    if not first and not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    text, logprobs, num_tokens = self.choice_parts(i, ro, c, first, builders[idx])
                    if first and not text and not num_tokens and c.finish_reason is None:
                        continue  # nothing to say yet (e.g. text held back by a possible stop string)
                    started[idx] = True
                    completion_tokens += num_tokens
                    finished[idx] = c.finish_reason is not None
                    chunk = CompletionStreamResponse(
                        id=self.request_id, created=self.created, model=self.model,
                        choices=[CompletionStreamChoice(index=idx, text=text, logprobs=logprobs,
                                                        finish_reason=c.finish_reason,
                                                        stop_reason=c.stop_reason)],
                        usage=self.usage(completion_tokens) if continuous else None,
                    )
                    yield sse(chunk)
            if include_usage:
                yield sse(CompletionStreamResponse(id=self.request_id, created=self.created,
                                                   model=self.model, choices=[],
                                                   usage=self.usage(completion_tokens)))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield sse_error(e)
        finally:
            _abort_all(streams)
        yield "data: [DONE]\n\n"
