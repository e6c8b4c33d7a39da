"""What the OpenAI handlers share: model-name checks, tokenization, errors, merging request streams."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, AsyncIterator, Optional, Sequence

import jinja2
from fastapi.responses import JSONResponse

from pagellm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineShuttingDownError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from pagellm.engine.processor import ProcessedPrompt
from pagellm.entrypoints.chat_utils import check_chat_template_kwargs, render_chat, template_text
from pagellm.multimodal.chat_parts import split_image_parts
from pagellm.entrypoints.openai.protocol import CalledTool, ChatMessage, ErrorInfo, ErrorResponse
from pagellm.lora.request import LoRARequest
from pagellm.outputs import Logprob, PositionLogprobs, RequestOutput
from pagellm.sampling_params import check_json_text

logger = logging.getLogger(__name__)

# A text prompt longer than max_model_len x this many characters cannot fit: refused before tokenizing it.
MAX_CHARS_PER_TOKEN = 32


class APIError(Exception):
    """An error the client caused or must know about, sent as OpenAI's error envelope."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        return error_response(self.message, self.status, self.type, self.param, self.code)


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


def error_response(message: str, status: int, type: str, param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)\b")


def to_api_error(e: BaseException) -> APIError:
    """Map an exception from validation or the engine to a status, type and (for 400s) the field's name."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(str(e), 429, "rate_limit_error", code="queue_full")
    if isinstance(e, EngineShuttingDownError):
        return APIError(str(e), 503, "service_unavailable", code="shutting_down")
    if isinstance(e, EngineDeadError):
        return APIError(f"the engine is not running: {e}", 503, "service_unavailable", code="engine_dead")
    if isinstance(e, RequestFailedError):
        return APIError(str(e), 500, "internal_error")
    if isinstance(e, ValueError):
        message = str(e)
        m = _FIELD.match(message)
        return APIError(message, 400, "invalid_request_error", param=m.group(1) if m else None)
    logger.exception("internal error", exc_info=e)
    return APIError("internal error (the server's log has the details)", 500, "internal_error")


_LOCATIONS = frozenset({"body", "query", "path", "header"})
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _readable_path(loc: Sequence[Any]) -> list[str]:
    """The steps of a pydantic error's location that a user can read: fields, keys and list indexes, without
    where FastAPI found them ("body") and the names pydantic gives union members ("list[int]", "str")."""
    steps = [str(p) for p in loc]
    if steps and steps[0] in _LOCATIONS:
        steps = steps[1:]
    return [p for p in steps if not (re.search(r"[^A-Za-z0-9_]", p) or p in _TYPE_NAMES)]


def _most_telling(errors: Sequence[dict]) -> dict:
    """Of pydantic's errors, the one that tells most: a value's problem (too short, not allowed) on the union
    member its type matched before a type mismatch on another member; then the deepest."""
    return min(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))


def validation_error(errors: Sequence[dict]) -> APIError:
    """A 400 from pydantic's errors on a request: `path: what is wrong`, param the top-level field. Input
    values are not echoed (they may be huge, or text that cannot be encoded)."""
    if not errors:
        return APIError("body: invalid request")
    err = _most_telling(errors)
    if err.get("type") == "value_error" and isinstance(err.get("ctx", {}).get("error"), ValueError):
        return to_api_error(err["ctx"]["error"])  # ours, from a validator: it starts with the field's name
    if err.get("type") == "json_invalid":
        return APIError("body: not valid JSON")
    path = _readable_path(err.get("loc", ()))
    message = f"{'.'.join(path) or 'body'}: {err.get('msg', 'invalid value')}"
    others = sorted({p[0] for p in map(_readable_path, (e.get("loc", ()) for e in errors)) if p} - set(path[:1]))
    if others:
        message += f" (also invalid: {', '.join(others)})"
    return APIError(message[:2000], param=path[0] if path else None)


def sse(data: Any) -> str:
    if hasattr(data, "model_dump_json"):
        return f"data: {data.model_dump_json()}\n\n"
    return f"data: {json.dumps(data)}\n\n"


def sse_error(e: BaseException) -> str:
    err = to_api_error(e)
    return sse(error_body(err.message, err.type, err.param, err.code))


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index of the stream, output) from several streams as they come. Leaving early cancels them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].abort()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_name: str, chat_template: Optional[str] = None,
                 models: Any = None) -> None:
        """`models`: the server's ServingModels (the base and its LoRA adapters), shared by every handler."""
        from pagellm.entrypoints.openai.serving_models import ServingModels

        self.engine = engine
        self.model_name = served_model_name
        self.models = models if models is not None else ServingModels(served_model_name, engine)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.model_config.max_model_len
        self.chat_template = chat_template
        # The model's default sampling parameters (generation_config.json), for the fields a request leaves out.
        self.sampling_defaults: dict[str, Any] = dict(engine.model_config.sampling_defaults)

    def check_model(self, model: Optional[str]) -> Optional[LoRARequest]:
        """The LoRA adapter the request's `model` names, None for the base model (404 for an unknown name)."""
        return self.models.resolve(model)

    def response_model(self, model: Optional[str]) -> str:
        """The `model` a response names: the adapter the request asked for, else the base model (as vLLM)."""
        return model if model is not None and model in self.models.adapters else self.model_name

    def _need_tokenizer(self, field: str) -> Any:
        if self.tokenizer is None:
            raise APIError(f"{field}: the server runs without a tokenizer (--skip-tokenizer-init): "
                           "send token ids", param=field)
        return self.tokenizer

    async def tokenize_text(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        tokenizer = self._need_tokenizer(field)
        if len(text) > self.max_model_len * MAX_CHARS_PER_TOKEN:
            raise APIError(f"{field}: the prompt has {len(text)} characters, far more than max_model_len "
                           f"({self.max_model_len} tokens) can hold", param=field)
        if len(text) > 4096:
            return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def process_prompt(self, prompt: Any, add_special_tokens: bool = True) -> ProcessedPrompt:
        """A text or token-id prompt -> checked token ids (ValueError naming `prompt` when it does not fit)."""
        if isinstance(prompt, str):
            ids = await self.tokenize_text(prompt, add_special_tokens)
            return self.engine.processor.tokenize_prompt({"prompt_token_ids": ids, "prompt": prompt})
        return self.engine.processor.tokenize_prompt({"prompt_token_ids": list(prompt)})

    # ---- chat ----

    async def check_structured_outputs(self, params: Any, field: Optional[str]) -> None:
        """Compile-check the request's grammar off the event loop (bounded time); a ValueError names `field`."""
        if params.structured_outputs is None:
            return
        from pagellm.entrypoints.openai.protocol import rename_field
        from pagellm.structured_output import validate_structured_outputs

        try:
            await asyncio.to_thread(validate_structured_outputs, params.structured_outputs)
        except ValueError as e:
            raise ValueError(rename_field(str(e), field or "structured_outputs")) from None

    def _template_renders_tool_calls(self) -> bool:
        return "tool_calls" in template_text(self.tokenizer, self.chat_template)

    def chat_messages(self, messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """The messages as chat templates take them (their number, roles and parts are checked by the model), and
        the URLs of their image parts with each part's field name: an image part became the model's placeholder
        text where it stood (multimodal/chat_parts.py); a model without images refuses them."""
        mm = self.engine.processor.mm
        parts = [{"content": [p.model_dump(exclude_none=True) for p in m.content] if isinstance(m.content, list)
                  else m.content} for m in messages]
        try:
            parts, urls = split_image_parts(parts, mm.placeholder if mm is not None else None)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None  # the message names the part
        result = []
        for m, flat in zip(messages, parts):
            content = flat["content"] or ""
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.role == "tool" and m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                message["tool_calls"] = self._tool_calls_for_template(m.tool_calls)
                if not self._template_renders_tool_calls():
                    # A template that ignores tool_calls would drop them: write them as Hermes text instead.
                    from pagellm.entrypoints.openai.tool_parsers import hermes_tool_call_text

                    calls = "\n".join(hermes_tool_call_text(c["function"]["name"], c["function"]["arguments"])
                                      for c in message["tool_calls"])
                    message["content"] = (content + "\n" if content else "") + calls
            result.append(message)
        return result, urls

    @staticmethod
    def _tool_calls_for_template(tool_calls: list[CalledTool]) -> list[dict[str, Any]]:
        """Assistant tool calls as chat templates expect them: arguments as a dict (templates apply tojson)."""
        out = []
        for c in tool_calls:
            args = c.function.arguments
            if isinstance(args, str):
                check_json_text("messages (tool_calls arguments)", args)
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise APIError("messages: tool_calls arguments must be JSON", param="messages") from None
            out.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        return out

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, tools: Optional[list[dict[str, Any]]] = None,
                          chat_template_kwargs: Optional[dict[str, Any]] = None) -> ProcessedPrompt:
        tokenizer = self._need_tokenizer("messages")
        chat_template_kwargs = check_chat_template_kwargs(chat_template_kwargs)
        conversation, image_urls = self.chat_messages(messages)
        total_chars = sum(len(m["content"]) for m in conversation)
        if total_chars > self.max_model_len * MAX_CHARS_PER_TOKEN:
            raise APIError(f"messages: {total_chars} characters, far more than max_model_len "
                           f"({self.max_model_len} tokens) can hold", param="messages")
        if continue_final_message and add_generation_prompt:
            raise APIError("continue_final_message: cannot be used with add_generation_prompt",
                           param="continue_final_message")
        try:
            ids = await asyncio.to_thread(render_chat, tokenizer, conversation, self.chat_template,
                                          add_generation_prompt, continue_final_message, tools, chat_template_kwargs)
        except APIError:
            raise
        except jinja2.TemplateError as e:  # the template's own raise_exception("...") and its syntax errors
            raise APIError(f"messages: cannot apply the chat template: {e.message}", param="messages") from None
        except Exception as e:  # noqa: BLE001 - what these messages do to the template, told without internals
            logger.warning("the chat template failed on a request: %r", e)
            raise APIError("messages: the chat template cannot render these messages", param="messages") from None
        if not image_urls:
            return self.engine.processor.tokenize_prompt({"prompt_token_ids": ids})
        images = await asyncio.to_thread(self._load_images, image_urls)
        try:
            return await asyncio.to_thread(self.engine.processor.tokenize_prompt,
                                           {"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
        except ValueError as e:  # told in the request's terms: its images are its messages' image parts
            raise APIError(re.sub(r"^multi_modal_data", "messages", str(e)), param="messages") from None

    def _load_images(self, urls: list[tuple[str, str]]) -> list[Any]:
        """The images of a chat request's image parts (a 400 whose message names the part when one is refused;
        its param is the top-level field, as every 400's)."""
        mm = self.engine.processor.mm
        try:
            mm.check_count(len(urls), "messages")
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        images = []
        for url, field in urls:
            try:
                images.append(mm.load_image(url, field))
            except ValueError as e:
                raise APIError(str(e), param="messages") from None
        return images

    # ---- logprob helpers ----

    def token_str(self, token_id: int, lp: Optional[Logprob] = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    @staticmethod
    def top_entries(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
        """The top-k of one position (rank 1..k), best first."""
        ranked = [(tok, lp) for tok, lp in position.items() if lp.rank is not None and lp.rank <= k]
        ranked.sort(key=lambda e: e[1].rank)
        return ranked[:k]
