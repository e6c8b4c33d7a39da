"""The EngineCore busy loop in its own process (the API process's side is core_client.py).

Two ZMQ PUSH/PULL pairs over ipc:// sockets in a private (0700) temporary folder carry the msgpack messages
of core_messages.py, never pickles.

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
from typing import Any

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
    refused,
    request_id_of,
)

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000  # how often an idle core checks that its parent is alive


def _set_parent_death_signal() -> None:
    """Linux: the kernel kills this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort; the parent-pid check remains
        pass


class EngineCoreProc:
    """Owns an EngineCore and the two sockets; `run()` is the busy loop."""

    def __init__(self, engine_core: Any, input_addr: str, output_addr: str, parent_pid: int) -> None:
        self.core = engine_core
        self.parent_pid = parent_pid
        self.ctx = zmq.Context(io_threads=1)
        self.input = self.ctx.socket(zmq.PULL)
        self.input.setsockopt(zmq.RCVHWM, 0)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(input_addr)
        self.output = self.ctx.socket(zmq.PUSH)
        self.output.setsockopt(zmq.SNDHWM, 0)
        self.output.setsockopt(zmq.LINGER, 2000)
        self.output.connect(output_addr)
        self.decoder = msgspec.msgpack.Decoder(InputMessage)
        self.encoder = msgspec.msgpack.Encoder()
        self.poller = zmq.Poller()
        self.poller.register(self.input, zmq.POLLIN)
        self.should_stop = False
        self.state_changed = False  # requests came or went since the last stats message

    def send(self, msg: Any) -> None:
        self.output.send(self.encoder.encode(msg), copy=False)

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    # ---- stats ----

    def stats(self) -> Any:
        return self.core.stats()

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
            self.send(Outputs([refused(req_id, f"the engine core could not read the request: {e}")]))
            return
        self.handle(msg)

    def handle(self, msg: InputMessage) -> None:
        if isinstance(msg, (EngineCoreRequest, Abort, Stop)):
            self.state_changed = True
        if isinstance(msg, EngineCoreRequest):
            try:
                self.core.add_request(msg)
            except ValueError as e:  # checked in the API process already; answer, never die of it
                logger.warning("refused request %s: %s", msg.request_id, e)
                self.send(Outputs([refused(msg.request_id, str(e))]))
        elif isinstance(msg, Abort):
            self.core.abort_requests(msg.request_ids)
        elif isinstance(msg, Stop):
            self.core.stop_requests(msg.request_ids)
        elif isinstance(msg, Utility):
            self.send(self.call_utility(msg))
        elif isinstance(msg, Shutdown):
            self.should_stop = True

    def call_utility(self, msg: Utility) -> UtilityResult:
        try:
            if msg.method == "get_stats":
                result: Any = msgspec.to_builtins(self.stats())
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
                logger.warning("the API process is gone; the engine core exits")
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
                self.send(Outputs(outputs, self.stats()))
            elif self.state_changed:
                # Aborts or stops emptied the engine: publish the freed blocks for /metrics.
                self.state_changed = False
                self.send(Outputs([], self.stats()))

    def run_and_report(self) -> int:
        """run(); if the core raises, tell the API process (CoreError) and return exit code 1."""
        try:
            self.run()
            return 0
        except Exception as e:
            logger.error("engine core died:\n%s", traceback.format_exc())
            try:
                self.send(CoreError(f"engine core died: {type(e).__name__}: {e}"))
            except Exception:
                pass
            return 1

    def close(self) -> None:
        self.input.close(linger=0)
        self.output.close(linger=2000)
        self.ctx.term()


def run_engine_core(engine_args: Any, input_addr: str, output_addr: str, parent_pid: int,
                    log_level: str = "WARNING") -> None:
    """Entry point of the core process (multiprocessing spawn target)."""
    _set_parent_death_signal()
    # The API process owns shutdown: a Ctrl-C or SIGTERM sent to the whole process group must not kill the
    # core under requests that the API process is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s [core] %(name)s: %(message)s")
    ctx = zmq.Context()
    early = ctx.socket(zmq.PUSH)  # for a startup failure, before the EngineCoreProc exists
    early.setsockopt(zmq.LINGER, 2000)
    early.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        from pagellm.engine.core import EngineCore

        config = engine_args.create_engine_config()
        core = EngineCore(config)
    except BaseException as e:
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        early.send(encoder.encode(CoreError(f"engine core failed to start: {type(e).__name__}: {e}")))
        early.close(linger=2000)
        ctx.term()
        sys.exit(1)
    early.close(linger=2000)
    ctx.term()

    proc = EngineCoreProc(core, input_addr, output_addr, parent_pid)
    proc.send(Ready(num_blocks=config.cache_config.num_blocks or 0, pid=os.getpid()))
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
