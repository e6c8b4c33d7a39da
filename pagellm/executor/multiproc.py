"""MultiprocExecutor: one worker process per rank on this machine (spawned), for tensor/pipeline parallelism.

The workers form one torch.distributed group (NCCL on GPUs, gloo on CPUs) that carries the activations
(all-reduce, all-gather, pipeline send/recv) and the sampled tokens (a broadcast from the driver). The engine
talks to them over ZMQ sockets in a private (0700) temporary folder that only these processes reach, in msgpack
(executor/messages.py), never pickle: each step is encoded once and the same bytes go to every worker; only the
driver (TP rank 0 of the last stage) answers, with the sampled tokens. The rendezvous is a FileStore there too.

Steps are launched, not run: a worker launches each step as it arrives and, on the driver, a second thread
waits for the step's tokens and sends them. So the engine can send step N+1 while step N runs (async
scheduling), and every stage of a pipeline works on its own batch.

A worker that dies, raises, or gives no answer within `distributed_step_timeout` makes the step raise
WorkerDiedError (its process sentinel is polled beside the socket), and every later call too: the engine fails
cleanly instead of waiting on a collective forever.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Optional

import zmq

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.executor import messages as m
from pagellm.executor.base import Executor, WorkerDiedError, worker_threads

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000  # how often an idle worker checks that the engine is alive


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


class _WorkerLoop:
    """A worker process's side: launch each step as it comes; on the driver, a thread sends the answers."""

    def __init__(self, worker: Any, rank: int, input_addr: str, output_addr: str) -> None:
        self.worker = worker
        self.rank = rank
        self.output_addr = output_addr
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PULL)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(input_addr)
        self.output = self._connect_output()
        self.encoder = m.encoder()
        self.decoder = m.input_decoder()
        self.parent = os.getppid()
        self.pending: "queue.Queue[Any]" = queue.Queue()
        self.answers: Optional[threading.Thread] = None
        if worker.is_driver:
            self.answers = threading.Thread(target=self._answer_steps, name="pagellm-step-answers", daemon=True)
            self.answers.start()

    def _connect_output(self) -> Any:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(self.output_addr)
        return sock

    def fail(self, message: str, sock: Any = None) -> None:
        (sock or self.output).send(self.encoder.encode(m.WorkerFailed(self.rank, message)))

    def _answer_steps(self) -> None:
        """The driver's second thread (with its own socket: ZMQ sockets are not shared between threads)."""
        sock = self._connect_output()
        encoder = m.encoder()
        while True:
            pending = self.pending.get()
            if pending is None:
                break
            try:
                sock.send(encoder.encode(m.StepResult(pending.result())))
            except BaseException as e:  # noqa: BLE001 - reported, then this worker is done
                self.fail(f"worker {self.rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}", sock)
                break
        sock.close(linger=2000)

    def run(self) -> int:
        while True:
            if not self.input.poll(_PARENT_CHECK_MS):
                if os.getppid() != self.parent:
                    return 0  # the engine is gone
                continue
            msg = self.decoder.decode(self.input.recv(copy=False).buffer)
            if isinstance(msg, m.StopWorker):
                return 0
            try:
                if isinstance(msg, m.ExecuteStep):
                    pending = self.worker.execute_model_async(msg.step)
                    if self.answers is not None:
                        self.pending.put(pending)
                elif msg.method not in m.WORKER_METHODS:
                    raise ValueError(f"unknown worker method {msg.method!r}")
                else:
                    value = getattr(self.worker, msg.method)(*msg.args)
                    self.output.send(self.encoder.encode(m.CallResult(self.rank, value)))
            except BaseException as e:  # noqa: BLE001 - reported, then this worker is done
                self.fail(f"worker {self.rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                return 1

    def close(self) -> None:
        if self.answers is not None:
            self.pending.put(None)
            self.answers.join(10)
        self.input.close(linger=0)
        self.output.close(linger=2000)
        self.ctx.term()


def worker_main(config: EngineConfig, rank: int, init_method: str, input_addr: str, output_addr: str,
                num_threads: int, log_level: int) -> None:
    """Body of a worker process: build the Worker, then answer messages until told to stop."""
    _set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine owns shutdown
    logging.basicConfig(level=log_level, format=f"%(levelname)s [worker {rank}] %(name)s: %(message)s")
    import torch

    torch.set_num_threads(num_threads)
    from pagellm.distributed.parallel_state import destroy_distributed_environment
    from pagellm.worker.worker import Worker

    code = 1
    loop = None
    try:
        worker = Worker(config, rank=rank, distributed_init_method=init_method)
        loop = _WorkerLoop(worker, rank, input_addr, output_addr)
        loop.output.send(loop.encoder.encode(m.CallResult(rank, os.getpid())))
        code = loop.run()
    except BaseException as e:  # noqa: BLE001 - a start-up failure is reported like any other
        message = f"worker {rank} failed to start: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        if loop is not None:
            loop.fail(message)
        else:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(output_addr)
            sock.send(m.encoder().encode(m.WorkerFailed(rank, message)))
            sock.close(linger=2000)
            ctx.term()
    finally:
        if loop is not None:
            loop.close()
    destroy_distributed_environment()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        pc = config.parallel_config
        self.world_size = pc.world_size
        self.driver_rank = (pc.pipeline_parallel_size - 1) * pc.tensor_parallel_size
        self.tmpdir = tempfile.mkdtemp(prefix="pagellm-dist-")
        os.chmod(self.tmpdir, 0o700)
        init_method = f"file://{self.tmpdir}/rendezvous"
        output_addr = f"ipc://{self.tmpdir}/replies"
        self.ctx = zmq.Context()
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.bind(output_addr)
        self.inputs: list[Any] = []
        self.encoder = m.encoder()
        self.decoder = m.reply_decoder()
        self.procs: list[Any] = []
        self.failed: Optional[str] = None
        self.closed = False
        mp = multiprocessing.get_context("spawn")
        threads = worker_threads(self.world_size)
        for rank in range(self.world_size):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            input_addr = f"ipc://{self.tmpdir}/steps-{rank}"
            sock.bind(input_addr)
            self.inputs.append(sock)
            proc = mp.Process(target=worker_main, name=f"pagellm-worker-{rank}", daemon=True,
                              args=(config, rank, init_method, input_addr, output_addr, threads,
                                    logging.getLogger().level))
            proc.start()
            self.procs.append(proc)
        self.poller = zmq.Poller()
        self.poller.register(self.replies, zmq.POLLIN)
        for proc in self.procs:
            self.poller.register(proc.sentinel, zmq.POLLIN)
        try:
            self.pids = self._gather_calls()  # each worker reports once it has joined the group
            self.collective_rpc("load_model")
        except BaseException:
            self.shutdown()
            raise

    # ---- replies ----

    def _next_reply(self, deadline: Optional[float], waiting_for: str) -> Any:
        """The next reply from any worker; WorkerDiedError when a worker failed or died, or at the deadline."""
        while True:
            if self.replies.poll(0):
                reply = self.decoder.decode(self.replies.recv(copy=False).buffer)
                if isinstance(reply, m.WorkerFailed):
                    self._die(reply.message)
                return reply
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = dict(self.poller.poll(None if left is None else int(left * 1000) + 1))
            if self.replies in ready:
                continue
            for rank, proc in enumerate(self.procs):
                if proc.sentinel in ready and not self.replies.poll(0):
                    proc.join(0.1)
                    self._die(f"worker {rank} (pid {proc.pid}) exited unexpectedly (exit code {proc.exitcode})")
            if deadline is not None and time.monotonic() >= deadline and not self.replies.poll(0):
                self._die(f"{waiting_for} gave no answer to a step within "
                          f"{self.config.parallel_config.step_timeout_s:g} s (distributed_step_timeout): hung")

    def _gather_calls(self) -> list[Any]:
        """One CallResult from every worker, in rank order."""
        results: dict[int, Any] = {}
        while len(results) < self.world_size:
            reply = self._next_reply(None, "workers")
            if not isinstance(reply, m.CallResult):
                self._die(f"unexpected reply while waiting for a call: {type(reply).__name__}")
            results[reply.rank] = reply.value
        return [results[r] for r in range(self.world_size)]

    def _die(self, message: str) -> None:
        self.failed = message
        raise WorkerDiedError(message)

    def _send_all(self, msg: Any) -> None:
        if self.failed is not None:
            raise WorkerDiedError(self.failed)
        frame = self.encoder.encode(msg)  # once, for every worker
        for sock in self.inputs:
            sock.send(frame, copy=False)

    # ---- calls ----

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every worker; their answers in rank order."""
        self._send_all(m.Call(method, list(args)))
        return self._gather_calls()

    def submit_model(self, scheduler_output: SchedulerOutput) -> object:
        """Send a step to every worker without waiting: each launches it as it arrives, so the first stage
        starts the next batch while later stages still work on this one, and the next step is on its way
        while this one runs (async scheduling)."""
        self._send_all(m.ExecuteStep(scheduler_output))
        return None

    def collect_model(self, handle: object) -> ModelRunnerOutput:
        """The driver's answer to the oldest step not yet collected (its answers come in order)."""
        deadline = time.monotonic() + self.config.parallel_config.step_timeout_s
        pending = [r for r in range(self.world_size)]
        reply = self._next_reply(deadline, f"worker(s) {pending}")
        if not isinstance(reply, m.StepResult):
            self._die(f"unexpected reply while waiting for a step: {type(reply).__name__}")
        return reply.output

    def determine_num_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_blocks"))  # every rank must hold the blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect_model(self.submit_model(scheduler_output))

    def check_health(self) -> None:
        if self.failed is not None:
            raise WorkerDiedError(self.failed)
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._die(f"worker {rank} (pid {proc.pid}) exited (exit code {proc.exitcode})")
        if self.replies.poll(0):  # a worker that failed between steps
            reply = self.decoder.decode(self.replies.recv(copy=False).buffer)
            if isinstance(reply, m.WorkerFailed):
                self._die(reply.message)

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.closed:
            return
        self.closed = True
        stop = self.encoder.encode(m.StopWorker())
        for sock, proc in zip(self.inputs, self.procs):
            if proc.is_alive():
                try:
                    sock.send(stop, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        if self.failed is not None:
            timeout = 0.5  # the survivors may be waiting on the dead rank in a collective
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():  # stuck in a collective with a dead peer
                proc.kill()
                proc.join(5)
        for sock in self.inputs:
            sock.close(linger=0)
        self.replies.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
