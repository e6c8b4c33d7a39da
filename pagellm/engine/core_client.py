"""The API process's side of the engine core process(es): starting them, the asyncio tasks that read their
sockets, utility calls, and noticing that one has died.

- `CoreProcClient` starts one core process (core_proc.py) and owns this process's ends of its two sockets.
  The launcher of several API processes (`--api-server-count`) starts each core with one too, as a control
  connection (Ready, Shutdown), and names the API processes' sockets the core also connects to.
- `CoreConnection` is such an API process's pair of sockets to a core the launcher started (`SharedCores`
  says where): closing it leaves the core running, and the core's death shows on a pidfd.
- `CoreClient` holds one of them per engine core (data parallelism: N cores) and one output task per core.
  Each Outputs message goes to its `on_outputs(msg, core)` callback (the AsyncLLM's request side); a core that
  fails (CoreError, or its process exits) fails the whole engine: `on_failure(message)`, every utility call in
  flight, and every later send (EngineDeadError).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import select
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import msgspec
import zmq

from pagellm.engine.core_messages import (
    Abort,
    CoreError,
    CoreStats,
    InputMessage,
    OutputMessage,
    Outputs,
    Ready,
    Shutdown,
    Stop,
    Utility,
    UtilityResult,
)
from pagellm.engine.core_proc import run_engine_core

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core process failed or exited; nothing more will come from it."""


class _CoreSockets:
    """This process's ends of one core's pair of sockets: it binds both, the core connects to them.

    Sending is synchronous and never blocks (unbounded high-water mark), so it can be done from any code on
    the event loop, including `finally` blocks of cancelled tasks. Receiving is done by the async engine on
    `output_socket` (a zmq.asyncio socket).
    """

    def _bind(self, input_addr: str, output_addr: str, monitor_input: bool = False) -> None:
        """`monitor_input`: watch the input socket for a peer's handshake (self._monitor), from before it is
        bound, so that a peer already waiting to connect cannot handshake unseen."""
        import zmq.asyncio

        self.sync_ctx = zmq.Context()
        self.input_socket = self.sync_ctx.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        if monitor_input:
            self._monitor = self.input_socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.input_socket.bind(input_addr)
        self.async_ctx = zmq.asyncio.Context()
        self.output_socket = self.async_ctx.socket(zmq.PULL)
        self.output_socket.setsockopt(zmq.RCVHWM, 0)
        self.output_socket.setsockopt(zmq.LINGER, 0)
        self.output_socket.bind(output_addr)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(OutputMessage)
        self.dead = False
        self.closed = False

    def send(self, msg: InputMessage) -> None:
        if self.dead or self.closed:
            raise EngineDeadError("the engine core is not running")
        try:
            self.input_socket.send(self.encoder.encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            raise EngineDeadError(f"cannot reach the engine core: {e}") from e

    def decode(self, frame: bytes) -> OutputMessage:
        return self.decoder.decode(frame)


class CoreProcClient(_CoreSockets):
    """Starts a core process and owns this process's ends of its sockets.

    `clients`: the (input, output) addresses of the API processes that will also use this core (the launcher
    of several API processes); this connection then gets only Ready and CoreError, and sends Shutdown.
    """

    def __init__(self, engine_args: Any, log_level: str = "WARNING",
                 clients: Sequence[tuple[str, str]] = ()) -> None:
        import multiprocessing

        self.tmpdir = tempfile.mkdtemp(prefix="pagellm-")
        os.chmod(self.tmpdir, 0o700)
        input_addr = f"ipc://{self.tmpdir}/input"
        output_addr = f"ipc://{self.tmpdir}/output"
        self._bind(input_addr, output_addr)
        core_inputs: Union[str, list[str]] = input_addr
        core_outputs: Union[str, list[str]] = output_addr
        control = None
        if clients:
            core_inputs = [input_addr] + [i for i, _ in clients]
            core_outputs, control = [o for _, o in clients], output_addr
        mp = multiprocessing.get_context("spawn")
        self.proc = mp.Process(
            target=run_engine_core, name="pagellm-engine-core",
            args=(engine_args, core_inputs, core_outputs, os.getpid(), log_level, control),
        )
        self.proc.start()

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    @property
    def sentinel(self) -> int:
        """A file descriptor that turns readable when the core process exits."""
        return self.proc.sentinel

    def exit_note(self) -> str:
        """How the process ended, for the error message (it has exited)."""
        self.proc.join(0.1)
        return f" (exit code {self.proc.exitcode})"

    def close(self, timeout: float = 10.0, quiet: bool = False) -> None:
        """Ask the core to exit, wait up to `timeout`, then kill it (`quiet`: without a warning, for a core
        that is not wanted any more, e.g. when this process failed to start). Idempotent."""
        if self.closed:
            return
        if self.proc.is_alive() and not self.dead:
            try:
                self.input_socket.send(self.encoder.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.closed = True
        self.proc.join(timeout)
        if self.proc.is_alive():
            if not quiet:
                logger.warning("the engine core did not exit in %.0f s: killing it", timeout)
            self.proc.kill()
            self.proc.join(5)
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.sync_ctx.term()
        self.async_ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class InheritedFd:
    """A file descriptor handed to a spawned child process: multiprocessing passes it on at spawn time (as it
    does a socket), so the child holds the same open file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        from multiprocessing import reduction

        return _inherit_fd, (reduction.DupFd(self.fd),)


def _inherit_fd(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())


@dataclass
class SharedCores:
    """Where one API process of several (`--api-server-count`) finds the engine cores the launcher started."""

    client_index: int  # this API process's index: 0, 1, ...
    sockets: list[tuple[str, str]]  # per core: the (input, output) addresses this process binds
    pids: list[int]  # per core
    pidfds: list[Optional[InheritedFd]] = field(default_factory=list)  # per core, where Linux has pidfds


class CoreConnection(_CoreSockets):
    """An API process's sockets to an engine core it did not start (see SharedCores)."""

    def __init__(self, input_addr: str, output_addr: str, pid: int, pidfd: Optional[InheritedFd]) -> None:
        # The core connects to this process's input socket (retrying until it is bound): until it has, a send
        # finds no peer. `wait_connected` waits for that handshake (watched from before the bind: a core
        # retrying its connect can handshake the moment the socket is bound).
        self._bind(input_addr, output_addr, monitor_input=True)
        self.pid = pid
        self.pidfd = pidfd.fd if pidfd is not None else None

    async def wait_connected(self, name: str, timeout: float) -> None:
        """Wait until the core has connected to this process's input socket (RuntimeError if it exits first)."""
        from zmq.utils.monitor import recv_monitor_message

        deadline = time.monotonic() + timeout
        try:
            while not self._monitor.poll(0):
                if not self.is_alive():
                    raise RuntimeError(f"{name} process exited during startup{self.exit_note()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not connect within {timeout:.0f} s")
                await asyncio.sleep(0.01)
            recv_monitor_message(self._monitor)
        finally:
            self.input_socket.disable_monitor()
            self._monitor.close(linger=0)

    @property
    def sentinel(self) -> Optional[int]:
        """The core's pidfd: readable once the process has exited (None: is_alive() polls the pid)."""
        return self.pidfd

    def is_alive(self) -> bool:
        if self.pidfd is not None:
            return not select.select([self.pidfd], [], [], 0)[0]
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def exit_note(self) -> str:
        return f" (pid {self.pid})"

    def close(self, timeout: float = 10.0, quiet: bool = False) -> None:
        """Close this process's sockets; the core goes on (its launcher stops it). Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.sync_ctx.term()
        self.async_ctx.term()
        if self.pidfd is not None:
            os.close(self.pidfd)


async def wait_ready(client: Any, name: str, timeout: float) -> Ready:
    """Wait for a core's Ready message (it has loaded the model); RuntimeError if it fails or exits first."""
    sock = client.output_socket
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
            raise RuntimeError(f"{name} process exited during startup{client.exit_note()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start within {timeout:.0f} s")


class CoreClient:
    """The engine cores of one AsyncLLM, as seen from its event loop (see the module's docstring)."""

    def __init__(self, engine_args: Any, dp_size: int, log_level: str,
                 on_outputs: Callable[[Outputs, int], None], on_failure: Callable[[str], None],
                 shared: Optional[SharedCores] = None) -> None:
        """`shared`: connect to the cores a launcher started instead of starting them."""
        self.engine_args = engine_args
        self.dp_size = dp_size
        self.log_level = log_level
        self.on_outputs = on_outputs
        self.on_failure = on_failure
        self.shared = shared
        self.client_index = shared.client_index if shared is not None else 0
        self.clients: list[Union[CoreProcClient, CoreConnection]] = []  # one per engine core
        self.core_pids: list[int] = []
        self.num_blocks = 0
        self.core_stats: list[CoreStats] = [CoreStats() for _ in range(dp_size)]  # updated in place
        self.last_stats = CoreStats()  # the engine's: one core's, or the sums over the cores
        self.errored: Optional[str] = None
        self._handlers: list[asyncio.Task] = []
        self._utility_calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()

    def name(self, rank: int) -> str:
        return "the engine core" if self.dp_size == 1 else f"engine core {rank}"

    # ---- lifecycle ----

    def launch(self) -> None:
        """Start the core process(es), or bind the sockets the launcher's cores connect to; start() waits for
        them. Idempotent. Called as early as possible: a core spends seconds importing and loading the model,
        which overlaps with the API process's own start-up."""
        import dataclasses

        if self.clients:
            return
        shared = self.shared
        for rank in range(self.dp_size):
            if shared is not None:
                pidfd = shared.pidfds[rank] if shared.pidfds else None
                self.clients.append(CoreConnection(*shared.sockets[rank], shared.pids[rank], pidfd))
                continue
            args = self.engine_args if self.dp_size == 1 else dataclasses.replace(self.engine_args,
                                                                                  data_parallel_rank=rank)
            self.clients.append(CoreProcClient(args, log_level=self.log_level))

    async def start(self, timeout: float = 900.0) -> None:
        """Launch the cores (if not yet) and wait until each has loaded the model (and, for the launcher's
        cores, has connected to this process)."""
        try:
            self.launch()
            readies = [await wait_ready(client, self.name(rank), timeout) for rank, client in enumerate(self.clients)]
            for rank, client in enumerate(self.clients):
                if isinstance(client, CoreConnection):
                    await client.wait_connected(self.name(rank), timeout)
        except BaseException:
            for client in self.clients:
                client.close(timeout=1)
            raise
        self.core_pids = [r.pid for r in readies]
        self.num_blocks = sum(r.num_blocks for r in readies)
        self.core_stats[:] = [CoreStats(num_blocks=r.num_blocks) for r in readies]
        self.last_stats = CoreStats(num_blocks=self.num_blocks)
        loop = asyncio.get_running_loop()
        for rank, client in enumerate(self.clients):
            try:
                if client.sentinel is not None:
                    loop.add_reader(client.sentinel, self._on_core_exit, rank)
            except (NotImplementedError, ValueError):  # pragma: no cover - the poll timeout notices it too
                pass
            self._handlers.append(loop.create_task(self._output_handler(rank), name=f"pagellm-output-handler-{rank}"))

    def _on_core_exit(self, rank: int = 0) -> None:
        client = self.clients[rank]
        loop = asyncio.get_event_loop()
        try:
            loop.remove_reader(client.sentinel)
        except Exception:
            pass
        if not client.closed:
            self._fail(f"{self.name(rank)} process exited unexpectedly{client.exit_note()}")

    def _fail(self, message: str) -> None:
        """A core is gone: fail every request in flight, every utility call, and every later request."""
        if self.errored is None:
            logger.error("engine failed: %s", message)
            self.errored = message
        for client in self.clients:
            client.dead = True
        self.on_failure(message)
        for fut in self._utility_calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(message))

    @property
    def is_healthy(self) -> bool:
        return self.errored is None and bool(self.clients) and all(
            not c.closed and c.is_alive() for c in self.clients)

    def check_alive(self) -> None:
        """Raise EngineDeadError unless every core can take requests."""
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        if not self.clients or any(c.dead for c in self.clients):
            raise EngineDeadError("the engine core is not running")

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the output tasks, then the cores (each gets up to `timeout` seconds to exit)."""
        for handler in self._handlers:
            handler.cancel()
            try:
                await handler
            except (asyncio.CancelledError, Exception):
                pass
        for client in self.clients:
            try:
                if client.sentinel is not None:
                    asyncio.get_running_loop().remove_reader(client.sentinel)
            except Exception:
                pass
        await asyncio.gather(*(asyncio.to_thread(c.close, timeout) for c in self.clients))

    # ---- input ----

    def send(self, core: int, msg: InputMessage) -> None:
        """Send to one core (EngineDeadError if it cannot take it)."""
        self.clients[core].send(msg)

    def _send_quietly(self, clients: list[Any], msg: InputMessage) -> None:
        for client in clients:
            if not client.dead and not client.closed:
                try:
                    client.send(msg)
                except EngineDeadError:
                    pass

    def abort(self, request_ids: list[str], core: Optional[int]) -> None:
        """Abort sequences in their core; a core unknown here (None) means every core (unknown ids are
        ignored by a core)."""
        self._send_quietly(self.clients if core is None else [self.clients[core]],
                           Abort(request_ids, self.client_index))

    def stop(self, request_ids: list[str], core: int) -> None:
        """Finish sequences that met a stop string (found by this process's detokenizer)."""
        self._send_quietly([self.clients[core]], Stop(request_ids, self.client_index))

    # ---- utility calls ----

    async def call_utility(self, method: str, *args: Any, timeout: float = 10.0, core: int = 0) -> Any:
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = fut
        try:
            self.clients[core].send(Utility(call_id, method, list(args), self.client_index))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._utility_calls.pop(call_id, None)

    async def call_utility_all(self, method: str, *args: Any, timeout: float = 10.0) -> list[Any]:
        """The call on every engine core (data parallelism); their results in core order."""
        return list(await asyncio.gather(*(self.call_utility(method, *args, timeout=timeout, core=i)
                                           for i in range(len(self.clients)))))

    # ---- output ----

    def record_stats(self, stats: CoreStats, core: int = 0) -> CoreStats:
        """One core's numbers; returns the engine's: with data parallelism the sums over its cores (KV cache
        usage: the mean), and the new queue times are this message's."""
        self.core_stats[core] = stats
        if self.dp_size == 1:
            self.last_stats = stats
        else:
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
                spec_num_drafts=sum(s.spec_num_drafts for s in all_stats),
                spec_num_draft_tokens=sum(s.spec_num_draft_tokens for s in all_stats),
                spec_num_accepted_tokens=sum(s.spec_num_accepted_tokens for s in all_stats),
                spec_num_accepted_per_pos=[sum(col) for col in itertools.zip_longest(
                    *(s.spec_num_accepted_per_pos for s in all_stats), fillvalue=0)],
            )
        return self.last_stats

    async def _output_handler(self, core: int = 0) -> None:
        client = self.clients[core]
        sock = client.output_socket
        name = self.name(core)
        try:
            while True:
                if not await sock.poll(timeout=1000):
                    if not client.is_alive() and not client.closed:
                        self._fail(f"{name} process exited unexpectedly{client.exit_note()}")
                        return
                    continue
                msg = client.decode(await sock.recv())
                if isinstance(msg, Outputs):
                    self.on_outputs(msg, core)
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
