"""What crosses between the engine core and its clients: msgpack (msgspec) structs, never pickles.

    client  --input-->   core: EngineCoreRequest | Abort | Stop | Utility | Shutdown
    client  <--output--  core: Ready | Outputs (+ CoreStats) | UtilityResult | CoreError

Tagged structs, so one decoder per direction takes a Union of them.

Behind several API processes (`--api-server-count`), each core takes input from every one of them: a message
names its sender (`client_index`), and the core sends a request's outputs and a utility call's result only
to that client; stats, Ready and CoreError go to every client. The in-process engine (LLMEngine) hands
the same EngineCoreRequest and EngineCoreOutput objects to its EngineCore without encoding them.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec

from pagellm.core.sched_output import EngineCoreOutput
from pagellm.lora.request import LoRARequest
from pagellm.multimodal.inputs import MultiModalFeature
from pagellm.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, tag="add", omit_defaults=True):
    """One sequence of a user request, ready for the scheduler: built by the processor, checked by
    admission.check_request on both sides."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # n == 1, max_tokens set
    # EOS, the generation config's stop ids and the user's stop_token_ids (SamplingParams.__post_init__ resets
    # its own all_stop_token_ids to the user's, so the resolved set travels beside it).
    all_stop_token_ids: list[int]
    eos_token_id: Optional[int]
    arrival_time: float
    priority: int = 0
    cache_salt: Optional[str] = None
    client_index: int = 0  # which API process sent it (its outputs go back there)
    # The user request it belongs to (the n sequences of one request, the prompts of one /v1/completions call):
    # the scheduler shares seats fairly between groups. None: its own group.
    group_id: Optional[str] = None
    lora_request: Optional[LoRARequest] = None  # the adapter it runs with (None: the base model)
    mm_features: list[MultiModalFeature] = []  # the prompt's images (pagellm/multimodal), in prompt order

    def params(self) -> SamplingParams:
        """The sampling parameters with the resolved stop ids in place."""
        sp = self.sampling_params
        sp.all_stop_token_ids = set(self.all_stop_token_ids)
        return sp


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]
    client_index: int = 0  # a core applies it only to the sender's own requests


class Stop(msgspec.Struct, tag="stop"):
    """Requests that met a stop string (found by the client's detokenizer)."""

    request_ids: list[str]
    client_index: int = 0


class Utility(msgspec.Struct, tag="utility"):
    call_id: int
    method: str
    args: list[Any] = []
    client_index: int = 0


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


InputMessage = Union[EngineCoreRequest, Abort, Stop, Utility, Shutdown]


class CoreStats(msgspec.Struct):
    """The core's numbers for /metrics and admission. Counters are cumulative since start; queue_times are
    the ones new since the last stats."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    queue_times: list[float] = []
    # Speculative decoding: verify steps of a request, draft tokens verified, draft tokens accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_per_pos: list[int] = []  # accepted draft tokens by their position in the draft


class Ready(msgspec.Struct, tag="ready"):
    num_blocks: int
    pid: int


class Outputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: Optional[CoreStats] = None


class UtilityResult(msgspec.Struct, tag="utility_result"):
    call_id: int
    result: Any = None
    error: Optional[str] = None


class CoreError(msgspec.Struct, tag="error"):
    message: str


OutputMessage = Union[Ready, Outputs, UtilityResult, CoreError]


def refused(request_id: str, reason: str) -> EngineCoreOutput:
    """The answer to a request the core cannot take: finished at once, with the reason as its error."""
    return EngineCoreOutput(request_id, [], finish_reason="abort", stop_reason=reason, error=reason)


def request_id_of(frame: bytes) -> Optional[str]:
    """The request id of an input message that did not decode as its type, when it has one: the core answers
    it instead of dropping it (its client would wait forever)."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None
    if isinstance(raw, dict) and raw.get("type") == "add" and isinstance(raw.get("request_id"), str):
        return raw["request_id"]
    return None


def client_index_of(frame: bytes) -> int:
    """The sender of an input message that did not decode as its type (0 when it cannot be read)."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return 0
    index = raw.get("client_index", 0) if isinstance(raw, dict) else 0
    return index if type(index) is int and index >= 0 else 0
