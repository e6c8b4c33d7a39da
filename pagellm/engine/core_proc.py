"""The EngineCore busy loop in its own process (the API process's side is core_client.py).

ZMQ PUSH/PULL pairs over ipc:// sockets in a private (0700) temporary folder carry the msgpack messages of
core_messages.py, never pickles: one pair per client. One API process is the core's only client; behind
several (`--api-server-count`), the core reads every client's input socket, sends each request's outputs back
to the client that sent it and its stats to all of them.

The core process blocks on its input socket while it has nothing to do, drains every pending input message
between steps, and steps while any request is unfinished. Every request it receives is answered: one it cannot
decode or admit gets an output with its error at once. If the core raises, it sends a CoreError and exits; it
also exits when its parent process dies (PR_SET_PDEATHSIG where available, and a parent-pid check).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from typing import Any, Optional, Sequence, Union

import msgspec
import zmq

from pagellm.engine.core_messages import (
    Abort,
    CoreError,
    EngineCoreRequest,
    InputMessage,
    Outputs,
    Ready,
    Shutdown,
    Stop,
    Utility,
    UtilityResult,
    client_index_of,
    refused,
    request_id_of,
)

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000  # how often an idle core checks that its parent is alive


def set_parent_death_signal() -> None:
    """Linux: the kernel kills this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort; the parent-pid check remains
        pass


Addresses = Union[str, Sequence[str]]


def _addresses(addr: Addresses) -> list[str]:
    return [addr] if isinstance(addr, str) else list(addr)


class EngineCoreProc:
    """Owns an EngineCore and its sockets; `run()` is the busy loop.

    One input socket connected to every client's input address (ZMQ fair-queues them), one output socket per
    client (client i's at index i) and, when the process that started the core is not one of its clients (the
    launcher of several API processes), a control output that gets only Ready and CoreError.
    """

    def __init__(self, engine_core: Any, input_addr: Addresses, output_addr: Addresses, parent_pid: int,
                 control_addr: Optional[str] = None) -> None:
        self.core = engine_core
        self.parent_pid = parent_pid
        self.ctx = zmq.Context(io_threads=1)
        self.input = self.ctx.socket(zmq.PULL)
        self.input.setsockopt(zmq.RCVHWM, 0)
        self.input.setsockopt(zmq.LINGER, 0)
        for addr in _addresses(input_addr):
            self.input.connect(addr)
        self.outputs = [self._push(addr) for addr in _addresses(output_addr)]
        self.control = self._push(control_addr) if control_addr is not None else None
        self.decoder = msgspec.msgpack.Decoder(InputMessage)
        self.encoder = msgspec.msgpack.Encoder()
        self.poller = zmq.Poller()
        self.poller.register(self.input, zmq.POLLIN)
        self.should_stop = False
        self.state_changed = False  # requests came or went since the last stats message
        # Several clients: which one sent each request in flight; queue times taken by a client's get_stats call,
        # to go out to all of them with the next stats. Chosen once: one client needs neither.
        self.owners: Optional[dict[str, int]] = {} if len(self.outputs) > 1 else None
        self.pending_queue_times: list[float] = []
        self.publish = self._publish_to_one if self.owners is None else self._publish_to_each

    def _push(self, addr: str) -> Any:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(addr)
        return sock

    def send(self, msg: Any, client: int = 0) -> None:
        self.outputs[client].send(self.encoder.encode(msg), copy=False)

    def broadcast(self, msg: Any) -> None:
        """To every client, and to the control output."""
        frame = self.encoder.encode(msg)
        for sock in self.outputs + ([self.control] if self.control is not None else []):
            sock.send(frame, copy=False)

    def _client(self, index: int) -> int:
        """A sender's index, or client 0's if it names none of this core's clients."""
        return index if 0 <= index < len(self.outputs) else 0

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    # ---- stats ----

    def stats(self) -> Any:
        stats = self.core.stats()
        if self.pending_queue_times:
            stats.queue_times = self.pending_queue_times + list(stats.queue_times)
            self.pending_queue_times = []
        return stats

    def _publish_to_one(self, outputs: list[Any]) -> None:
        self.send(Outputs(outputs, self.stats()))

    def _publish_to_each(self, outputs: list[Any]) -> None:
        """Each client gets its own requests' outputs and everyone's stats (one message per client)."""
        stats = self.stats()
        owners = self.owners
        per_client: list[list[Any]] = [[] for _ in self.outputs]
        for out in outputs:
            client = owners.get(out.req_id)
            if client is None:  # aborted or stopped by its client since: nobody waits for it
                continue
            per_client[client].append(out)
            if out.finished:
                del owners[out.req_id]
        stats_only = None
        for sock, outs in zip(self.outputs, per_client):
            if outs:
                frame = self.encoder.encode(Outputs(outs, stats))
            else:
                frame = stats_only = stats_only or self.encoder.encode(Outputs([], stats))
            sock.send(frame, copy=False)

    # ---- input ----

    def handle_frame(self, frame: Any) -> None:
        """Decode one input message and handle it. A request that does not decode is answered with an error
        (when its id can be read), never dropped: its client would wait forever."""
        try:
            msg = self.decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            req_id = request_id_of(bytes(frame))
            if req_id is None:
                logger.error("dropped an undecodable input message: %s", e)
                return
            logger.warning("refused request %s: %s", req_id, e)
            self.state_changed = True
            self.send(Outputs([refused(req_id, f"the engine core could not read the request: {e}")]),
                      self._client(client_index_of(bytes(frame))))
            return
        self.handle(msg)

    def handle(self, msg: InputMessage) -> None:
        if isinstance(msg, (EngineCoreRequest, Abort, Stop)):
            self.state_changed = True
        if isinstance(msg, EngineCoreRequest):
            client = self._client(msg.client_index)
            try:
                self.core.add_request(msg)
            except ValueError as e:  # checked in the API process already; answer, never die of it
                logger.warning("refused request %s: %s", msg.request_id, e)
                self.send(Outputs([refused(msg.request_id, str(e))]), client)
                return
            if self.owners is not None:
                self.owners[msg.request_id] = client
        elif isinstance(msg, Abort):
            self.core.abort_requests(self._senders_own(msg))
        elif isinstance(msg, Stop):
            self.core.stop_requests(self._senders_own(msg))
        elif isinstance(msg, Utility):
            self.send(self.call_utility(msg), self._client(msg.client_index))
        elif isinstance(msg, Shutdown):
            self.should_stop = True

    def _senders_own(self, msg: Union[Abort, Stop]) -> list[str]:
        """The ids of an Abort or Stop that its sender owns (several clients: the others' are left alone), which
        leave the owners table."""
        if self.owners is None:
            return msg.request_ids
        ids = [i for i in msg.request_ids if self.owners.get(i) == msg.client_index]
        for i in ids:
            del self.owners[i]
        return ids

    def call_utility(self, msg: Utility) -> UtilityResult:
        try:
            if msg.method == "get_stats":
                stats = self.stats()
                if self.owners is not None:  # several clients: the queue times go out to all of them
                    self.pending_queue_times, stats.queue_times = list(stats.queue_times), []
                result: Any = msgspec.to_builtins(stats)
            elif msg.method == "reset_prefix_cache":
                result = bool(self.core.scheduler.reset_prefix_cache())
            elif msg.method == "ping":
                result = "pong"
            else:
                return UtilityResult(msg.call_id, error=f"unknown utility method {msg.method!r}")
            return UtilityResult(msg.call_id, result=result)
        except Exception as e:  # a utility call's failure is the caller's problem, not the core's
            return UtilityResult(msg.call_id, error=f"{type(e).__name__}: {e}")

    def drain_input(self, timeout_ms: int) -> bool:
        """Handle every pending message; wait up to timeout_ms for the first. Returns whether any came."""
        got = False
        if self.poller.poll(timeout_ms):
            while True:
                try:
                    frame = self.input.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                got = True
                self.handle_frame(frame.buffer)
        return got

    # ---- the loop ----

    def run(self) -> None:
        while not self.should_stop:
            if not self.parent_alive():
                logger.warning("the process that started the engine core is gone; the engine core exits")
                return
            busy = self.core.has_unfinished_requests()
            if not self.drain_input(0 if busy else _IDLE_POLL_MS) and not busy:
                # Idle: notice a dead worker now rather than at the next request (raises WorkerDiedError).
                check = getattr(self.core, "check_health", None)
                if check is not None:
                    check()
            if self.should_stop:
                return
            if self.core.has_unfinished_requests():
                outputs = self.core.step()
                self.state_changed = False
                self.publish(outputs)
            elif self.state_changed:
                # Aborts or stops emptied the engine: publish the freed blocks for /metrics.
                self.state_changed = False
                self.publish([])

    def run_and_report(self) -> int:
        """run(); if the core raises, tell its clients (CoreError) and return exit code 1."""
        try:
            self.run()
            return 0
        except Exception as e:
            logger.error("engine core died:\n%s", traceback.format_exc())
            try:
                self.broadcast(CoreError(f"engine core died: {type(e).__name__}: {e}"))
            except Exception:
                pass
            return 1

    def close(self) -> None:
        self.input.close(linger=0)
        for sock in self.outputs + ([self.control] if self.control is not None else []):
            sock.close(linger=2000)
        self.ctx.term()


def run_engine_core(engine_args: Any, input_addr: Addresses, output_addr: Addresses, parent_pid: int,
                    log_level: str = "WARNING", control_addr: Optional[str] = None) -> None:
    """Entry point of the core process (multiprocessing spawn target); the addresses as EngineCoreProc's."""
    set_parent_death_signal()
    # The process that started the core owns shutdown: a Ctrl-C or SIGTERM sent to the whole process group
    # must not kill the core under requests that the API process(es) are still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s [core] %(name)s: %(message)s")
    try:
        from pagellm.engine.core import EngineCore

        config = engine_args.create_engine_config()
        core = EngineCore(config)
    except BaseException as e:
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        _report_startup_failure(_addresses(output_addr) + ([control_addr] if control_addr else []),
                                CoreError(f"engine core failed to start: {type(e).__name__}: {e}"))
        sys.exit(1)

    proc = EngineCoreProc(core, input_addr, output_addr, parent_pid, control_addr)
    proc.broadcast(Ready(num_blocks=config.cache_config.num_blocks or 0, pid=os.getpid()))
    code = 1
    try:
        code = proc.run_and_report()
    finally:
        try:
            core.shutdown()
        except Exception:
            pass
        proc.close()
    # Skip the interpreter's teardown (about a second with torch loaded): everything is closed already.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_startup_failure(addrs: list[str], error: CoreError) -> None:
    """Tell every client (before an EngineCoreProc exists): one socket per address, as a PUSH socket connected
    to several would hand the message to one of them only."""
    ctx = zmq.Context()
    frame = msgspec.msgpack.encode(error)
    for addr in addrs:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(addr)
        sock.send(frame)
        sock.close(linger=2000)
    ctx.term()
