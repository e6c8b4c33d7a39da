"""The error handlers every pagellm FastAPI app installs: each failure answers an OpenAI-style error object."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagellm.entrypoints.openai.serving_engine import APIError, error_response, to_api_error, validation_error


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        kind = "invalid_request_error" if status < 500 else "internal_error"
        code = "not_found" if status == 404 else None
        message = str(exc.detail)
        if status == 400:  # FastAPI's: the body did not parse (e.g. nested deeper than json.loads recurses)
            message = f"body: {message}"
        response = error_response(message, status, kind, None, code)
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()
