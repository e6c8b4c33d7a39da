"""`pagellm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an AsyncLLM.

The engine core runs in its own process (engine/core_proc.py); this process parses requests, applies chat
templates, tokenizes, detokenizes and streams. SIGTERM (or Ctrl-C) drains: new requests get 503, requests in
flight finish (up to --shutdown-timeout; those still running then get a 503 `shutting_down` error, in the stream
as an error event), then the engine process(es) and this one exit with status 0, within EXIT_GRACE_S of the
timeout.

With --api-server-count N > 1, launcher.py starts the engine cores and N of these processes
(`run_api_server_process`), which accept on the one port (a socket each, SO_REUSEPORT) and each reach every core.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import pagellm
from pagellm.engine.async_llm import AsyncLLM
from pagellm.engine.core_client import SharedCores
from pagellm.engine_args import EngineArgs
from pagellm.entrypoints.openai.app_errors import install_error_handlers
from pagellm.entrypoints.openai.cli_args import work_caps_from_args
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.entrypoints.openai.serving_responses import OpenAIServingResponses, ResponseStore, add_routes
from pagellm.entrypoints.openai.serving_models import ServingModels, add_model_routes
from pagellm.entrypoints.openai.serving_engine import error_body, error_response, to_api_error
from pagellm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagellm.entrypoints.openai.tenants import KeyRing, RateLimited, Ticket, load_keys

logger = logging.getLogger("pagellm.server")

# Paths served without the API key (compared with the raw request path, exactly).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping", "/openapi.json", "/docs", "/redoc",
                        "/docs/oauth2-redirect"})
# The ASGI scope's key for a request's tenants.Ticket (absent on an open server and on OPEN_PATHS).
TICKET = "pagellm.ticket"
# Paths still served while draining for shutdown.
DRAIN_PATHS = frozenset({"/metrics", "/version"})
# After --shutdown-timeout: how long the requests cut then have to send their error responses, and how long
# uvicorn waits for the connections to close. The engine core gets what is left of EXIT_GRACE_S to exit
# before it is killed.
RESPONSE_GRACE_S = 0.5
EXIT_GRACE_S = 2.0


class ServerState:
    def __init__(self, keyring: Optional[KeyRing], max_body_bytes: int) -> None:
        self.keyring = keyring  # None: an open server
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.http_in_flight = 0


async def _send_error(send: Any, status: int, message: str, type: str, code: Optional[str] = None,
                      headers: Optional[list] = None) -> None:
    import json

    body = json.dumps(error_body(message, type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


# Before a 413 the rest of an oversized body is read and dropped, up to this many bytes: a server that closes the
# connection with unread bytes makes the kernel reset it, and a client still sending then loses the 413 (it
# reads a connection reset instead). It must come first: once the response is complete, uvicorn reads no more.
# Beyond this many bytes the connection is simply closed.
_DRAIN_BEFORE_413_BYTES = 64 * 2**20


async def _drain_body(receive: Any, already: int = 0) -> None:
    """Read the request body to its end (or to _DRAIN_BEFORE_413_BYTES, or the client's disconnect), dropping it."""
    seen = already
    while seen <= _DRAIN_BEFORE_413_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class GuardMiddleware:
    """Pure ASGI, outermost: drain (503), API key on the raw path (401), request body cap (413), the key's
    requests in flight (429), and the count of HTTP requests in flight. A request with a key carries its
    tenants.Ticket in scope[TICKET] to the handlers."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if isinstance(raw, bytes) else scope.get("path", "")
        if state.draining and path not in DRAIN_PATHS:
            return await _send_error(send, 503, "the server is shutting down", "service_unavailable",
                                     "shutting_down", [(b"connection", b"close")])
        key: Optional[int] = None
        if state.keyring is not None and path not in OPEN_PATHS:
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
                    break
            key = state.keyring.authenticate(given)
            if key is None:
                return await _send_error(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                         "invalid_request_error", "invalid_api_key")
        limit = state.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    if int(value) <= _DRAIN_BEFORE_413_BYTES:
                        await _drain_body(receive)
                    return await _send_error(send, 413, f"the request body exceeds {limit} bytes",
                                             "invalid_request_error", "body_too_large", [(b"connection", b"close")])
        received = 0
        over = False
        replaced = False
        body_done = False  # the client has sent its whole body

        async def capped_receive() -> Any:
            nonlocal received, over, body_done
            message = await receive()
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def send_413() -> None:
            """The 413 in place of whatever the app answers (or of nothing: it may just see a disconnect), after
            the rest of the body is read, so that the client gets the 413 rather than a connection reset."""
            nonlocal replaced
            replaced = True
            if not body_done:
                await _drain_body(receive, received)
            await _send_error(send, 413, f"the request body exceeds {limit} bytes", "invalid_request_error",
                              "body_too_large", [(b"connection", b"close")])

        async def guarded_send(message: Any) -> None:
            if over:
                if not replaced and message["type"] == "http.response.start":
                    await send_413()
                return
            await send(message)

        ticket: Optional[Ticket] = None
        if key is not None:
            try:
                ticket = state.keyring.admit(key)
            except RateLimited as e:
                return await _send_error(send, 429, e.message, e.type, e.code, e.headers())
            scope[TICKET] = ticket
        state.http_in_flight += 1
        try:
            await self.app(scope, capped_receive, guarded_send)
            if over and not replaced:
                await send_413()
        finally:
            state.http_in_flight -= 1
            if ticket is not None:
                ticket.close()


class ServerIndexMiddleware:
    """Names the API process that answered (`x-pagellm-api-server: i`) when several share the port: for
    debugging, and for tests that must reach each of them."""

    def __init__(self, app: Any, index: int) -> None:
        self.app = app
        self.header = (b"x-pagellm-api-server", str(index).encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_index(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_index)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _with_cancellation(request: Request, coro: Any) -> Any:
    """Run a handler; if the client disconnects first, cancel it (which aborts its engine requests)."""
    handler = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        handler.cancel()
        watcher.cancel()
        raise
    if handler in done:
        watcher.cancel()
        return handler.result()
    handler.cancel()
    try:
        await handler
    except BaseException:  # noqa: BLE001 - the client is gone
        pass
    return Response(status_code=499)


def _api_error_response(e: BaseException) -> JSONResponse:
    return to_api_error(e).response()


def build_app(engine: AsyncLLM, state: ServerState, chat_template: Optional[str] = None,
              enable_auto_tool_choice: Optional[bool] = None, tool_call_parser: Optional[str] = None,
              reasoning_parser: Optional[str] = None, store_responses: bool = True) -> tuple[Any, FastAPI]:
    """The ASGI app to serve (FastAPI wrapped in the guard middleware), and the FastAPI app. `store_responses`:
    keep /v1/responses answers in memory (not with several API processes, each with its own memory)."""
    model_name = engine.served_model_name
    app = FastAPI(title="pagellm OpenAI-compatible API", version=pagellm.__version__,
                  description="OpenAI-compatible completions, chat completions and responses served by pagellm.")
    models = ServingModels(model_name, engine)  # the base model and its LoRA adapters
    completion = OpenAIServingCompletion(engine, model_name, chat_template, models=models)
    chat = OpenAIServingChat(engine, model_name, chat_template, enable_auto_tool_choice=enable_auto_tool_choice,
                             tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser, models=models)
    tokenization = OpenAIServingTokenization(engine, model_name, chat_template, models=models)
    app.state.engine = engine
    app.state.server_state = state

    install_error_handlers(app)

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
    }

    def generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
        """A generation's answers: the whole response as JSON, or (stream: true) server-sent events."""
        event = {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "description": f"a {chunk.__name__} as JSON (or an error envelope), then [DONE]"}}}
        return {200: {"model": model, "description": "The response, or with `stream: true` server-sent events: "
                      f"one {chunk.__name__} per event, then `data: [DONE]`",
                      "content": {"text/event-stream": {"schema": event}}}, **error_responses}

    @app.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionStreamResponse))
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        try:
            return await _with_cancellation(raw_request, completion.create_completion(
                request, ticket=raw_request.scope.get(TICKET)))
        except Exception as e:  # noqa: BLE001
            return _api_error_response(e)

    @app.post("/v1/chat/completions",
              responses=generation_responses(ChatCompletionResponse, ChatCompletionStreamResponse))
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        try:
            return await _with_cancellation(raw_request, chat.create_chat_completion(
                request, ticket=raw_request.scope.get(TICKET)))
        except Exception as e:  # noqa: BLE001
            return _api_error_response(e)

    add_routes(app, OpenAIServingResponses(chat, ResponseStore() if store_responses else None), TICKET,
               _with_cancellation)

    add_model_routes(app, models)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses)
    async def tokenize(request: TokenizeRequest) -> Any:
        try:
            return (await tokenization.tokenize(request)).model_dump()
        except Exception as e:  # noqa: BLE001
            return _api_error_response(e)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses)
    async def detokenize(request: DetokenizeRequest) -> Any:
        try:
            return (await tokenization.detokenize(request)).model_dump()
        except Exception as e:  # noqa: BLE001
            return _api_error_response(e)

    health_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "The server and its engine are up: an empty body", "content": None},
        503: {"model": ErrorResponse, "description": "The engine is dead, or the server is shutting down"},
    }

    @app.get("/health", response_class=Response, responses=health_responses)
    async def health() -> Response:
        if state.draining:
            return error_response("the server is shutting down", 503, "service_unavailable", None,
                                  "shutting_down")
        if not engine.is_healthy:
            return error_response(f"the engine is not running: {engine.errored or 'stopped'}", 503,
                                  "service_unavailable", None, "engine_dead")
        return Response(status_code=200)

    @app.get("/ping", response_class=Response, responses=health_responses)
    async def ping() -> Response:
        return await health()

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=pagellm.__version__)

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "description": "Prometheus metrics (text exposition format; names start with `pagellm:`)",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        from pagellm.metrics import CONTENT_TYPE_LATEST

        if engine.metrics is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        if engine.is_healthy:
            await engine.refresh_stats(timeout=1.0)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = _openapi_of(app)
    return GuardMiddleware(app, state), app


def _openapi_of(app: FastAPI) -> Any:
    """FastAPI's /openapi.json without the 422 it lists for every operation with a body: this server answers
    a malformed body with 400 and OpenAI's error envelope (documented as 400)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    return openapi


# ---------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT starting a drain instead of closing connections under running requests.

    A second signal exits at once. The signal is not re-raised afterwards, so a drained server exits 0.
    Behind a launcher only SIGTERM counts: the launcher passes each SIGTERM or Ctrl-C on once, as SIGTERM.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, state: ServerState, shutdown_timeout: float,
                 exit_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        super().__init__(config)
        self.engine = engine
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_signals = exit_signals
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._draining = False
        self.exit_deadline: Optional[float] = None  # time.monotonic() by which every process should be gone

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig not in self.exit_signals:
            return
        if self._draining or self._loop is None:
            logger.warning("second signal: exiting now")
            self.should_exit = True
            self.force_exit = True
            return
        self._draining = True
        self.exit_deadline = time.monotonic() + self.shutdown_timeout + EXIT_GRACE_S
        logger.info("signal %s: draining (up to %.0f s), then exiting", sig, self.shutdown_timeout)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        self.state.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        if not await self.engine.drain(self.shutdown_timeout):
            # The engine has failed the requests still running with EngineShuttingDownError: their handlers
            # answer 503 shutting_down (or an error event in the stream) now, before uvicorn stops.
            logger.warning("shutdown timeout: %d requests still running are cut", self.engine.num_requests_in_flight)
            deadline = loop.time() + RESPONSE_GRACE_S
        # Let the last responses go out (their HTTP handlers finish after the engine's last output).
        while self.state.http_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.should_exit = True

    def core_exit_timeout(self) -> float:
        """How long the engine core may take to exit once uvicorn has stopped (then it is killed): what is left
        of EXIT_GRACE_S after the shutdown timeout, less half a second for this process's own exit."""
        if self.force_exit:
            return 1.0
        if self.exit_deadline is None:
            return 10.0
        return max(0.5, self.exit_deadline - time.monotonic() - 0.5)


def load_chat_template(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"chat_template: {value!r} is neither a file nor a Jinja template")
    return value


def make_keyring(args: argparse.Namespace) -> Optional[KeyRing]:
    """The server's API keys (None: an open server), made once per server: its API processes share it."""
    keys = load_keys(getattr(args, "api_key", None), getattr(args, "api_key_file", None))
    args.api_key = None  # only the keys' digests go on (to the API processes, with args)
    return KeyRing(keys, getattr(args, "shared_prefix_cache", False)) if keys else None


async def run_server(args: argparse.Namespace, shared: Optional[SharedCores] = None,
                     sock: Optional[socket.socket] = None, on_engine_ready: Optional[Callable[[], None]] = None,
                     keyring: Optional[KeyRing] = None) -> int:
    """Serve until drained. `keyring`: the API keys (None: an open server). `shared` and `sock`: one of several
    API processes (the engine cores and the listening socket are the launcher's, and so is the keyring, whose
    limits they share); `on_engine_ready` is called once every core is reached."""
    log_level = getattr(args, "log_level", "warning")
    engine_args = EngineArgs.from_cli_args(args)
    chat_template = load_chat_template(args.chat_template)
    engine = AsyncLLM(engine_args, max_queued_requests=args.max_queued_requests, log_level=log_level.upper(),
                      shared=shared, work_caps=work_caps_from_args(args))
    await engine.start()
    if on_engine_ready is not None:
        on_engine_ready()
    if keyring is not None and engine.metrics is not None:
        keyring.metrics = engine.metrics
        engine.metrics.add_keys({k.name: k.limit_names for k in keyring.keys})
    state = ServerState(keyring, args.max_request_body_bytes)
    asgi_app, _ = build_app(engine, state, chat_template, getattr(args, "enable_auto_tool_choice", None),
                            getattr(args, "tool_call_parser", None), getattr(args, "reasoning_parser", None),
                            store_responses=shared is None)
    exit_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    if shared is not None:
        asgi_app = ServerIndexMiddleware(asgi_app, shared.client_index)
        exit_signals = (signal.SIGTERM,)
    config = uvicorn.Config(
        asgi_app, host=args.host, port=args.port, log_level=log_level, access_log=log_level in ("debug", "info"),
        timeout_keep_alive=5, timeout_graceful_shutdown=RESPONSE_GRACE_S, lifespan="off",
    )
    server = DrainingServer(config, engine, state, args.shutdown_timeout, exit_signals)
    if shared is None:
        print(f"pagellm {pagellm.__version__}: serving {engine.served_model_name} on http://{args.host}:{args.port} "
              f"(engine core pid {', '.join(map(str, engine.core_pids))}, {engine.num_blocks} KV blocks)",
              file=sys.stderr, flush=True)
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        await engine.shutdown(timeout=server.core_exit_timeout())
    if not server.started:
        return 1
    return 0


def run_api_server_process(args: argparse.Namespace, shared: SharedCores, sock: socket.socket, ready: Any,
                           keyring: Optional[KeyRing]) -> None:
    """Entry point of one API process of several (multiprocessing spawn target of launcher.py); `ready`: the
    pipe on which it tells the launcher that it has reached every core; `keyring`: the launcher's (shared
    limits, the same cache salts)."""
    from pagellm.engine.core_proc import set_parent_death_signal

    set_parent_death_signal()  # the launcher gone, nobody would stop this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the launcher, which passes it on
    log_level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(level=log_level, format=f"%(levelname)s [api {shared.client_index}] %(name)s: %(message)s")
    code = 1
    try:
        code = asyncio.run(run_server(args, shared, sock, lambda: (ready.send_bytes(b"ready"), ready.close()),
                                      keyring))
    except Exception:
        logger.exception("API server %d failed", shared.client_index)
    # As `pagellm serve` does: skip the interpreter's teardown (seconds with torch loaded).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(args: argparse.Namespace) -> int:
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise ValueError("max_queued_requests must be non-negative")
    if args.shutdown_timeout < 0:
        raise ValueError("shutdown_timeout must be non-negative")
    if args.max_request_body_bytes < 1:
        raise ValueError("max_request_body_bytes must be positive")
    count = getattr(args, "api_server_count", 1)
    if count < 1:
        raise ValueError("api_server_count must be at least 1")
    keyring = make_keyring(args)  # bad keys fail here, before any process starts
    if EngineArgs.from_cli_args(args).resolved_runner() == "pooling":
        from pagellm.entrypoints.openai.serving_pooling import run_pooling_server

        return asyncio.run(run_pooling_server(args, EngineArgs.from_cli_args(args), keyring))
    if count > 1:
        from pagellm.entrypoints.openai.launcher import run_launcher

        return run_launcher(args, keyring)
    return asyncio.run(run_server(args, keyring=keyring))


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pagellm.entrypoints.openai.api_server ARGS` (vLLM's spelling) is `pagellm serve ARGS`."""
    from pagellm.entrypoints.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
