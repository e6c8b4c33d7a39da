"""The messages of one engine step: what the scheduler asks the model runner to compute, and the answer.

The step message carries deltas. A request crosses to the runner once, when it is first scheduled (or resumed
after a preemption, since the runner forgets a preempted request): prompt, sampling parameters, block ids and,
for a resumed request, the tokens it already generated (`NewRequestData`). After that a step carries only what
changed (`CachedRequestData`): new block ids, where the step starts, how many tokens it computes, and token ids
only where the runner cannot know them. So the bytes of a decode step grow with the batch, never with the
context.

The runner keeps the tokens it was given and, on the device, the last token each request sampled. A decode's
input token is that last sampled token: the scheduler sends it when it has it (every rank of a pipeline then
has it on the host), and sends nothing when the step was scheduled before the token came back (async
scheduling): the runner takes it from the device.

msgspec structs (array-like: fields by position), encoded once per step and broadcast to every worker.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from pagellm.lora.request import LoRARequest
from pagellm.multimodal.inputs import MultiModalFeature
from pagellm.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the runner does not hold: everything it needs to compute and sample it."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]  # every block of the request, in order (the block table)
    num_computed_tokens: int  # position of this step's first token; tokens before it are in the KV cache
    num_scheduled_tokens: int
    output_token_ids: list[int] = []  # a resumed request's tokens so far (the prompt's continuation)
    lora_request: Optional[LoRARequest] = None  # its adapter (None: the base model)
    # The prompt's images: the runner encodes one when a step first computes part of its placeholder span.
    mm_features: list[MultiModalFeature] = []


class CachedRequestData(msgspec.Struct, array_like=True):
    """Requests the runner already holds, as columns (one entry per request)."""

    req_ids: list[str] = []
    new_block_ids: list[list[int]] = []  # blocks appended to the request's table since the runner last saw it
    num_computed_tokens: list[int] = []
    num_scheduled_tokens: list[int] = []
    # Token ids of this step's positions that the runner does not hold, ending at the step's last position
    # (a decode's input token when the scheduler knows it); empty when the runner takes the input from its own
    # last sampled token on the device (a decode scheduled ahead of it).
    new_token_ids: list[list[int]] = []
    # Speculative decoding: request id -> the draft tokens this step verifies. They are the last
    # len(drafts) positions of the request's scheduled tokens (after new_token_ids, which then end just before
    # them); absent for a request without drafts.
    spec_token_ids: dict[str, list[int]] = {}

    def add(self, req_id: str, new_block_ids: list[int], num_computed_tokens: int, num_scheduled_tokens: int,
            new_token_ids: list[int], spec_token_ids: Optional[list[int]] = None) -> None:
        self.req_ids.append(req_id)
        self.new_block_ids.append(new_block_ids)
        self.num_computed_tokens.append(num_computed_tokens)
        self.num_scheduled_tokens.append(num_scheduled_tokens)
        self.new_token_ids.append(new_token_ids)
        if spec_token_ids:
            self.spec_token_ids[req_id] = spec_token_ids

    def __len__(self) -> int:
        return len(self.req_ids)


class GrammarBitmask(msgspec.Struct, array_like=True):
    """Structured output: the allowed next tokens of the sampling requests with a grammar. Row i of `words`
    (int32, `width` words per row; bit t of a row allows token t) belongs to req_ids[i]."""

    req_ids: list[str]
    width: int
    words: bytes


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    new_reqs: list[NewRequestData] = []
    cached: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    num_batched_tokens: int = 0
    # Requests that left the engine (finished, aborted) since the last step: the runner drops their state.
    finished_req_ids: list[str] = []
    # Requests preempted this step: the runner drops them too; they come back as new requests.
    preempted_req_ids: list[str] = []
    grammar: Optional[GrammarBitmask] = None

    @property
    def num_reqs(self) -> int:
        return len(self.new_reqs) + len(self.cached)

    @property
    def is_empty(self) -> bool:
        return self.num_reqs == 0

    def scheduled_tokens(self) -> dict[str, int]:
        """Request id -> tokens computed this step."""
        counts = {r.req_id: r.num_scheduled_tokens for r in self.new_reqs}
        counts.update(zip(self.cached.req_ids, self.cached.num_scheduled_tokens))
        return counts


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one position: ids[0] is the sampled (or prompt) token, ids[1:] the top-k, best first."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Prompt logprobs computed in one step, as columns: row i is about prompt position first_position + i
    (column 0 the prompt token, then the top-k). The position lets the receiver drop repeats when a preempted
    request recomputes its prompt."""

    first_position: int
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[list[int]]

    def __len__(self) -> int:
        return len(self.token_ids)


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one forward pass produced. Row i is about req_ids[i], a request that sampled this step."""

    req_ids: list[str] = []
    # The tokens this step gives each request, in order: one for a decode or a finished prefill (several when a
    # step verifies drafted tokens).
    sampled_token_ids: list[list[int]] = []
    # Per request, one entry per sampled token; None where the request asked for no logprobs.
    logprobs: list[Optional[list[TokenLogprobs]]] = []
    # Prompt logprobs of the positions computed this step (position 0 has none and is never listed).
    prompt_logprobs: dict[str, PromptLogprobs] = {}
    # Speculative decoding: request id -> tokens guessed to follow this step's last sampled token (to verify in
    # the next step); only requests the runner speculates for.
    spec_token_ids: dict[str, list[int]] = {}


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's news after a step: new tokens, and why it finished if it did."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Union[int, str, None] = None
    new_logprobs: Optional[list[TokenLogprobs]] = None  # one per new token
    new_prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    # Set when the core could not take or run the request (refused on admission, its grammar failed to
    # compile): the client answers the request with this error.
    error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
