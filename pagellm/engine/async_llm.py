"""AsyncLLM: the asyncio engine behind the server.

Tokenization, validation (Processor) and detokenization (OutputProcessor) run here, in the API process; the
EngineCore runs in its own process (core_proc.py). One asyncio task reads the core's outputs and hands each
request's RequestOutputs to that request's own asyncio.Queue; `generate()` is an async iterator over it.

- A consumer that stops early (client disconnect: its task is cancelled) aborts the request in the core,
  which frees its KV blocks.
- Sequences finished by a stop string (found here by the detokenizer) are stopped in the core.
- Admission: EngineDeadError once the core has failed, EngineShuttingDownError while draining,
  QueueFullError when the waiting queue would exceed max_queued_requests.
- Data parallelism (`data_parallel_size` N > 1): N core processes, each with its own devices and KV cache,
  each with its own pair of sockets and output task. Each request goes to one core (see `_route`): the one
  whose prefix cache holds the longest part of its prompt when that is at least half of it and that core is
  not much busier than the others, else the least loaded (fewest sequences in flight). A core that fails
  fails the whole engine (every request in flight, /health 503), as with one core.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from pagellm.engine.core_proc import (
    Abort,
    CoreError,
    CoreProcClient,
    CoreStats,
    EngineDeadError,
    Outputs,
    Ready,
    Stop,
    Utility,
    UtilityResult,
    make_add_request,
)
from pagellm.engine.output_processor import OutputKind, OutputProcessor
from pagellm.engine.processor import ProcessedPrompt, Processor, PromptType
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "RequestStream", "EngineDeadError", "EngineShuttingDownError", "QueueFullError", "RequestFailedError"]

# Text longer than this is tokenized in a worker thread, so the event loop keeps serving other requests.
_THREAD_TOKENIZE_CHARS = 4096


class EngineShuttingDownError(RuntimeError):
    """The server is draining for shutdown and takes no new requests."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full (max_queued_requests)."""


class RequestFailedError(RuntimeError):
    """The core refused or dropped the request."""


@dataclass
class _RequestInfo:
    queue: asyncio.Queue
    arrival_time: float
    num_prompt_tokens: int
    n: int
    core: int = 0  # which engine core (data parallelism) runs it
    first_token_time: Optional[float] = None
    num_generation_tokens: int = 0


class AsyncLLM:
    def __init__(self, engine_args: Any, max_queued_requests: Optional[int] = None, log_level: str = "WARNING",
                 log_stats: bool = True) -> None:
        from pagellm.model_executor.loader.source import load_generation_eos_ids, load_tokenizer

        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be non-negative, got {max_queued_requests}")
        self.engine_args = engine_args
        self.config = engine_args.create_engine_config()
        mc = self.config.model_config
        self.model_config = mc
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(mc.source, mc.tokenizer)
        self.processor = Processor(mc, self.tokenizer, load_generation_eos_ids(mc.source))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.max_queued_requests = max_queued_requests
        self.max_num_seqs = self.config.scheduler_config.max_num_seqs
        self.log_level = log_level
        self.metrics = None
        if log_stats:
            from pagellm.metrics import Metrics

            self.metrics = Metrics(self.served_model_name)
        self.dp_size = self.config.parallel_config.data_parallel_size
        self.clients: list[CoreProcClient] = []
        self.core_pids: list[int] = []
        self.core_stats: list[CoreStats] = []
        self.core_loads: list[int] = []  # sequences in flight per core
        # Prefix affinity (data parallelism with prefix caching): hash of a prompt's first k full blocks -> the
        # core that was last given a prompt starting with them. LRU-bounded.
        self._prefix_owner: "collections.OrderedDict[int, int]" = collections.OrderedDict()
        self.requests: dict[str, _RequestInfo] = {}
        self.num_seqs_in_flight = 0
        self.last_stats = CoreStats()
        self.num_blocks = 0
        self.core_pid: Optional[int] = None
        self.accepting = True
        self.errored: Optional[str] = None
        self._handlers: list[asyncio.Task] = []
        self._utility_calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._ids = itertools.count()

    @property
    def client(self) -> Optional[CoreProcClient]:
        """The first engine core's client (the only one without data parallelism)."""
        return self.clients[0] if self.clients else None

    @property
    def served_model_name(self) -> str:
        mc = self.model_config
        return mc.served_model_name or mc.model

    # ---- lifecycle ----

    async def start(self, timeout: float = 900.0) -> None:
        """Start the core process(es) and wait until each has loaded the model."""
        for rank in range(self.dp_size):
            args = self.engine_args if self.dp_size == 1 else dataclasses.replace(self.engine_args,
                                                                                  data_parallel_rank=rank)
            self.clients.append(CoreProcClient(args, log_level=self.log_level))
        try:
            readies = [await self._wait_ready(client, rank, timeout) for rank, client in enumerate(self.clients)]
        except BaseException:
            for client in self.clients:
                client.close(timeout=1)
            raise
        self.core_pids = [r.pid for r in readies]
        self.core_pid = self.core_pids[0]
        self.num_blocks = sum(r.num_blocks for r in readies)
        self.core_stats = [CoreStats(num_blocks=r.num_blocks) for r in readies]
        self.core_loads = [0] * self.dp_size
        self.last_stats = CoreStats(num_blocks=self.num_blocks)
        if self.metrics:
            self.metrics.record_core_stats(self.last_stats)
        loop = asyncio.get_running_loop()
        for rank, client in enumerate(self.clients):
            try:
                loop.add_reader(client.proc.sentinel, self._on_core_exit, rank)
            except (NotImplementedError, ValueError):  # pragma: no cover - the poll timeout notices it too
                pass
            self._handlers.append(loop.create_task(self._output_handler(rank), name=f"pagellm-output-handler-{rank}"))

    async def _wait_ready(self, client: CoreProcClient, rank: int, timeout: float) -> Ready:
        sock = client.output_socket
        name = "the engine core" if self.dp_size == 1 else f"engine core {rank}"
        deadline = time.monotonic() + timeout
        while True:
            if await sock.poll(timeout=500):
                msg = client.decode(await sock.recv())
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, CoreError):
                    raise RuntimeError(msg.message)
                continue
            if not client.is_alive():
                raise RuntimeError(f"{name} process exited during startup (exit code {client.proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start within {timeout:.0f} s")

    def _on_core_exit(self, rank: int = 0) -> None:
        client = self.clients[rank]
        loop = asyncio.get_event_loop()
        try:
            loop.remove_reader(client.proc.sentinel)
        except Exception:
            pass
        if not client.closed:
            client.proc.join(0.1)
            name = "the engine core" if self.dp_size == 1 else f"engine core {rank}"
            self._fail(f"{name} process exited unexpectedly (exit code {client.proc.exitcode})")

    def _fail(self, message: str) -> None:
        """The core is gone: fail every request in flight, and every later one."""
        if self.errored is None:
            logger.error("engine failed: %s", message)
            self.errored = message
        for client in self.clients:
            client.dead = True
        for request_id, info in list(self.requests.items()):
            info.queue.put_nowait(EngineDeadError(message))
            self.output_processor.abort_request(request_id)
        for fut in self._utility_calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(message))

    @property
    def is_healthy(self) -> bool:
        return self.errored is None and bool(self.clients) and all(
            not c.closed and c.is_alive() for c in self.clients)

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
        """Cut the requests still in flight, stop the output handlers, and close the core process(es): each
        gets `timeout` seconds to exit, then is killed."""
        self.accepting = False
        self._cut_in_flight()
        for handler in self._handlers:
            handler.cancel()
            try:
                await handler
            except (asyncio.CancelledError, Exception):
                pass
        for client in self.clients:
            try:
                asyncio.get_running_loop().remove_reader(client.proc.sentinel)
            except Exception:
                pass
        await asyncio.gather(*(asyncio.to_thread(c.close, timeout) for c in self.clients))

    # ---- requests ----

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def check_admission(self, n: int = 1) -> None:
        """Raise if a request of n sequences cannot be taken now."""
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        if not self.clients or any(c.dead for c in self.clients):
            raise EngineDeadError("the engine core is not running")
        if not self.accepting:
            raise EngineShuttingDownError("the server is shutting down")
        if self.max_queued_requests is not None:
            stats = self.last_stats
            # Sequences beyond what can run wait. When the core reports a queue, what it runs now is the
            # capacity (the KV cache may hold fewer than max_num_seqs).
            capacity = self.max_num_seqs * self.dp_size
            if stats.num_waiting > 0 and stats.num_running > 0:
                capacity = min(capacity, stats.num_running)
            waiting = self.num_seqs_in_flight + n - capacity
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
    ) -> "RequestStream":
        """Validate and submit a request now; iterate the returned stream for its outputs.

        Raises ValueError (invalid request, naming the field), QueueFullError, EngineShuttingDownError or
        EngineDeadError before anything is submitted. A stream that is never iterated must be abort()ed.
        """
        request_id = request_id if request_id is not None else self.next_request_id()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        self.check_admission(params.n)
        processed = prompt if isinstance(prompt, ProcessedPrompt) else await self.tokenize(prompt)
        if self.config.scheduler_config.policy != "priority" and priority != 0:
            raise ValueError("priority: the server must run with --scheduling-policy priority to use priorities")
        requests = self.processor.make_requests(request_id, processed, params, priority=priority,
                                                strict_max_tokens=True)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_admission(params.n)  # tokenizing may have awaited
        core = self._route(processed.prompt_token_ids, requests[0].extra_keys if requests else None)
        self.output_processor.add_request(request_id, processed, params, output_kind)
        info = _RequestInfo(asyncio.Queue(), time.time(), len(processed.prompt_token_ids), params.n, core)
        self.requests[request_id] = info
        self.num_seqs_in_flight += params.n
        self.core_loads[core] += params.n
        if self.metrics:
            self.metrics.record_routed(core)
        try:
            for request in requests:
                self.clients[core].send(make_add_request(request))
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
            self.core_loads[info.core] -= info.n
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
        # A request whose core is unknown here is aborted everywhere (unknown ids are ignored by a core).
        for client in (self.clients if core is None else [self.clients[core]]):
            if not client.dead and not client.closed:
                try:
                    client.send(Abort(children))
                except EngineDeadError:
                    pass

    # ---- data parallelism: which core takes a request ----

    _AFFINITY_ENTRIES = 1 << 16

    def _route(self, prompt_token_ids: list[int], salt: Any = None) -> int:
        """The core for a new request: the least loaded one, unless prefix caching is on and some core was
        last given a prompt that shares at least half of this one's full blocks, and that core is not busier
        than the least loaded by more than half a batch (max_num_seqs / 2); then that core, whose prefix
        cache most likely still holds the shared part (a conversation's next turn)."""
        if self.dp_size == 1:
            return 0
        loads = self.core_loads
        least = min(range(self.dp_size), key=lambda i: (loads[i], i))
        cache = self.config.cache_config
        if not cache.enable_prefix_caching:
            return least
        bs = cache.block_size
        num_blocks = len(prompt_token_ids) // bs
        hashes, h = [], hash(("pagellm-dp", salt if isinstance(salt, (str, int, tuple)) else None))
        for b in range(num_blocks):
            h = hash((h, tuple(prompt_token_ids[b * bs:(b + 1) * bs])))
            hashes.append(h)
        choice = least
        for k in range(num_blocks, 0, -1):  # longest shared prefix first
            owner = self._prefix_owner.get(hashes[k - 1])
            if owner is not None:
                if 2 * k >= num_blocks and loads[owner] - loads[least] <= self.max_num_seqs // 2:
                    choice = owner
                break
        for h in hashes:
            self._prefix_owner[h] = choice
            self._prefix_owner.move_to_end(h)
        while len(self._prefix_owner) > self._AFFINITY_ENTRIES:
            self._prefix_owner.popitem(last=False)
        return choice

    # ---- utility calls ----

    async def call_utility(self, method: str, *args: Any, timeout: float = 10.0, core: int = 0) -> Any:
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = fut
        try:
            self.clients[core].send(Utility(call_id, method, list(args)))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._utility_calls.pop(call_id, None)

    async def call_utility_all(self, method: str, *args: Any, timeout: float = 10.0) -> list[Any]:
        """The call on every engine core (data parallelism); their results in core order."""
        return list(await asyncio.gather(*(self.call_utility(method, *args, timeout=timeout, core=i)
                                           for i in range(len(self.clients)))))

    async def refresh_stats(self, timeout: float = 1.0) -> CoreStats:
        """Ask the core for its numbers now (falls back to the last ones if it is slow to answer)."""
        try:
            import msgspec

            results = await self.call_utility_all("get_stats", timeout=timeout)
            for rank, result in enumerate(results):
                self._record_stats(msgspec.convert(result, CoreStats), rank)
        except (asyncio.TimeoutError, EngineDeadError, Exception) as e:  # noqa: BLE001 - metrics must not fail
            logger.debug("stats refresh failed: %s", e)
        return self.last_stats

    async def reset_prefix_cache(self) -> bool:
        return all(bool(r) for r in await self.call_utility_all("reset_prefix_cache"))

    # ---- the output handler ----

    def _record_stats(self, stats: CoreStats, core: int = 0) -> None:
        """One core's numbers; with data parallelism the engine's are the sums over its cores (KV cache
        usage: the mean), and the new queue times are this message's."""
        if self.dp_size == 1:
            self.last_stats = stats
        else:
            self.core_stats[core] = stats
            all_stats = self.core_stats
            self.last_stats = CoreStats(
                num_running=sum(s.num_running for s in all_stats),
                num_waiting=sum(s.num_waiting for s in all_stats),
                kv_cache_usage=sum(s.kv_cache_usage for s in all_stats) / len(all_stats),
                num_blocks=sum(s.num_blocks for s in all_stats),
                prefix_cache_queries=sum(s.prefix_cache_queries for s in all_stats),
                prefix_cache_hits=sum(s.prefix_cache_hits for s in all_stats),
                num_preemptions=sum(s.num_preemptions for s in all_stats),
                queue_times=list(stats.queue_times),
            )
        if self.metrics:
            self.metrics.record_core_stats(self.last_stats)

    async def _output_handler(self, core: int = 0) -> None:
        client = self.clients[core]
        sock = client.output_socket
        name = "the engine core" if self.dp_size == 1 else f"engine core {core}"
        try:
            while True:
                if not await sock.poll(timeout=1000):
                    if not client.is_alive() and not client.closed:
                        self._fail(f"{name} process exited unexpectedly (exit code {client.proc.exitcode})")
                        return
                    continue
                msg = client.decode(await sock.recv())
                if isinstance(msg, Outputs):
                    self._handle_outputs(msg, core)
                elif isinstance(msg, UtilityResult):
                    fut = self._utility_calls.get(msg.call_id)
                    if fut is not None and not fut.done():
                        if msg.error is not None:
                            fut.set_exception(RuntimeError(msg.error))
                        else:
                            fut.set_result(msg.result)
                elif isinstance(msg, CoreError):
                    self._fail(msg.message)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave requests hanging
            logger.exception("the output handler failed")
            self._fail(f"the output handler failed: {type(e).__name__}: {e}")

    def _handle_outputs(self, msg: Outputs, core: int = 0) -> None:
        if msg.stats is not None:
            self._record_stats(msg.stats, core)
        if not msg.outputs:
            return
        metrics = self.metrics
        now = time.time()
        if metrics:
            total = 0
            parents = self.output_processor.child_to_parent
            for out in msg.outputs:
                if not out.new_token_ids:
                    continue
                total += len(out.new_token_ids)
                info = self.requests.get(parents.get(out.req_id, ""))
                if info is not None:
                    if info.first_token_time is None:
                        info.first_token_time = now
                        metrics.record_first_token(now - info.arrival_time, info.num_prompt_tokens)
                    info.num_generation_tokens += len(out.new_token_ids)
            metrics.record_generation_tokens(total)
        request_outputs, stopped = self.output_processor.process_outputs(msg.outputs)
        client = self.clients[core]
        if stopped and not client.dead:
            try:
                client.send(Stop(stopped))
            except EngineDeadError:
                pass
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

    def abort(self) -> None:
        """Abort the request if it has not finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self.engine._release(self.request_id, abort=True)
