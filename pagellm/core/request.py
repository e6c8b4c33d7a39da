"""Request: one sequence's token ids and its progress through the engine.

Scheduling is one rule: move `num_computed_tokens` toward `num_tokens`. Prefill, chunked prefill, prefix-cache
hits and decode are all instances of it.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Iterable, Optional, Union

from pagellm.core.block_pool import BlockHash, hash_block_tokens
from pagellm.lora.request import LoRARequest
from pagellm.multimodal.inputs import MultiModalFeature, block_mm_keys
from pagellm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after PREEMPTED is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> Optional[str]:
        """The OpenAI finish_reason of a finished status ("stop" | "length" | "abort"), None if not finished."""
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence. `prompt_token_ids` is shared, never mutated (the n sequences of one prompt share it)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: Optional[int],
        arrival_time: Optional[float] = None,
        priority: int = 0,
        cache_salt: Optional[str] = None,
        group_id: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
        mm_features: Optional[list[MultiModalFeature]] = None,
    ) -> None:
        self.request_id = request_id
        # The user request this sequence is part of (the n sequences of one request, the prompts of one
        # /v1/completions call): the scheduler shares seats fairly between groups. Alone, its own group.
        self.group_id = request_id if group_id is None else group_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.queued_at = time.monotonic()  # when this process got it (queue times are measured from here)
        self.priority = priority  # lower is served first; ties by arrival_time
        # Anything besides the token ids that changes the KV (cache salt, LoRA adapter): part of every block hash,
        # so two adapters (or an adapter and the base) never share a block.
        self.lora_request = lora_request
        self.extra_keys: Any = cache_salt if lora_request is None else (cache_salt, lora_request.cache_key)
        # Images of the prompt (their placeholder spans and hashes): a block their tokens occupy hashes them too.
        self.mm_features: list[MultiModalFeature] = mm_features or []

        self.status = RequestStatus.WAITING
        self.stop_reason: Union[int, str, None] = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit tokens at the first schedule; -1 before it
        self.num_preemptions = 0
        self.admitted_seq = 0  # the scheduler's count of admissions when it last admitted this request
        self.output_token_ids: list[int] = []
        # Speculative decoding: tokens the runner guessed after the last one, to verify in the next step. Never
        # part of the token ids (nor of the block hashes) until the model accepts them.
        self.spec_token_ids: list[int] = []
        self.speculating = False  # the runner proposed drafts after its last step (not scheduled ahead)
        self._all_token_ids: list[int] = list(prompt_token_ids)
        # What the model runner holds of this request (the scheduler sends it deltas): whether it holds it at all,
        # how many of its blocks and tokens it was given.
        self.runner_holds = False
        self.num_blocks_sent = 0
        self.num_tokens_sent = 0
        # Hash of every full block of all_token_ids, in order; kept up to date once a block size is set.
        self.block_hashes: list[BlockHash] = []
        self._block_size: Optional[int] = None

    # ---- token ids ----

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + output; a live list: read it, never mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: Union[int, Iterable[int]]) -> None:
        if isinstance(token_ids, int):  # one token a step: the hot path, kept cheap
            self.output_token_ids.append(token_ids)
            self._all_token_ids.append(token_ids)
            bs = self._block_size
            if bs is not None and len(self._all_token_ids) % bs == 0:
                self._update_block_hashes()
            return
        else:
            token_ids = list(token_ids)
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
        if self._block_size is not None:
            self._update_block_hashes()

    # ---- block hashes (prefix caching) ----

    @property
    def block_size(self) -> Optional[int]:
        return self._block_size

    def enable_block_hashing(self, block_size: int) -> None:
        """Hash the full blocks now and keep hashing as tokens are appended. Idempotent for one block size."""
        if self._block_size == block_size:
            return
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._block_size = block_size
        self.block_hashes = []
        self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        bs = self._block_size
        assert bs is not None
        tokens = self._all_token_ids
        hashes = self.block_hashes
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), len(tokens) // bs):
            extra = self.extra_keys
            if self.mm_features:
                images = block_mm_keys(self.mm_features, i * bs, (i + 1) * bs)
                if images:
                    extra = (extra, images)
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], extra)
            hashes.append(parent)

    # ---- status ----

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> Optional[str]:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, out={self.num_output_tokens})"
        )
