"""The one admission check: what a request must satisfy to enter the engine core, run by both sides.

The processor (in the LLM's or the API server's process) runs `check_request` on each EngineCoreRequest it
builds, before anything is queued, so a bad request is a ValueError naming the field, answered to its client.
The engine core decodes the same message and runs the same check before it builds its own `Request`: what
the API process lets through, the core takes.

A server also caps the work of one user request (`WorkCaps`, its flags): `check_request_work` runs in the
processor on the whole request, all its prompts and sequences at once, which only the API process sees (the
core gets them one sequence at a time, and bounds each step's share of them itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pagellm.engine.core_messages import EngineCoreRequest
from pagellm.multimodal.inputs import check_features
from pagellm.sampling_params import MAX_SEED, SamplingParams, check_range

@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit: the model's vocabulary and context, the same in every process."""

    vocab_size: int
    max_model_len: int

    @classmethod
    def from_model_config(cls, model_config: Any) -> "RequestLimits":
        return cls(vocab_size=model_config.vocab_size, max_model_len=model_config.max_model_len)


@dataclass(frozen=True)
class WorkCaps:
    """The most one user request may ask of a server (None: no cap; the offline LLM has none). The flags that
    set them (`pagellm serve --help`) say why their defaults are what they are."""

    max_tokens: Optional[int] = None  # tokens to generate: sequences (prompts x n) x max_tokens
    max_prompt_logprobs: Optional[int] = None  # prompt logprobs: (prompt_logprobs + 1) x prompt positions


def check_request_work(prompt_lens: Sequence[int], params: SamplingParams, caps: WorkCaps,
                       limits: RequestLimits) -> None:
    """One user request's work against the server's caps, as a ValueError naming the field: the tokens its
    sequences may generate (a max_tokens left out counts as the room each prompt leaves) and the prompt
    logprobs it asks for (each position gives the prompt token's and the top prompt_logprobs)."""
    n = params.num_sequences
    if caps.max_tokens is not None:
        rooms = [limits.max_model_len - p for p in prompt_lens]
        per_seq = [room if params.max_tokens is None else min(params.max_tokens, room) for room in rooms]
        total = n * sum(per_seq)
        if total > caps.max_tokens:
            each = f"max_tokens={params.max_tokens}" if params.max_tokens is not None else \
                f"up to {max(per_seq):,} tokens (max_tokens unset: the room the prompt leaves)"
            raise ValueError(
                f"max_tokens: {len(prompt_lens)} prompt(s) x n={n} x {each} = {total:,} tokens to generate, more "
                f"than this server takes in one request ({caps.max_tokens:,}, --max-tokens-per-request); lower "
                f"max_tokens, n or the number of prompts")
    k = params.prompt_logprobs
    if caps.max_prompt_logprobs is not None and k is not None:
        positions = sum(p - 1 for p in prompt_lens)  # the first token of a prompt has none
        total = (k + 1) * positions
        if total > caps.max_prompt_logprobs:
            raise ValueError(
                f"prompt_logprobs: {positions:,} prompt positions x {k + 1} logprobs (the prompt token's and the top "
                f"{k}) = {total:,}, more than this server returns for one request ({caps.max_prompt_logprobs:,}, "
                f"--max-prompt-logprobs-per-request); lower prompt_logprobs or send fewer or shorter prompts")


def wrap_seed(seed: int) -> int:
    """A seed inside SamplingParams' range (sequence i of a request with seed s draws with s + i)."""
    span = 2 * MAX_SEED + 1
    return (seed + MAX_SEED) % span - MAX_SEED


def check_prompt_token_ids(ids: Any, limits: RequestLimits) -> None:
    """A non-empty list of ints in the vocabulary, short enough to leave room for one generated token."""
    if not isinstance(ids, list):
        raise ValueError("prompt_token_ids must be a list of integers")
    if not ids:
        raise ValueError("prompt must not be empty")
    vocab = limits.vocab_size
    if not all(type(t) is int for t in ids) or min(ids) < 0 or max(ids) >= vocab:
        bad = next(t for t in ids if type(t) is not int or not 0 <= t < vocab)
        raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {bad!r}")
    if len(ids) >= limits.max_model_len:
        raise ValueError(
            f"prompt: the prompt has {len(ids)} tokens, but max_model_len is {limits.max_model_len} "
            f"(the prompt and at least one generated token must fit)"
        )


def check_request(req: EngineCoreRequest, limits: RequestLimits) -> None:
    """Everything the core relies on, as a ValueError whose message starts with the field's name."""
    check_prompt_token_ids(req.prompt_token_ids, limits)
    sp = req.sampling_params
    if not isinstance(sp, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
    sp._verify()  # the fields' own ranges, again: the processor changed max_tokens, seed and n
    if sp.n != 1:
        raise ValueError(f"n: an engine-core request is one sequence, got n={sp.n}")
    room = limits.max_model_len - len(req.prompt_token_ids)
    if sp.max_tokens is None or sp.max_tokens > room:
        raise ValueError(f"max_tokens: {sp.max_tokens} new tokens do not fit: the prompt has "
                         f"{len(req.prompt_token_ids)} tokens and max_model_len is {limits.max_model_len} "
                         f"(at most {room} new tokens)")
    if sp.logit_bias:
        bad = [t for t in sp.logit_bias if t >= limits.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary (size {limits.vocab_size})")
    if sp.structured_outputs is not None and sp.min_tokens:
        # The min_tokens mask would forbid the EOS a finished grammar forces: no token would be left.
        raise ValueError("min_tokens: cannot be combined with structured_outputs")
    for t in req.all_stop_token_ids:
        if type(t) is not int:
            raise ValueError(f"stop_token_ids must be integers, got {t!r}")
        check_range("stop_token_ids", t, key="token_id")
    if req.eos_token_id is not None:  # the model's, not the user's: one outside the vocabulary never matches
        check_range("eos_token_id", req.eos_token_id, key="token_id")
    if req.group_id is not None and not isinstance(req.group_id, str):
        raise ValueError(f"group_id must be a string, got {type(req.group_id).__name__}")
    if req.mm_features:
        check_features(req.mm_features, len(req.prompt_token_ids))
    if isinstance(req.priority, bool) or not isinstance(req.priority, int):
        raise ValueError(f"priority must be an integer, got {req.priority!r}")
    check_range("priority", req.priority)
