"""Scheduler: one token budget per step, shared by decodes, chunked prefills and new requests.

Each step: running requests first, in order (a decode gets 1 token, an unfinished prefill its next chunk);
when the KV pool runs dry the last running request is preempted by recompute. Then waiting requests are
admitted (after a prefix-cache lookup) while budget, sequence cap and blocks allow. A request whose computed
tokens reach its last known token samples one new token.

Fairness between user requests: sequences belong to groups (the n sequences of one request, the prompts of one
/v1/completions call). Waiting sequences are admitted fewest-running-group first (sched_queue.py). The running
list is kept in order of (priority, its group's running sequences, admission), so that the last one, the
victim of any preemption, is the newest sequence of the largest group among the lowest priority. And a group
cannot keep every seat while another waits: when all max_num_seqs seats are taken and the next waiting
sequence's group runs at least two fewer sequences than the victim's, the victim gives its seat back
(preemption by recompute), one seat a step. Preempting was chosen over capping a group's share: a cap must be
held back before anyone else arrives (seats idle while one large request runs alone), while a preemption costs
only when a smaller request is actually waiting, and the victim's prompt usually comes back from the prefix
cache (its siblings hold the same prompt blocks).

Prompt logprobs cost an LM head and a log-softmax over the vocabulary per prompt position, so one step
computes at most `max_prompt_logprobs_per_step` of them: a long prompt_logprobs prompt goes in chunks of that
size, interleaved with the other requests' steps.

The step message (sched_output.py) carries deltas: a request crosses to the runner in full once (and again
after a preemption, which makes the runner forget it); later steps send new block ids, counts, and a decode's
input token when it is known.

Async scheduling (`async_scheduling`): the engine core schedules step N+1 before step N's tokens are back. A
running request whose step N samples its next token then gets a decode "ahead" in step N+1, with no input token
in the message: the model runner takes it from step N's sampled tokens on the device. It is not scheduled ahead
when step N's token is sure to finish it by length; a token that stops it (EOS, a stop token) is known only
after step N+1 was launched, whose extra token is then dropped. Requests whose sampling reads their previous
tokens on the host (penalties, min_tokens, a grammar) are "lockstep": while one is unfinished, the core runs
steps one at a time.

Speculative decoding (`speculative_config`): after a step the runner may return draft tokens for a request
(guesses of what follows its new token). They wait on the request (`spec_token_ids`),
never in its token ids, so no block hash covers them. The request's next decode then computes 1 + k tokens
(its last token and k drafts, k cut to the token budget, max_model_len and its remaining max_tokens) in KV slots
allocated for all of them (no drafts rather than a preemption when blocks are short); the runner verifies the
drafts and returns 1..k+1 tokens, and `num_computed_tokens` is moved back over the rejected drafts (their KV is
overwritten later). Blocks past the computed tokens held only rejected drafts: both the scheduler and the runner
drop them from the request's table (the same rule on both sides: cdiv(num_computed_tokens, block_size) blocks).
With async scheduling, a request that got drafts after its last step is "speculating" and is not scheduled
ahead: it skips the step launched meanwhile, and its next step verifies drafts proposed from all its tokens.
Requests that do not speculate (the runner stops proposing where drafts are not accepted) keep their decodes
ahead.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from pagellm.core.kv_cache_manager import KVCacheManager, cdiv
from pagellm.core.request import Request, RequestStatus
from pagellm.core.sched_queue import FairQueue
from pagellm.core.sched_output import (
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)

if TYPE_CHECKING:  # config.py imports torch; core/ must not
    from pagellm.config import CacheConfig, SchedulerConfig, SpeculativeConfig

logger = logging.getLogger(__name__)

# One step computes at most max_num_batched_tokens // PROMPT_LOGPROBS_SHARE prompt-logprob positions. On SmolLM2
# (a vocabulary of 49,152 and a hidden size of 576) the LM head alone makes a position cost about a quarter of a
# token's forward pass, and the log-softmax and top-k passes over the vocabulary as much again; 256 positions
# (the CPU budget of 2,048 / 8) keep such a step near the time of a full-budget step without them.
PROMPT_LOGPROBS_SHARE = 8


class Scheduler:
    def __init__(self, scheduler_config: "SchedulerConfig", cache_config: "CacheConfig",
                 speculative_config: Optional["SpeculativeConfig"] = None, lora_config: Any = None) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        if scheduler_config.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {scheduler_config.policy!r}")
        if cache_config.num_blocks is None:
            raise ValueError("cache_config.num_blocks must be set before the scheduler is built")
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_loras: Optional[int] = None if lora_config is None else lora_config.max_loras
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.block_size = cache_config.block_size
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.priority_policy = scheduler_config.policy == "priority"
        self.max_prompt_logprobs_per_step = max(1, self.max_num_batched_tokens // PROMPT_LOGPROBS_SHARE)
        self.kv_cache_manager = KVCacheManager(
            num_blocks=cache_config.num_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
            max_model_len=scheduler_config.max_model_len,
        )
        if cdiv(self.max_model_len, self.block_size) > cache_config.num_blocks:
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len (%d): sequences that outgrow it will be "
                "finished with reason 'length'", cache_config.num_blocks * self.block_size, self.max_model_len,
            )

        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting = FairQueue(self.priority_policy)
        self.running: list[Request] = []
        # Ids that left since the last schedule(): the next SchedulerOutput tells the runner to drop them.
        self.finished_req_ids: set[str] = set()
        # Ids preempted by a step whose output was empty (it runs nowhere): the next step that runs carries them.
        self._preempted_unsent: set[str] = set()
        self._num_admitted = 0
        # Outputs of requests that schedule() had to finish (too long for the whole KV cache).
        self._pending_outputs: list[EngineCoreOutput] = []
        # Seconds each request waited before it was first scheduled, since the last take_queue_times().
        self._queue_times: list[float] = []
        self.num_preemptions_total = 0
        # Request id -> batches scheduled and not yet updated. Always empty at schedule() time in a synchronous
        # engine; with pipeline parallelism several batches are in flight, and a request in one of them is never
        # preempted (its blocks are being written).
        self.in_flight: dict[str, int] = {}
        self.async_scheduling = scheduler_config.async_scheduling
        # Unfinished requests that need every previous token on the host before their next step (see above).
        self.lockstep_ids: set[str] = set()
        # Speculative decoding: the most drafts one step verifies per request (0: no speculation), and counts
        # since start: verify steps of a request, draft tokens verified, draft tokens accepted (in all and by
        # position in the draft).
        self.num_spec_tokens = speculative_config.num_speculative_tokens if speculative_config else 0
        self.spec_num_accepted_per_pos = [0] * self.num_spec_tokens
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0

    # ---- requests in and out ----

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.request_id}: {request.num_tokens} tokens exceed max_model_len {self.max_model_len}"
            )
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.request_id}: empty prompt")
        if self.kv_cache_manager.enable_caching:
            request.enable_block_hashing(self.block_size)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if needs_lockstep(request):
            self.lockstep_ids.add(request.request_id)
        self.waiting.add(request)

    def finish_requests(self, request_ids: Union[str, Iterable[str]], status: RequestStatus) -> None:
        """Finish requests from outside (abort, stop string). Unknown or finished ids are ignored."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"{status!r} is not a finished status")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """The request has left running/waiting: set its status, free its blocks, forget it."""
        if request.status == RequestStatus.RUNNING:
            self.waiting.count_running(request, -1)
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.lockstep_ids.discard(request.request_id)
        self.finished_req_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the tokens of the one in flight are back."""
        return self.async_scheduling and not self.lockstep_ids

    def _decode_ahead(self, request: Request) -> bool:
        """Async scheduling: the one batch in flight samples this request's next token, which will not finish it
        by length, so its decode can be scheduled now with a placeholder input token."""
        sp = request.sampling_params
        return (self.async_scheduling
                and self.in_flight.get(request.request_id) == 1
                and request.num_computed_tokens == request.num_tokens
                and request.request_id not in self.lockstep_ids
                and not request.speculating
                and (sp.max_tokens is None or request.num_output_tokens + 1 < sp.max_tokens)
                and request.num_tokens + 1 < self.max_model_len)

    def sampling_ids(self, scheduler_output: SchedulerOutput) -> list[str]:
        """The requests of a step that sample a token in it (their step reaches their last known token)."""
        reqs = self.requests
        return [rid for rid in scheduler_output.scheduled_tokens()
                if rid in reqs and reqs[rid].num_computed_tokens >= reqs[rid].num_tokens]

    def take_pending_outputs(self) -> list[EngineCoreOutput]:
        """Outputs of requests the scheduler finished by itself (too long for the KV cache), when no step ran to
        carry them."""
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def take_queue_times(self) -> list[float]:
        """Queue times (seconds from reaching the engine core to the first schedule) since the last call."""
        times, self._queue_times = self._queue_times, []
        return times

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    # ---- one step ----

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, go back to the front of the queue (the runner forgets it: it is
        sent in full again when it resumes)."""
        self.kv_cache_manager.free(request)
        self.waiting.count_running(request, -1)
        request.runner_holds = False
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.add_front(request)

    def _finish_too_long(self, request: Request) -> None:
        """The request alone needs more blocks than the whole pool: it can never proceed."""
        logger.warning(
            "request %s needs more KV blocks than the cache holds (%d tokens): finished with reason 'length'",
            request.request_id, request.num_tokens,
        )
        self._finish(request, RequestStatus.FINISHED_LENGTH)
        self._pending_outputs.append(EngineCoreOutput(
            req_id=request.request_id, new_token_ids=[], finish_reason="length",
            num_cached_tokens=max(request.num_cached_tokens, 0),
        ))

    def schedule(self) -> SchedulerOutput:
        kvm = self.kv_cache_manager
        budget = self.max_num_batched_tokens
        plp_room = self.max_prompt_logprobs_per_step  # prompt-logprob positions left in this step
        num_scheduled: dict[str, int] = {}  # request id -> tokens this step, in scheduling order
        spec: dict[str, list[int]] = {}  # request id -> draft tokens verified this step (within num_scheduled)
        scheduled_reqs: list[Request] = []
        preempted_ids: set[str] = set()
        ahead: set[str] = set()  # decodes scheduled ahead of their input token

        # The victim of a preemption is always the last running request, never one already scheduled in this
        # step: keep the list in victim order (module docstring).
        if self.priority_policy or self.waiting.num_running_groups > 1:
            self.running.sort(key=self._running_order)
        yielding = self._yield_seat(preempted_ids)  # in flight: not scheduled now, preempted next step

        # 1. Running requests: decodes and unfinished (chunked) prefills. A decode whose last token is still being
        # computed has nothing to schedule (n == 0), unless it can be decoded ahead (async scheduling).
        blocked = False  # no blocks free and the next victim is in flight: wait for the batches in flight
        kv_short = False  # a request was preempted because the KV pool ran dry: admit nothing this step
        i = 0
        while i < len(self.running) and budget > 0 and not blocked:
            request = self.running[i]
            if request is yielding:
                i += 1
                continue
            n = min(
                request.num_tokens - request.num_computed_tokens,
                budget,
                self.max_model_len - request.num_computed_tokens,
            )
            if n <= 0:
                if not self._decode_ahead(request):
                    i += 1
                    continue
                n = 1
                ahead.add(request.request_id)
            n = self._cap_prompt_logprobs(request, request.num_computed_tokens, n, plp_room)
            if n <= 0:
                i += 1
                continue
            drafts = self._drafts_to_verify(request, n, budget)
            n += len(drafts)
            while True:
                if kvm.allocate_slots(request, n) is not None:
                    scheduled = True
                    break
                if drafts:  # verify no drafts rather than preempt anyone for their slots
                    n -= len(drafts)
                    drafts = []
                    continue
                if self.running[-1].request_id in self.in_flight:
                    blocked = True
                    scheduled = False
                    break
                victim = self.running.pop()  # the lowest priority; its index is >= i
                if victim is request and not self.running and not scheduled_reqs:
                    # Nothing else holds blocks, and still it does not fit: it never will.
                    self._finish_too_long(request)
                    scheduled = False
                    break
                self._preempt(victim)
                preempted_ids.add(victim.request_id)
                kv_short = True
                if victim is request:
                    scheduled = False
                    break
            if blocked:
                break
            if not scheduled:
                continue  # the request left the list; running[i] is the next one (or the end)
            num_scheduled[request.request_id] = n
            if drafts:
                spec[request.request_id] = drafts
            scheduled_reqs.append(request)
            budget -= n
            plp_room -= self._prompt_logprob_positions(request, request.num_computed_tokens, n)
            i += 1

        # 2. Waiting requests, unless this step already had to preempt for blocks.
        while (
            not kv_short
            and not blocked
            and len(self.waiting)
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting.peek()
            if not self._lora_fits(request):
                break  # its adapter waits for a slot: running requests use max_loras others
            first_time = request.num_cached_tokens < 0
            if request.sampling_params.prompt_logprobs is None:
                hits, num_hit = kvm.get_computed_blocks(request, count_stats=False)
            else:  # prompt logprobs need every prompt position computed: no prefix hits (its blocks still cache)
                hits, num_hit = [], 0
            n = min(request.num_tokens - num_hit, budget, self.max_model_len - num_hit)
            if n <= 0:  # cannot happen for a valid request; do not spin on it
                self.waiting.pop()
                self._finish_too_long(request)
                continue
            n = self._cap_prompt_logprobs(request, num_hit, n, plp_room)
            if n <= 0:
                break  # this step's prompt logprobs are spent; it goes first next step
            if kvm.allocate_slots(request, n, hits) is None:
                if not self.running:
                    # The pool is all free (or evictable), yet the chunk does not fit: it never will.
                    self.waiting.pop()
                    self._finish_too_long(request)
                    continue
                break
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            self._num_admitted += 1
            request.admitted_seq = self._num_admitted
            self.waiting.count_running(request, +1)
            if first_time:
                request.num_cached_tokens = num_hit
                self._queue_times.append(time.monotonic() - request.queued_at)
                if request.sampling_params.prompt_logprobs is None:
                    kvm.record_prefix_cache_query(request.num_tokens, num_hit)
            self.running.append(request)
            num_scheduled[request.request_id] = n
            scheduled_reqs.append(request)
            budget -= n
            plp_room -= self._prompt_logprob_positions(request, num_hit, n)

        # 3. The step's message; then the scheduled tokens count as computed. Ids that left go out with the next
        # step that runs (an empty output runs nowhere).
        out = SchedulerOutput(num_batched_tokens=self.max_num_batched_tokens - budget)
        self._preempted_unsent |= preempted_ids
        if scheduled_reqs:
            out.finished_req_ids, self.finished_req_ids = sorted(self.finished_req_ids), set()
            out.preempted_req_ids, self._preempted_unsent = sorted(self._preempted_unsent), set()
        for request in scheduled_reqs:
            self._add_to_output(out, request, num_scheduled[request.request_id], request.request_id in ahead,
                                spec.get(request.request_id))
            self.in_flight[request.request_id] = self.in_flight.get(request.request_id, 0) + 1
        assert out.num_batched_tokens <= self.max_num_batched_tokens
        assert out.num_reqs <= self.max_num_seqs
        return out

    # ---- fairness and prompt logprobs ----

    def _running_order(self, request: Request) -> tuple[int, int, int]:
        """Running requests' order: the last is the next victim (lowest priority, largest group, newest)."""
        return (request.priority if self.priority_policy else 0, self.waiting.num_running(request.group_id),
                request.admitted_seq)

    def _yield_seat(self, preempted_ids: set[str]) -> Optional[Request]:
        """Every seat is taken and the next waiting sequence's group runs at least two fewer sequences than the
        group of the last running request (not of higher priority): that one gives its seat back. Preempted
        now; or, while a batch in flight computes it, returned, to be left out of this step (and preempted by
        the next one)."""
        if not len(self.waiting) or len(self.running) < self.max_num_seqs:
            return None
        head = self.waiting.peek()
        victim = self.running[-1]
        if self.priority_policy and victim.priority < head.priority:
            return None
        if self.waiting.num_running(victim.group_id) < self.waiting.num_running(head.group_id) + 2:
            return None
        if victim.request_id in self.in_flight:
            return victim
        self.running.pop()
        self._preempt(victim)
        preempted_ids.add(victim.request_id)
        return None

    @staticmethod
    def _prompt_logprob_positions(request: Request, start: int, n: int) -> int:
        """Prompt positions whose logprobs computing tokens [start, start + n) gives (the last prompt token
        predicts the first output token, not a prompt token)."""
        if request.sampling_params.prompt_logprobs is None:
            return 0
        return max(0, min(start + n, request.num_prompt_tokens - 1) - start)

    def _cap_prompt_logprobs(self, request: Request, start: int, n: int, room: int) -> int:
        """n, or fewer tokens so that their prompt-logprob positions fit the room left in this step (0: none)."""
        if self._prompt_logprob_positions(request, start, n) <= room:
            return n
        return room  # every one of the first `room` tokens is a prompt-logprob position

    def _drafts_to_verify(self, request: Request, n: int, budget: int) -> list[int]:
        """The request's drafts this step verifies: none unless it decodes (one token left to compute); at most
        what the token budget, max_model_len (the step's tokens and every token it may yield) and the request's
        remaining max_tokens leave room for. Taken off the request either way: the runner guesses afresh after
        each step."""
        drafts, request.spec_token_ids = request.spec_token_ids, []
        if not drafts or n != 1 or request.num_tokens - request.num_computed_tokens != 1:
            return []
        k = min(len(drafts), self.num_spec_tokens, budget - 1, self.max_model_len - request.num_tokens - 1)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            k = min(k, max_tokens - request.num_output_tokens - 1)
        return drafts[:k] if k > 0 else []

    def _lora_fits(self, request: Request) -> bool:
        """Whether the request's adapter can run beside the running requests' (at most max_loras at once)."""
        lora = request.lora_request
        if lora is None or self.max_loras is None:
            return True
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        return lora.lora_int_id in running or len(running) < self.max_loras

    def _add_to_output(self, out: SchedulerOutput, request: Request, n: int, ahead: bool,
                       drafts: Optional[list[int]] = None) -> None:
        """Put one scheduled request in the step message, as a delta where the runner holds it already; then
        its n tokens (drafts included: update_from_output takes the rejected ones back) count as computed."""
        start = request.num_computed_tokens
        known_end = start + n - len(drafts or ())  # the drafts are the step's last positions
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
        if not request.runner_holds:  # first schedule, or resumed after a preemption
            out.new_reqs.append(NewRequestData(
                req_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params, block_ids=list(block_ids), num_computed_tokens=start,
                num_scheduled_tokens=n, output_token_ids=list(request.output_token_ids),
                lora_request=request.lora_request, mm_features=request.mm_features,
            ))
            assert not drafts, "drafts are only verified by a request the runner holds"
            request.runner_holds = True
            request.num_tokens_sent = request.num_tokens
        else:
            # The input tokens the runner lacks: a decode's last sampled token, unless it is still being sampled
            # (ahead), then the runner reads it on the device.
            lo = max(request.num_tokens_sent, start)
            new_tokens = [] if ahead else request.all_token_ids[lo:known_end]
            if new_tokens:
                request.num_tokens_sent = known_end
            out.cached.add(request.request_id, block_ids[request.num_blocks_sent:], start, n, new_tokens, drafts)
        request.num_blocks_sent = len(block_ids)
        request.num_computed_tokens = start + n

    # ---- after the forward pass ----

    def _check_stop(self, request: Request) -> Optional[RequestStatus]:
        sp = request.sampling_params
        if request.num_output_tokens >= sp.min_tokens:
            last = request.output_token_ids[-1]
            if not sp.ignore_eos and request.eos_token_id is not None and last == request.eos_token_id:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in sp.all_stop_token_ids:
                request.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and request.num_output_tokens >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append each request's new tokens (up to the first that stops it), finish the requests that stopped,
        and return what is new for each."""
        outputs = self.take_pending_outputs()
        mro = model_runner_output
        sampled = dict(zip(mro.req_ids, mro.sampled_token_ids))
        logprobs = dict(zip(mro.req_ids, mro.logprobs)) if mro.logprobs else {}
        prompt_logprobs = mro.prompt_logprobs
        verified = scheduler_output.cached.spec_token_ids
        any_finished = False
        for req_id in scheduler_output.scheduled_tokens():
            left = self.in_flight.pop(req_id, 1) - 1
            if left > 0:
                self.in_flight[req_id] = left
            request = self.requests.get(req_id)
            if request is None:
                continue  # finished (aborted) after schedule()
            tokens = sampled.get(req_id)
            plp = prompt_logprobs.get(req_id)
            num_drafts = len(verified.get(req_id, ()))
            if num_drafts and tokens:
                # Only the accepted drafts (all tokens but the last) are computed; the rest is recomputed later.
                # Blocks that held only rejected drafts go back (the runner drops them from its table too).
                num_accepted = len(tokens) - 1
                request.num_computed_tokens -= num_drafts - num_accepted
                self.kv_cache_manager.free_excess(request)
                request.num_blocks_sent = min(request.num_blocks_sent,
                                              len(self.kv_cache_manager.get_block_ids(req_id)))
                self.spec_num_drafts += 1
                self.spec_num_draft_tokens += num_drafts
                self.spec_num_accepted_tokens += num_accepted
                for pos in range(num_accepted):
                    self.spec_num_accepted_per_pos[pos] += 1
            if not tokens and plp is None:
                continue
            new_ids: list[int] = []
            status = None
            for token in tokens or ():
                request.append_output_token_ids(token)
                new_ids.append(token)
                status = self._check_stop(request)
                if status is not None:
                    break  # tokens after the one that stops it are dropped
            if status is not None:
                any_finished = True
                self._finish(request, status)
            elif tokens:
                # Drafts follow this step's last token: stale when the request already computes in a later step
                # (scheduled ahead), but they still say that it speculates, so it is not scheduled ahead again.
                drafts = mro.spec_token_ids.get(req_id)
                request.speculating = drafts is not None
                if drafts is not None and not left:
                    request.spec_token_ids = drafts
            token_logprobs = logprobs.get(req_id)
            outputs.append(EngineCoreOutput(
                req_id=req_id,
                new_token_ids=new_ids,
                finish_reason=RequestStatus.finish_reason(status) if status is not None else None,
                stop_reason=request.stop_reason if status is not None else None,
                new_logprobs=token_logprobs[: len(new_ids)] if token_logprobs and new_ids else None,
                new_prompt_logprobs=plp,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            ))
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs


def needs_lockstep(request: Request) -> bool:
    """Whether sampling the request's next token reads its previous tokens on the host: penalties (over the
    output so far), min_tokens (counts them), a grammar (advanced by each one)."""
    sp = request.sampling_params
    return (sp.structured_outputs is not None or sp.min_tokens > 0 or sp.presence_penalty != 0.0
            or sp.frequency_penalty != 0.0 or sp.repetition_penalty != 1.0)
