"""Request and response bodies of /v1/embeddings (OpenAI's shape) and /v1/score (vLLM's)."""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import Field

from pagellm.entrypoints.openai.protocol import OpenAIModel, RequestBody, UsageInfo

EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class EmbeddingRequest(RequestBody):
    model: Optional[str] = None
    input: EmbeddingInput = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="cut Matryoshka embeddings to this size (models that "
                                      "allow it; else a 400)")
    user: Optional[str] = None


class EmbeddingData(OpenAIModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # str: base64 of little-endian float32


class EmbeddingResponse(OpenAIModel):
    object: Literal["list"] = "list"
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class ScoreRequest(RequestBody):
    model: Optional[str] = None
    text_1: Union[str, list[str]] = Field(description="one text, or N texts paired with text_2's N")
    text_2: Union[str, list[str]] = Field(description="one text or N texts")


class ScoreData(OpenAIModel):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(OpenAIModel):
    object: Literal["list"] = "list"
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: UsageInfo
