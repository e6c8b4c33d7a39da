"""AsyncLLM: the asyncio engine behind the server.

Tokenization, validation (Processor) and detokenization (OutputProcessor) run here, in the API process; the
EngineCore runs in its own process (core_proc.py). One asyncio task reads the core's outputs and hands each
request's RequestOutputs to that request's own asyncio.Queue; `generate()` is an async iterator over it.

- A consumer that stops early (client disconnect: its task is cancelled) aborts the request in the core,
  which frees its KV blocks.
- Sequences finished by a stop string (found here by the detokenizer) are stopped in the core.
- Admission: EngineDeadError once the core has failed, EngineShuttingDownError while draining,
  QueueFullError when the waiting queue would exceed max_queued_requests.
- Data parallelism (`data_parallel_size` N > 1): N core processes, each with its own devices and KV cache.
  The core processes, their sockets and output tasks are the CoreClient's (core_client.py); which core takes
  a request is the DPRouter's (dp_router.py). A core that fails fails the whole engine (every request in
  flight, /health 503), as with one core.
- Several API processes (`shared`, from `pagellm serve --api-server-count N`): this AsyncLLM is one of N
  clients of cores that a launcher started. Its request ids carry its index; admission and routing count its
  own sequences in flight and the cores' last reported ones (CoreStats after every step), whichever is more.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from pagellm.engine.admission import WorkCaps
from pagellm.engine.core_client import CoreClient, EngineDeadError, SharedCores
from pagellm.engine.core_messages import CoreStats, Outputs
from pagellm.engine.dp_router import DPRouter
from pagellm.engine.output_processor import OutputKind, OutputProcessor
from pagellm.engine.processor import ProcessedPrompt, Processor, PromptType
from pagellm.lora.request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "RequestStream", "EngineDeadError", "EngineShuttingDownError", "QueueFullError",
           "RequestFailedError", "RequestRefusedError"]

# Text longer than this is tokenized in a worker thread, so the event loop keeps serving other requests.
_THREAD_TOKENIZE_CHARS = 4096


class EngineShuttingDownError(RuntimeError):
    """The server is draining for shutdown and takes no new requests."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full (max_queued_requests)."""


class RequestFailedError(RuntimeError):
    """The core failed the request."""


class RequestRefusedError(ValueError):
    """The core refused the request (its message starts with the field at fault, like every ValueError)."""


@dataclass
class _RequestInfo:
    queue: asyncio.Queue
    arrival_time: float
    num_prompt_tokens: int
    n: int
    core: int = 0  # which engine core (data parallelism) runs it
    key_name: Optional[str] = None  # the API key's name (per-key metrics)
    first_token_time: Optional[float] = None
    num_generation_tokens: int = 0


class AsyncLLM:
    def __init__(self, engine_args: Any, max_queued_requests: Optional[int] = None, log_level: str = "WARNING",
                 log_stats: bool = True, shared: Optional[SharedCores] = None,
                 work_caps: Optional[WorkCaps] = None) -> None:
        """`work_caps`: the server's caps on one user request (none by default)."""
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be non-negative, got {max_queued_requests}")
        self.engine_args = engine_args
        self.dp_size = engine_args.data_parallel_size
        if type(self.dp_size) is not int or self.dp_size < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {self.dp_size!r}")
        self.shared = shared
        # The core processes start first, so that their imports and model loading overlap with this process's
        # own (several seconds each on a CPU); they fail on a bad option as this process does, and are stopped
        # if it does. start() waits for them; shutdown() stops them.
        self.core_client = CoreClient(engine_args, self.dp_size, log_level, self._handle_outputs, self._fail_requests,
                                      shared)
        self.core_client.launch()
        try:
            self._build(max_queued_requests, log_stats, work_caps)
        except BaseException:  # this process cannot serve: its cores (still loading) are not wanted
            for client in self.core_client.clients:
                client.close(timeout=0, quiet=True)
            raise

    def _build(self, max_queued_requests: Optional[int], log_stats: bool, work_caps: Optional[WorkCaps]) -> None:
        """What this process needs besides the cores: the config, tokenizer, processors and metrics."""
        from pagellm.model_executor.loader.source import load_generation_eos_ids, load_tokenizer

        shared = self.shared
        self.config = self.engine_args.create_engine_config()
        mc = self.config.model_config
        self.model_config = mc
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(mc.source, mc.tokenizer)
        self.processor = Processor(mc, self.tokenizer, load_generation_eos_ids(mc.source), work_caps,
                                   self.config.lora_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.max_queued_requests = max_queued_requests
        self.max_num_seqs = self.config.scheduler_config.max_num_seqs
        self.metrics = None
        if log_stats:
            from pagellm.metrics import Metrics

            # Several API processes: each writes its own numbers for prometheus_client's multiprocess mode, and
            # the cores' counters (the same in each process's stats) are counted by the first one only.
            self.metrics = Metrics(self.served_model_name, multiprocess=shared is not None,
                                   count_core_counters=shared is None or shared.client_index == 0)
        self.router = DPRouter(self.dp_size, self.config.cache_config, self.max_num_seqs,
                               reported=self.core_client.core_stats if shared is not None else None)
        self.requests: dict[str, _RequestInfo] = {}
        self.num_seqs_in_flight = 0
        self.accepting = True
        self._ids = itertools.count()
        self._id_prefix = f"api{shared.client_index}-" if shared is not None else ""

    @property
    def clients(self) -> list[Any]:
        """One per engine core."""
        return self.core_client.clients

    @property
    def client(self) -> Any:
        """The first engine core's client (the only one without data parallelism)."""
        return self.clients[0] if self.clients else None

    @property
    def core_pids(self) -> list[int]:
        return self.core_client.core_pids

    @property
    def num_blocks(self) -> int:
        return self.core_client.num_blocks

    @property
    def last_stats(self) -> CoreStats:
        return self.core_client.last_stats

    @property
    def errored(self) -> Optional[str]:
        """Why the engine failed (None while it runs)."""
        return self.core_client.errored

    @property
    def served_model_name(self) -> str:
        mc = self.model_config
        return mc.served_model_name or mc.model

    # ---- lifecycle ----

    async def start(self, timeout: float = 900.0) -> None:
        """Start the core process(es) and wait until each has loaded the model."""
        await self.core_client.start(timeout)
        if self.metrics:
            self.metrics.record_core_stats(self.last_stats)

    def _fail_requests(self, message: str) -> None:
        """A core is gone: fail every request in flight (later ones fail admission)."""
        for request_id, info in list(self.requests.items()):
            info.queue.put_nowait(EngineDeadError(message))
            self.output_processor.abort_request(request_id)

    @property
    def is_healthy(self) -> bool:
        return self.core_client.is_healthy

    @property
    def num_requests_in_flight(self) -> int:
        return len(self.requests)

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` seconds for those in flight. True if all finished;
        if not, those still running are cut: their streams raise EngineShuttingDownError (so each handler can
        still answer its client) and the core aborts them."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.requests and self.errored is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.requests:
            return True
        self._cut_in_flight()
        return False

    def _cut_in_flight(self) -> None:
        for request_id, info in list(self.requests.items()):
            info.queue.put_nowait(EngineShuttingDownError("the server is shutting down"))
            self.abort(request_id)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Cut the requests still in flight, then stop the output tasks and the core process(es): each gets
        `timeout` seconds to exit, then is killed."""
        self.accepting = False
        self._cut_in_flight()
        await self.core_client.shutdown(timeout)

    # ---- requests ----

    def next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def check_admission(self, n: int = 1) -> None:
        """Raise if a request of n sequences cannot be taken now."""
        self.core_client.check_alive()
        if not self.accepting:
            raise EngineShuttingDownError("the server is shutting down")
        if self.max_queued_requests is not None:
            stats = self.last_stats
            # Sequences beyond what can run wait. When the core reports a queue, what it runs now is the
            # capacity (the KV cache may hold fewer than max_num_seqs).
            capacity = self.max_num_seqs * self.dp_size
            if stats.num_waiting > 0 and stats.num_running > 0:
                capacity = min(capacity, stats.num_running)
            in_flight = self.num_seqs_in_flight
            if self.shared is not None:  # the other API processes' sequences: as the cores last reported them
                in_flight = max(in_flight, stats.num_running + stats.num_waiting)
            waiting = in_flight + n - capacity
            if waiting > self.max_queued_requests:
                raise QueueFullError(
                    f"the waiting queue is full ({self.max_queued_requests} queued requests at most); retry later")

    async def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
        if isinstance(text, str) and len(text) > _THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.processor.tokenize_prompt, prompt)
        return self.processor.tokenize_prompt(prompt)

    async def add_request(
        self,
        prompt: Union[PromptType, ProcessedPrompt],
        params: SamplingParams,
        request_id: Optional[str] = None,
        *,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.DELTA,
        cache_salt: Optional[str] = None,
        key_name: Optional[str] = None,
        group_id: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> "RequestStream":
        """Validate and submit a request now; iterate the returned stream for its outputs. `group_id`: the
        user request it is part of, for the scheduler's fairness (default: its own id).

        `cache_salt`: mixed into the request's prefix-cache hashes (only requests with the same salt share
        cached blocks); `key_name`: the API key's name, for the per-key metrics.

        Raises ValueError (invalid request, naming the field), QueueFullError, EngineShuttingDownError or
        EngineDeadError before anything is submitted. A stream that is never iterated must be abort()ed.
        """
        request_id = request_id if request_id is not None else self.next_request_id()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        self.check_admission(params.num_sequences)
        processed = prompt if isinstance(prompt, ProcessedPrompt) else await self.tokenize(prompt)
        if self.config.scheduler_config.policy != "priority" and priority != 0:
            raise ValueError("priority: the server must run with --scheduling-policy priority to use priorities")
        requests = self.processor.make_requests(request_id, processed, params, priority=priority,
                                                strict_max_tokens=True, cache_salt=cache_salt,
                                                group_id=group_id, lora_request=lora_request)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_admission(params.num_sequences)  # tokenizing may have awaited
        core = self.router.route(processed.prompt_token_ids, requests[0].cache_salt if requests else None)
        self.output_processor.add_request(request_id, processed, params, output_kind)
        info = _RequestInfo(asyncio.Queue(), time.time(), len(processed.prompt_token_ids), params.num_sequences,
                            core,
                            key_name=key_name)
        self.requests[request_id] = info
        self.num_seqs_in_flight += params.num_sequences
        self.router.add(core, params.num_sequences)
        if self.metrics:
            self.metrics.record_routed(core)
        try:
            for request in requests:
                request.client_index = self.core_client.client_index
                self.core_client.send(core, request)
        except BaseException:
            self._release(request_id, abort=True)
            raise
        return RequestStream(self, request_id, info, processed)

    async def generate(
        self,
        prompt: Union[PromptType, ProcessedPrompt],
        params: SamplingParams,
        request_id: Optional[str] = None,
        *,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's RequestOutputs (DELTA: what is new; CUMULATIVE: all so far; FINAL_ONLY: one).

        Raises what add_request raises, and RequestFailedError / EngineDeadError while running. Leaving the
        iteration early (break, cancellation) aborts the request in the core.
        """
        stream = await self.add_request(prompt, params, request_id, priority=priority, output_kind=output_kind)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def _release(self, request_id: str, abort: bool) -> None:
        """Forget a request in this process (exactly once); abort it in the core if it may still run."""
        info = self.requests.pop(request_id, None)
        if info is not None:
            self.num_seqs_in_flight -= info.n
            self.router.release(info.core, info.n)
        if abort:
            self.abort(request_id, core=info.core if info is not None else None)

    def abort(self, request_id: str, core: Optional[int] = None) -> None:
        """Abort a request in flight (unknown or finished ids are ignored)."""
        if core is None:
            info = self.requests.get(request_id)
            core = info.core if info is not None else None
        children = self.output_processor.child_ids(request_id)
        self.output_processor.abort_request(request_id)
        if not children:
            return
        self.core_client.abort(children, core)

    # ---- stats ----

    async def refresh_stats(self, timeout: float = 1.0) -> CoreStats:
        """Ask the core for its numbers now (falls back to the last ones if it is slow to answer)."""
        try:
            import msgspec

            results = await self.core_client.call_utility_all("get_stats", timeout=timeout)
            for rank, result in enumerate(results):
                self._record_stats(msgspec.convert(result, CoreStats), rank)
        except (asyncio.TimeoutError, EngineDeadError, Exception) as e:  # noqa: BLE001 - metrics must not fail
            logger.debug("stats refresh failed: %s", e)
        return self.last_stats

    async def reset_prefix_cache(self) -> bool:
        return all(bool(r) for r in await self.core_client.call_utility_all("reset_prefix_cache"))

    def _record_stats(self, stats: CoreStats, core: int = 0) -> None:
        engine_stats = self.core_client.record_stats(stats, core)
        if self.metrics:
            self.metrics.record_core_stats(engine_stats)

    # ---- outputs (the CoreClient's output tasks call this) ----

    def _handle_outputs(self, msg: Outputs, core: int = 0) -> None:
        if msg.stats is not None:
            self._record_stats(msg.stats, core)
        if not msg.outputs:
            return
        if any(out.error is not None for out in msg.outputs):
            self._fail_refused([out for out in msg.outputs if out.error is not None], core)
        metrics = self.metrics
        now = time.time()
        total = 0
        parents = self.output_processor.child_to_parent
        for out in msg.outputs:  # tokens per request (a key's token budget reads them) and the metrics
            if not out.new_token_ids:
                continue
            total += len(out.new_token_ids)
            info = self.requests.get(parents.get(out.req_id, ""))
            if info is not None:
                if info.first_token_time is None:
                    info.first_token_time = now
                    if metrics:
                        metrics.record_first_token(now - info.arrival_time, info.num_prompt_tokens, info.key_name)
                info.num_generation_tokens += len(out.new_token_ids)
                if metrics and info.key_name is not None:
                    metrics.record_key_generation_tokens(info.key_name, len(out.new_token_ids))
        if metrics:
            metrics.record_generation_tokens(total)
        request_outputs, stopped = self.output_processor.process_outputs(msg.outputs)
        if stopped:
            self.core_client.stop(stopped, core)
        for ro in request_outputs:
            info = self.requests.get(ro.request_id)
            if info is None:
                continue
            if metrics:
                if ro.finished:
                    per_seq = info.num_generation_tokens / max(1, info.n)
                    tpot = None
                    if info.first_token_time is not None and per_seq > 1:
                        tpot = (now - info.first_token_time) / (per_seq - 1)
                    metrics.record_finished(now - info.arrival_time, tpot, info.num_generation_tokens,
                                            [c.finish_reason for c in ro.outputs])
            info.queue.put_nowait(ro)

    def _fail_refused(self, outputs: list, core: int) -> None:
        """Requests the core could not take: each is answered with its error (a 400 naming the field), and its
        other sequences are aborted."""
        parents = self.output_processor.child_to_parent
        for out in outputs:
            request_id = parents.get(out.req_id)
            info = self.requests.get(request_id) if request_id is not None else None
            if info is None:
                continue
            info.queue.put_nowait(RequestRefusedError(out.error))
            self.abort(request_id, core=core)


class RequestStream:
    """The outputs of one request, in order. Iterate it once; abort() it if it is not iterated to the end."""

    def __init__(self, engine: AsyncLLM, request_id: str, info: _RequestInfo, prompt: ProcessedPrompt) -> None:
        self.engine = engine
        self.request_id = request_id
        self.prompt = prompt
        self._info = info
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._info.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True  # the core has nothing of it any more
                    raise item
                if item.finished:
                    self.finished = True
                    self.engine._release(self.request_id, abort=False)
                    failed = [c for c in item.outputs if c.finish_reason == "abort"]
                    if failed:
                        raise RequestFailedError(f"the engine dropped the request: {failed[0].stop_reason}")
                yield item
        finally:
            self.engine._release(self.request_id, abort=not self.finished)

    @property
    def num_generation_tokens(self) -> int:
        """Tokens generated so far, all sequences together (counted with the metrics, which the server keeps)."""
        return self._info.num_generation_tokens

    def abort(self) -> None:
        """Abort the request if it has not finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self.engine._release(self.request_id, abort=True)
