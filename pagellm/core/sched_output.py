"""The messages of one engine step: what the scheduler asks the model runner to compute, and the answer.

Plain dataclasses of Python lists, so that they cross a process boundary (msgpack) as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pagellm.sampling_params import SamplingParams


# The input token of a decode scheduled while the step that samples it is still running (async scheduling):
# the model runner takes it from that step's sampled tokens on the device.
PLACEHOLDER_TOKEN = -1


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    req_id: str
    token_ids: list[int]  # the tokens computed this step: all_token_ids[num_computed_tokens:+len], or
    # [PLACEHOLDER_TOKEN] for a decode whose input token the previous step is still sampling
    num_computed_tokens: int  # position of token_ids[0]; tokens before it are in the KV cache
    block_ids: list[int]  # every block of the request, in order (the block table)
    sampling_params: SamplingParams
    prompt_token_ids: list[int]  # for penalties and prompt logprobs
    output_token_ids: list[int]  # tokens generated so far, for penalties
    do_sample: bool  # the step reaches the request's last known token: sample one new token
    # Structured output: the allowed next tokens (int32 numpy row of ceil(V / 32) words; bit t allows token t),
    # set by the engine core after schedule() for sampling requests with a grammar; None: no constraint.
    grammar_bitmask: Optional[Any] = None

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Requests that left the engine (finished, aborted) since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Logprobs at one position: ids[0] is the sampled (or prompt) token, ids[1:] the top-k, best first."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class PromptLogprobs:
    """Prompt logprobs computed in one step: entries[i] is about prompt position first_position + i.

    The position lets the receiver drop repeats when a preempted request recomputes its prompt.
    """

    first_position: int
    entries: list[TokenLogprobs]


@dataclass
class ModelRunnerOutput:
    """What one forward pass produced, by request id."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Prompt logprobs of the positions computed this step (position 0 has none and is never listed).
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's news after a step: new tokens, and why it finished if it did."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Union[int, str, None] = None
    new_logprobs: Optional[TokenLogprobs] = None
    new_prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    # Set when the core could not take or run the request (refused on admission, its grammar failed to
    # compile): the client answers the request with this error.
    error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
