"""EngineCore: the busy loop's body. schedule -> execute -> update, on token ids only (no text)."""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Optional, Union

from pagellm.config import EngineConfig
from pagellm.core.request import Request, RequestStatus
from pagellm.core.scheduler import Scheduler
from pagellm.core.sched_output import EngineCoreOutput, GrammarBitmask, SchedulerOutput
from pagellm.engine.admission import RequestLimits, check_request
from pagellm.engine.core_messages import CoreStats, EngineCoreRequest, refused
from pagellm.executor import make_executor
from pagellm.model_executor.loader.source import resolve_eos_token_id

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        """`tokenizer`: the HF tokenizer when the caller has one (structured output needs it; when None it is
        loaded on first use, off the loop)."""
        self.config = config
        self.tokenizer = tokenizer
        self.limits = RequestLimits.from_model_config(config.model_config)
        # Structured output: built on the first request with a grammar; requests wait here (not in the
        # scheduler) until their grammar is compiled.
        self.structured_output: Any = None
        self.grammar_waiting: dict[str, Request] = {}
        self.executor = make_executor(config)  # uni, or mp/ray for tensor/pipeline parallelism
        try:
            num_blocks = self.executor.determine_num_blocks()
            config.cache_config.num_blocks = num_blocks
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()  # no worker processes left behind
            raise
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, config.speculative_config,
                                   config.lora_config)
        # Pipeline parallelism: up to one batch per stage in flight, so that no stage idles (micro-batches).
        pp = config.parallel_config.pipeline_parallel_size
        self.max_batches_in_flight = pp
        self.batch_queue: "collections.deque[tuple[Any, Any]] | None" = collections.deque() if pp > 1 else None
        self.peak_batches_in_flight = 0
        # Async scheduling: the step launched and not yet collected (its scheduler output and runner handle).
        self.async_scheduling = config.scheduler_config.async_scheduling
        self.launched: Optional[tuple[SchedulerOutput, Any]] = None
        # One step function for the engine's life: pipelined (pp > 1), scheduled ahead (async) or one at a time.
        self._step_fn = (self._step_pipelined if pp > 1 else self._step_ahead if self.async_scheduling
                         else self._step_sync)

    def add_request(self, req: EngineCoreRequest) -> None:
        """Admit a request (ValueError naming the field if it fails the admission check)."""
        check_request(req, self.limits)
        request = Request(req.request_id, req.prompt_token_ids, req.params(), req.eos_token_id,
                          arrival_time=req.arrival_time, priority=req.priority, cache_salt=req.cache_salt,
                          group_id=req.group_id, lora_request=req.lora_request, mm_features=req.mm_features)
        structured = request.sampling_params.structured_outputs
        if structured is None:
            self.scheduler.add_request(request)
            return
        if request.request_id in self.scheduler.requests or request.request_id in self.grammar_waiting:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._structured_output_manager().submit(request.request_id, structured,
                                                 request.sampling_params.max_tokens)
        self.grammar_waiting[request.request_id] = request

    def _structured_output_manager(self) -> Any:
        if self.structured_output is None:
            from pagellm.structured_output import StructuredOutputManager

            mc = self.config.model_config

            def load() -> Any:
                if self.tokenizer is None and not mc.skip_tokenizer_init:
                    from pagellm.model_executor.loader.source import load_tokenizer

                    self.tokenizer = load_tokenizer(mc.source, mc.tokenizer)
                return self.tokenizer

            eos = resolve_eos_token_id(self.tokenizer, mc.arch)
            self.structured_output = StructuredOutputManager(load, mc.vocab_size, eos)
        return self.structured_output

    def _drop_grammar_requests(self, request_ids: Union[str, Iterable[str]]) -> list[str]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if self.structured_output is not None:
            for req_id in ids:
                self.grammar_waiting.pop(req_id, None)
                self.structured_output.remove(req_id)
        return ids

    def abort_requests(self, request_ids: Union[str, Iterable[str]]) -> None:
        ids = self._drop_grammar_requests(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Finish requests that met a stop string (found by the detokenizer, outside the core)."""
        ids = self._drop_grammar_requests(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self.grammar_waiting)
                or self.launched is not None)

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Move requests whose grammar is ready into the scheduler; outputs of those whose grammar failed."""
        so = self.structured_output
        outputs: list[EngineCoreOutput] = []
        if so is None or not self.grammar_waiting:
            return outputs
        if not self.scheduler.has_unfinished_requests():
            so.wait_any(0.05)  # nothing else to run: wait for a grammar instead of spinning
        ready, failed = so.poll()
        for req_id in ready:
            request = self.grammar_waiting.pop(req_id, None)
            if request is None:
                so.remove(req_id)
                continue
            try:
                self.scheduler.add_request(request)
            except ValueError as e:
                so.remove(req_id)
                failed.append((req_id, str(e)))
        for req_id, reason in failed:
            logger.warning("request %s: %s", req_id, reason)
            self.grammar_waiting.pop(req_id, None)
            outputs.append(refused(req_id, reason))
        return outputs

    def step(self) -> list[EngineCoreOutput]:
        """One turn of the loop: admit requests whose grammar is ready, then run the step function."""
        return self._admit_compiled() + self._step_fn()

    def _step_sync(self) -> list[EngineCoreOutput]:
        """One step at a time: schedule, run, update."""
        sched = self.scheduler
        if not sched.has_unfinished_requests():
            return []
        scheduler_output = sched.schedule()
        if scheduler_output.is_empty:
            return sched.take_pending_outputs()
        self._attach_bitmasks(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output)
        return self._advance_grammars(sched.update_from_output(scheduler_output, runner_output))

    def _attach_bitmasks(self, scheduler_output: SchedulerOutput) -> None:
        """Structured output: the step carries the allowed-token bitmask of each request with a grammar that
        samples in it."""
        so = self.structured_output
        if so is not None and so.matchers:
            ids = [rid for rid in self.scheduler.sampling_ids(scheduler_output) if so.has_matcher(rid)]
            if ids:
                bitmask = so.fill_bitmask(ids)
                scheduler_output.grammar = GrammarBitmask(ids, bitmask.shape[1], bitmask.tobytes())

    def _advance_grammars(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Structured output: the sampled tokens advance their requests' grammars; finished ones are dropped."""
        so = self.structured_output
        if so is not None and so.matchers:
            from pagellm.structured_output import JSON_CLOSED

            for out in outputs:
                if out.new_token_ids:
                    so.accept_tokens(out.req_id, out.new_token_ids)
                if out.finished:
                    if out.finish_reason in ("stop", "length") and so.closed_json(out.req_id):
                        # Closed by the engine as max_tokens came near, and whole: "stop", so that clients
                        # parse it (a "length" answer is refused by the openai SDK's parse helpers).
                        out.finish_reason, out.stop_reason = "stop", JSON_CLOSED
                    so.remove(out.req_id)
        return outputs

    def _step_ahead(self) -> list[EngineCoreOutput]:
        """Async scheduling: schedule and launch step N+1, then wait for step N and update from it, so that the
        host's work (this update, the caller's output processing, the next schedule) overlaps the device's.
        Falls back to one step at a time while a lockstep request (see Scheduler) is unfinished."""
        sched = self.scheduler
        outputs: list[EngineCoreOutput] = []
        if self.launched is not None and not sched.can_schedule_ahead():
            outputs += self._collect_launched()
        if sched.has_unfinished_requests():
            scheduler_output = sched.schedule()
            if not scheduler_output.is_empty:
                self._attach_bitmasks(scheduler_output)
                previous = self.launched
                self.launched = (scheduler_output, self.executor.submit_model(scheduler_output))
                if previous is not None:
                    outputs += self._update_from_batch(*previous)
                if not sched.can_schedule_ahead() or not sched.has_unfinished_requests():
                    # One step at a time; or every request of the launched step has finished (its tokens are
                    # extras past a stop): collect it now rather than leave it for a later request's step.
                    outputs += self._collect_launched()
                return outputs
        if self.launched is not None:
            return outputs + self._collect_launched()
        # Nothing ran: still hand out what the scheduler finished by itself (requests too long for the cache).
        return outputs + sched.take_pending_outputs()

    def _collect_launched(self) -> list[EngineCoreOutput]:
        launched, self.launched = self.launched, None
        return self._update_from_batch(*launched)

    def _update_from_batch(self, scheduler_output: SchedulerOutput, handle: Any) -> list[EngineCoreOutput]:
        """Wait for a submitted batch's answer and update the scheduler (and grammars) from it."""
        return self._advance_grammars(
            self.scheduler.update_from_output(scheduler_output, self.executor.collect_model(handle)))

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Pipeline parallelism: schedule and submit a new batch while fewer than pp are in flight and there is
        something to schedule (requests whose tokens are in flight are not schedulable); otherwise wait for the
        oldest batch and update from it. Every stage runs batches in submission order, so a batch always sees
        the KV written by the batches before it."""
        queue = self.batch_queue
        sched = self.scheduler
        if len(queue) < self.max_batches_in_flight and sched.has_unfinished_requests():
            scheduler_output = sched.schedule()
            if not scheduler_output.is_empty:
                self._attach_bitmasks(scheduler_output)
                queue.append((scheduler_output, self.executor.submit_model(scheduler_output)))
                self.peak_batches_in_flight = max(self.peak_batches_in_flight, len(queue))
                if len(queue) < self.max_batches_in_flight:
                    return []  # try to fill the pipeline further first
        if not queue:
            return sched.take_pending_outputs()
        return self._update_from_batch(*queue.popleft())

    def stats(self) -> CoreStats:
        """The core's numbers now (queue times: those new since the last call)."""
        sched = self.scheduler
        kv = sched.kv_cache_manager
        pcs = kv.prefix_cache_stats
        return CoreStats(
            num_running=sched.num_running,
            # Requests waiting for their grammar to compile wait in the core, outside the scheduler.
            num_waiting=sched.num_waiting + len(self.grammar_waiting),
            kv_cache_usage=float(kv.usage), num_blocks=kv.num_blocks,
            prefix_cache_queries=pcs.queries, prefix_cache_hits=pcs.hits,
            num_preemptions=sched.num_preemptions_total, queue_times=sched.take_queue_times(),
            spec_num_drafts=sched.spec_num_drafts, spec_num_draft_tokens=sched.spec_num_draft_tokens,
            spec_num_accepted_tokens=sched.spec_num_accepted_tokens,
            spec_num_accepted_per_pos=list(sched.spec_num_accepted_per_pos),
        )

    def check_health(self) -> None:
        """Raise (WorkerDiedError) if a worker of the executor is gone, even while no step runs."""
        self.executor.check_health()

    def shutdown(self) -> None:
        if self.structured_output is not None:
            self.structured_output.shutdown()
        self.executor.shutdown()
