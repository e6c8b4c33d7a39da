"""The models a server answers to: the base model and its LoRA adapters. A request's `model` field picks one;
/v1/models lists them; POST /v1/load_lora_adapter and /v1/unload_lora_adapter change the adapters at run time
(vLLM's bodies), when PAGELLM_ALLOW_RUNTIME_LORA_UPDATING (or vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING) is 1.

Adapters named at start (--lora-modules) get ids 1, 2, ...; a loaded one the next free id, so a name loaded
again after an unload never reuses the old weights or prefix-cache blocks. With several API processes
(--api-server-count) each holds its own list: load adapters at start there."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from pagellm.entrypoints.openai.protocol import ErrorResponse, ModelCard, ModelList
from pagellm.entrypoints.openai.serving_engine import APIError, to_api_error
from pagellm.lora.config import RUNTIME_UPDATE_ENV, runtime_updating_allowed
from pagellm.lora.request import LoRARequest


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: Optional[int] = None


class ServingModels:
    def __init__(self, base_name: str, engine: Any) -> None:
        self.base_name = base_name
        self.engine = engine
        lora_config = engine.config.lora_config
        self.lora_config = lora_config
        self.adapters: dict[str, LoRARequest] = {m.lora_name: m for m in (lora_config.modules if lora_config else [])}
        self._next_id = max((m.lora_int_id for m in self.adapters.values()), default=0) + 1

    def resolve(self, model: Optional[str]) -> Optional[LoRARequest]:
        """The adapter a request's `model` names (None: the base model); 404 for a name the server lacks."""
        if model is None or model == self.base_name:
            return None
        lora = self.adapters.get(model)
        if lora is None:
            raise APIError(f"The model `{model}` does not exist.", 404, "invalid_request_error", param="model",
                           code="model_not_found")
        return lora

    def cards(self) -> list[ModelCard]:
        mc = self.engine.model_config
        base = ModelCard(id=self.base_name, root=mc.model, max_model_len=mc.max_model_len)
        return [base] + [ModelCard(id=name, root=lora.lora_path, parent=self.base_name,
                                   max_model_len=mc.max_model_len) for name, lora in self.adapters.items()]

    def _check_updating(self) -> None:
        if self.lora_config is None:
            raise APIError("lora_name: the server runs without LoRA (start it with --enable-lora)", param="lora_name")
        if not runtime_updating_allowed():
            raise APIError(f"loading and unloading adapters at run time is off: set {RUNTIME_UPDATE_ENV[0]}=1 "
                           f"(or {RUNTIME_UPDATE_ENV[1]}=1) before starting the server", 404, "invalid_request_error",
                           code="not_found")

    def load(self, req: LoadLoRAAdapterRequest) -> str:
        self._check_updating()
        if not req.lora_name or req.lora_name == self.base_name:
            raise APIError(f"lora_name: {req.lora_name!r} cannot name an adapter", param="lora_name")
        if req.lora_name in self.adapters:
            raise APIError(f"lora_name: the adapter {req.lora_name!r} is already loaded", param="lora_name")
        try:
            from pagellm.lora.adapter import read_adapter_config

            read_adapter_config(req.lora_path, self.lora_config.max_lora_rank)
        except ValueError as e:
            raise to_api_error(e) from None  # 400, param: the field the message names (lora_path, r, ...)
        self.adapters[req.lora_name] = LoRARequest(req.lora_name, self._next_id, req.lora_path)
        self._next_id += 1
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload(self, req: UnloadLoRAAdapterRequest) -> str:
        self._check_updating()
        lora = self.adapters.get(req.lora_name)
        if lora is None or (req.lora_int_id is not None and req.lora_int_id != lora.lora_int_id):
            raise APIError(f"lora_name: no adapter {req.lora_name!r} is loaded", 404, param="lora_name",
                           code="model_not_found")
        del self.adapters[req.lora_name]
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."


def add_model_routes(app: FastAPI, models: ServingModels) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404)}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=models.cards())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors)
    async def get_model(model_id: str) -> Any:
        return next((c for c in models.cards() if c.id == model_id), None) or APIError(
            f"The model `{model_id}` does not exist.", 404, "invalid_request_error", "model",
            "model_not_found").response()

    # Success is a line of text (as vLLM answers), an error OpenAI's JSON envelope.
    text = {200: {"description": "what was done, as text", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **errors}

    @app.post("/v1/load_lora_adapter", responses=text)
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Any:
        return PlainTextResponse(models.load(request))

    @app.post("/v1/unload_lora_adapter", responses=text)
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Any:
        return PlainTextResponse(models.unload(request))
