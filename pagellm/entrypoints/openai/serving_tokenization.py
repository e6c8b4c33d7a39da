"""POST /tokenize and POST /detokenize."""

from __future__ import annotations

import asyncio

from pagellm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagellm.entrypoints.openai.serving_engine import APIError, OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("prompt: give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            tokens = (await self.chat_prompt(req.messages, req.add_generation_prompt)).prompt_token_ids
        else:
            tokens = await self.tokenize_text(req.prompt, req.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        tokenizer = self._need_tokenizer("tokens")
        vocab = self.engine.model_config.vocab_size
        for t in req.tokens:
            if not 0 <= t < vocab:
                raise APIError(f"tokens must be token ids in [0, {vocab}), got {t}", param="tokens")
        if len(req.tokens) > 4096:  # long: decode off the event loop
            return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, req.tokens))
        return DetokenizeResponse(prompt=tokenizer.decode(req.tokens))
