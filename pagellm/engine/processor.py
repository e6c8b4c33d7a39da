"""Processor: a user's prompt and SamplingParams -> validated core Requests (one per sequence of n).

Everything a user can get wrong is caught here as a ValueError naming the field, before the engine core
sees the request, so a bad request never disturbs the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from pagellm.config import ModelConfig
from pagellm.core.request import Request
from pagellm.sampling_params import SamplingParams

# A prompt: text, token ids, or vLLM's dict forms {"prompt": str} / {"prompt_token_ids": [...]}.
PromptType = Union[str, list[int], dict[str, Any]]


@dataclass
class ProcessedPrompt:
    prompt: Optional[str]
    prompt_token_ids: list[int]


def child_request_id(request_id: str, index: int, n: int) -> str:
    """The core's id of sequence `index` of a request with n sequences."""
    return request_id if n == 1 else f"{index}_{request_id}"


class Processor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any, eos_token_ids: Optional[set[int]] = None) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.eos_token_id: Optional[int] = getattr(tokenizer, "eos_token_id", None) if tokenizer else None
        if self.eos_token_id is None:  # no tokenizer (token-id prompts): the model config's EOS
            config_eos = getattr(model_config.hf_config, "eos_token_id", None)
            self.eos_token_id = config_eos[0] if isinstance(config_eos, (list, tuple)) and config_eos else config_eos
        extra = set(eos_token_ids or ())
        if self.eos_token_id is not None:
            extra.add(self.eos_token_id)
        self.eos_token_ids = extra

    def tokenize_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return self._check_ids(prompt["prompt_token_ids"], prompt.get("prompt"))
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            return self._check_ids(ids, prompt)
        if isinstance(prompt, (list, tuple)):
            return self._check_ids(list(prompt), None)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_ids(self, ids: Any, text: Optional[str]) -> ProcessedPrompt:
        if not isinstance(ids, (list, tuple)):
            raise ValueError("prompt_token_ids must be a list of integers")
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {t!r}")
        if not ids:
            raise ValueError("prompt must not be empty")
        max_len = self.model_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(
                f"prompt: the prompt has {len(ids)} tokens, but max_model_len is {max_len} "
                f"(the prompt and at least one generated token must fit)"
            )
        return ProcessedPrompt(prompt=text, prompt_token_ids=list(ids))

    def make_requests(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: Optional[float] = None,
        priority: int = 0,
        strict_max_tokens: bool = False,
    ) -> list[Request]:
        """One core Request per sequence; they share the prompt's KV blocks through the prefix cache."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        num_prompt = len(prompt.prompt_token_ids)
        room = self.model_config.max_model_len - num_prompt
        if params.max_tokens is not None and params.max_tokens > room and strict_max_tokens:
            raise ValueError(
                f"max_tokens: {params.max_tokens} new tokens do not fit: the prompt has {num_prompt} tokens and "
                f"max_model_len is {self.model_config.max_model_len} (at most {room} new tokens)"
            )
        if params.logit_bias:
            vocab = self.model_config.vocab_size
            bad = [t for t in params.logit_bias if t >= vocab]
            if bad:
                raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary (size {vocab})")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs: needs a tokenizer (the engine runs without one)")
            if params.min_tokens:
                # The min_tokens mask would forbid the EOS a finished grammar forces: no token would be left.
                raise ValueError("min_tokens: cannot be combined with structured_outputs")
            from pagellm.structured_output import validate_structured_outputs

            validate_structured_outputs(params.structured_outputs)
        arrival_time = time.time() if arrival_time is None else arrival_time
        requests = []
        for i in range(params.n):
            child = params.clone()
            child.n = 1
            child.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
            if child.seed is not None:
                child.seed = params.seed + i
            if i > 0:
                child.prompt_logprobs = None  # the sequences share one prompt: score it once
            child.all_stop_token_ids = set(child.stop_token_ids)
            if not child.ignore_eos:
                child.all_stop_token_ids |= self.eos_token_ids
            requests.append(
                Request(
                    request_id=child_request_id(request_id, i, params.n),
                    prompt_token_ids=prompt.prompt_token_ids,
                    sampling_params=child,
                    eos_token_id=self.eos_token_id,
                    arrival_time=arrival_time,
                    priority=priority,
                )
            )
        return requests
