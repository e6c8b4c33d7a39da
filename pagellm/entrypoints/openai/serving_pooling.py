"""/v1/embeddings (OpenAI's shape) and /v1/score (vLLM's) over an AsyncPoolingEngine, and the app that serves
them when `pagellm serve` runs a pooling model (with /v1/models, /health, /version; the same API keys, body cap
and drain as the generation server)."""

from __future__ import annotations

import base64
import sys
import uuid
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Response

import pagellm
from pagellm.entrypoints.llm_pooling import cosine, score_pairs
from pagellm.entrypoints.openai.app_errors import install_error_handlers
from pagellm.entrypoints.openai.protocol import ErrorResponse, ModelCard, ModelList, UsageInfo, VersionResponse
from pagellm.entrypoints.openai.protocol_pooling import (EmbeddingData, EmbeddingRequest, EmbeddingResponse,
                                                         ScoreData, ScoreRequest, ScoreResponse)
from pagellm.entrypoints.openai.serving_engine import error_response
from pagellm.pooling.async_engine import AsyncPoolingEngine


def _prompts_of(value: Any) -> list[Any]:
    """OpenAI's `input`: one string, one token-id list, or a list of either."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    return list(value)


class OpenAIServingPooling:
    def __init__(self, engine: AsyncPoolingEngine) -> None:
        self.engine = engine
        self.model_name = engine.served_model_name

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise LookupError(model)

    async def create_embedding(self, request: EmbeddingRequest) -> EmbeddingResponse:
        token_ids = self.engine.validate(_prompts_of(request.input), request.dimensions, "input")
        outputs = await self.engine.encode(token_ids, request.dimensions)
        data = []
        for i, out in enumerate(outputs):
            vector = out.outputs.data
            embedding: Any = vector.tolist() if request.encoding_format == "float" else \
                base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
            data.append(EmbeddingData(index=i, embedding=embedding))
        n = sum(len(t) for t in token_ids)
        return EmbeddingResponse(id=f"embd-{uuid.uuid4().hex}", model=self.model_name, data=data,
                                 usage=UsageInfo(prompt_tokens=n, total_tokens=n))

    async def create_score(self, request: ScoreRequest) -> ScoreResponse:
        first = [request.text_1] if isinstance(request.text_1, str) else request.text_1
        second = [request.text_2] if isinstance(request.text_2, str) else request.text_2
        if not first:
            raise ValueError("text_1: the input is empty")
        pairs = score_pairs(len(first), len(second))
        ids_1 = self.engine.validate(first, None, "text_1")
        ids_2 = self.engine.validate(second, None, "text_2")
        outs = await self.engine.encode(ids_1 + ids_2)
        a, b = outs[:len(first)], outs[len(first):]
        data = [ScoreData(index=k, score=cosine(a[i].outputs.data, b[j].outputs.data))
                for k, (i, j) in enumerate(pairs)]
        n = sum(map(len, ids_1 + ids_2))
        return ScoreResponse(id=f"score-{uuid.uuid4().hex}", model=self.model_name, data=data,
                             usage=UsageInfo(prompt_tokens=n, total_tokens=n))


def build_pooling_app(engine: AsyncPoolingEngine, state: Any) -> tuple[Any, FastAPI]:
    """(the ASGI app to serve, wrapped in the guard middleware; the FastAPI app)."""
    from pagellm.entrypoints.openai.api_server import GuardMiddleware

    app = FastAPI(title="pagellm OpenAI-compatible API (pooling model)", version=pagellm.__version__,
                  description="OpenAI-compatible embeddings and vLLM-style scores served by pagellm.")
    install_error_handlers(app)
    serving = OpenAIServingPooling(engine)
    mc = engine.model_config
    errors: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 413, 429, 500)}

    def not_found(model: str) -> Any:
        return error_response(f"The model `{model}` does not exist.", 404, "invalid_request_error", "model",
                              "model_not_found")

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors)
    async def create_embedding(request: EmbeddingRequest) -> Any:
        try:
            serving.check_model(request.model)
        except LookupError:
            return not_found(str(request.model))
        return await serving.create_embedding(request)

    @app.post("/v1/score", response_model=ScoreResponse, responses=errors)
    async def create_score(request: ScoreRequest) -> Any:
        try:
            serving.check_model(request.model)
        except LookupError:
            return not_found(str(request.model))
        return await serving.create_score(request)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=serving.model_name, root=mc.model,
                                         max_model_len=engine.engine.max_model_len)])

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        if state.draining or not engine.is_healthy:
            return error_response("the server is shutting down" if state.draining else "the engine stopped", 503,
                                  "service_unavailable", None, None)
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=pagellm.__version__)

    return GuardMiddleware(app, state), app


async def run_pooling_server(args: Any, engine_args: Any, keyring: Any) -> int:
    """`pagellm serve` for a pooling model: the engine runs in this process (no engine-core process)."""
    from pagellm.entrypoints.openai.api_server import ServerState

    if getattr(args, "api_server_count", 1) not in (None, 1) or engine_args.data_parallel_size != 1:
        raise ValueError("runner: a pooling model is served by one process (api_server_count 1, "
                         "data_parallel_size 1)")
    engine = AsyncPoolingEngine(engine_args.create_engine_config())
    state = ServerState(keyring, args.max_request_body_bytes)
    asgi_app, _ = build_pooling_app(engine, state)
    log_level = getattr(args, "log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(asgi_app, host=args.host, port=args.port, log_level=log_level,
                                           timeout_keep_alive=5, lifespan="off"))
    print(f"pagellm {pagellm.__version__}: serving {engine.served_model_name} (pooling: /v1/embeddings, /v1/score) "
          f"on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        await server.serve()
    finally:
        await engine.shutdown()
    return 0 if server.started else 1
