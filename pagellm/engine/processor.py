"""Processor: a user's prompt and SamplingParams -> validated EngineCoreRequests (one per sequence of n).

Everything a user can get wrong is caught here as a ValueError naming the field, before the engine core
sees the request, so a bad request never disturbs the others. The core runs the same admission check
(core_request.check_request) on what it receives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from pagellm.config import ModelConfig
from pagellm.engine.admission import (
    RequestLimits,
    WorkCaps,
    check_prompt_token_ids,
    check_request,
    check_request_work,
    wrap_seed,
)
from pagellm.engine.core_messages import EngineCoreRequest
from pagellm.lora.adapter import read_adapter_config
from pagellm.lora.request import LoRARequest
from pagellm.model_executor.loader.source import resolve_eos_token_id
from pagellm.multimodal.inputs import MultiModalFeature
from pagellm.multimodal.processing import MultiModalProcessor, images_of
from pagellm.sampling_params import SamplingParams, check_text

# A prompt: text, token ids, or vLLM's dict forms {"prompt": str} / {"prompt_token_ids": [...]}, either with
# "multi_modal_data": {"image": PIL.Image | [PIL.Image, ...]} (one placeholder per image in the prompt).
PromptType = Union[str, list[int], dict[str, Any]]


@dataclass
class ProcessedPrompt:
    prompt: Optional[str]
    prompt_token_ids: list[int]  # image placeholders expanded into the model's image tokens
    mm_features: list[MultiModalFeature] = field(default_factory=list)  # one per image, in prompt order


def child_request_id(request_id: str, index: int, n: int) -> str:
    """The core's id of sequence `index` of a request with n sequences."""
    return request_id if n == 1 else f"{index}_{request_id}"


class Processor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any, eos_token_ids: Optional[set[int]] = None,
                 work_caps: Optional[WorkCaps] = None, lora_config: Any = None) -> None:
        """`work_caps`: a server's caps on one user request (check_work); none by default. `lora_config`: the
        engine's LoRA limits (None: LoRA off, requests with an adapter are refused)."""
        self.model_config = model_config
        self.lora_config = lora_config
        self.limits = RequestLimits.from_model_config(model_config)
        self.work_caps = work_caps or WorkCaps()
        self.tokenizer = tokenizer
        self.eos_token_id = resolve_eos_token_id(tokenizer, model_config.arch)
        extra = set(eos_token_ids or ())
        if self.eos_token_id is not None:
            extra.add(self.eos_token_id)
        self.eos_token_ids = extra
        # A multimodal model's image processor (None: the model reads text only).
        self.mm: Optional[MultiModalProcessor] = MultiModalProcessor.for_model(
            model_config, getattr(model_config, "multimodal_config", None))

    def tokenize_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            return self._with_images(prompt)
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
            check_text("prompt", prompt)
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            return self._check_ids(ids, prompt)
        if isinstance(prompt, (list, tuple)):
            return self._check_ids(list(prompt), None)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _with_images(self, prompt: dict[str, Any]) -> ProcessedPrompt:
        """A dict prompt with multi_modal_data: tokenized, then each image placeholder expanded."""
        images = images_of(prompt["multi_modal_data"])
        text_only = {k: v for k, v in prompt.items() if k != "multi_modal_data"}
        if not images:
            return self.tokenize_prompt(text_only)
        if self.mm is None:
            raise ValueError("multi_modal_data: this model does not take images")
        self.mm.check_count(len(images), "multi_modal_data")
        if "prompt_token_ids" in text_only:
            ids, text = text_only["prompt_token_ids"], text_only.get("prompt")
        elif isinstance(text_only.get("prompt"), str) and self.tokenizer is not None:
            text = text_only["prompt"]
            check_text("prompt", text)
            ids = self.tokenizer.encode(text, add_special_tokens=True)
        else:
            return self.tokenize_prompt(text_only)  # its own error
        if not isinstance(ids, (list, tuple)):
            raise ValueError("prompt_token_ids must be a list of integers")
        ids, features = self.mm.process(list(ids), images)
        processed = self._check_ids(ids, text, sum(f.length for f in features))
        processed.mm_features = features
        return processed

    def _check_ids(self, ids: Any, text: Optional[str], num_image_tokens: int = 0) -> ProcessedPrompt:
        """`num_image_tokens`: what the prompt's images expanded to; a vision model's image token anywhere else
        would reach the model without an image."""
        if not isinstance(ids, (list, tuple)):
            raise ValueError("prompt_token_ids must be a list of integers")
        ids = list(ids)
        check_prompt_token_ids(ids, self.limits)
        if self.mm is not None and ids.count(self.mm.image_token_id) != num_image_tokens:
            raise ValueError(f"prompt: holds image token {self.mm.image_token_id} without an image for it (one "
                             f"placeholder {self.mm.placeholder} per image of multi_modal_data)")
        return ProcessedPrompt(prompt=text, prompt_token_ids=ids)

    def check_work(self, prompts: Sequence[ProcessedPrompt], params: SamplingParams) -> None:
        """The work caps on one user request, all its prompts at once (ValueError naming the field)."""
        check_request_work([len(p.prompt_token_ids) for p in prompts], params, self.work_caps, self.limits)

    def check_lora(self, lora_request: Optional[LoRARequest]) -> None:
        """The adapter can be served: LoRA on, its folder complete, its rank within max_lora_rank."""
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora_config is None:
            raise ValueError("lora_request: LoRA is not enabled (start the engine with enable_lora=True / "
                             "--enable-lora)")
        read_adapter_config(lora_request.lora_path, self.lora_config.max_lora_rank)

    def make_requests(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: Optional[float] = None,
        priority: int = 0,
        strict_max_tokens: bool = False,
        cache_salt: Optional[str] = None,
        group_id: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> list[EngineCoreRequest]:
        """One engine-core request per sequence (they share the prompt's KV blocks through the prefix cache),
        each passed through the admission check that the core runs too. The sequences form one group for the
        scheduler's fairness: `group_id`, or request_id (the prompts of one /v1/completions call share one).

        `strict_max_tokens`: a max_tokens beyond the room the prompt leaves is an error (the server), instead of
        being cut to that room (the offline LLM, like vLLM's)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        num_prompt = len(prompt.prompt_token_ids)
        limits = self.limits
        room = limits.max_model_len - num_prompt
        if params.max_tokens is not None and params.max_tokens > room and strict_max_tokens:
            raise ValueError(
                f"max_tokens: {params.max_tokens} new tokens do not fit: the prompt has {num_prompt} tokens and "
                f"max_model_len is {limits.max_model_len} (at most {room} new tokens)"
            )
        if params.min_tokens > room:
            raise ValueError(
                f"min_tokens: {params.min_tokens} new tokens do not fit: the prompt has {num_prompt} tokens and "
                f"max_model_len is {limits.max_model_len} (at most {room} new tokens)"
            )
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs: needs a tokenizer (the engine runs without one)")
            from pagellm.structured_output import validate_structured_outputs

            validate_structured_outputs(params.structured_outputs)
        self.check_lora(lora_request)
        arrival_time = time.time() if arrival_time is None else arrival_time
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        requests = []
        num_seqs = params.num_sequences
        for i in range(num_seqs):
            child = params.clone()
            child.n, child.best_of = 1, None
            if num_seqs > params.n and child.logprobs is None:
                child.logprobs = 0  # best_of ranks the sequences by the sampled tokens' cumulative logprob
            child.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
            if child.seed is not None:
                child.seed = wrap_seed(params.seed + i)
            if i > 0:
                child.prompt_logprobs = None  # the sequences share one prompt: score it once
            req = EngineCoreRequest(
                request_id=child_request_id(request_id, i, num_seqs),
                prompt_token_ids=prompt.prompt_token_ids,
                sampling_params=child,
                all_stop_token_ids=sorted(stop_ids),
                eos_token_id=self.eos_token_id,
                arrival_time=arrival_time,
                priority=priority,
                cache_salt=cache_salt,
                group_id=request_id if group_id is None else group_id,
                lora_request=lora_request,
                mm_features=prompt.mm_features,
            )
            check_request(req, limits)
            requests.append(req)
        return requests
