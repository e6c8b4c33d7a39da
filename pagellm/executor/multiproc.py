"""MultiprocExecutor: one worker process per rank on this machine (spawned), for tensor/pipeline parallelism.

The workers form one torch.distributed group (NCCL on GPUs, gloo on CPUs) that carries the activations
(all-reduce, all-gather, pipeline send/recv). The engine talks to each worker over its own private
multiprocessing pipe (pickle over a local socketpair that only these two processes hold): each step's
SchedulerOutput goes to every worker once, and only the driver (TP rank 0 of the last stage) answers with the
sampled tokens; the others answer None. The rendezvous is a FileStore in a private (0700) temporary folder.

A worker that dies, or raises, makes every later call raise WorkerDiedError at once (its process sentinel
is watched beside the pipes), so the engine fails cleanly instead of waiting on a collective forever.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.executor.base import Executor, WorkerDiedError, worker_threads

logger = logging.getLogger(__name__)


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


def worker_main(config: EngineConfig, rank: int, init_method: str, conn: Any, num_threads: int,
                log_level: int) -> None:
    """Body of a worker process: build the Worker, then answer (method, args) calls until told to stop."""
    _set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine owns shutdown
    logging.basicConfig(level=log_level, format=f"%(levelname)s [worker {rank}] %(name)s: %(message)s")
    import torch

    torch.set_num_threads(num_threads)
    from pagellm.distributed.parallel_state import destroy_distributed_environment
    from pagellm.worker.worker import Worker

    try:
        worker = Worker(config, rank=rank, distributed_init_method=init_method)
    except BaseException as e:
        conn.send(("error", f"worker {rank} failed to start: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        os._exit(1)
    conn.send(("ok", os.getpid()))
    code = 0
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break  # the engine is gone
        if method == "shutdown":
            break
        try:
            result = getattr(worker, method)(*args)
            if method == "execute_model" and not worker.is_driver:
                result = None
            conn.send(("ok", result))
        except BaseException as e:
            conn.send(("error", f"worker {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
            code = 1
            break
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
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.failed: str | None = None
        self.closed = False
        threads = worker_threads(self.world_size)
        for rank in range(self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, name=f"pagellm-worker-{rank}", daemon=True,
                               args=(config, rank, init_method, child, threads, logging.getLogger().level))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            self.pids = self._gather()  # each worker reports once it has joined the group
            self.collective_rpc("load_model")
        except BaseException:
            self.shutdown()
            raise

    # ---- calls ----

    def _gather(self, timeout: Optional[float] = None) -> list[Any]:
        """Wait for one answer from every worker; raise WorkerDiedError at the first death or error, or when
        `timeout` seconds pass without all answers (a hung worker)."""
        results: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            waitables = {self.conns[i]: i for i in pending}
            waitables.update({self.procs[i].sentinel: i for i in pending})
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready_list = multiprocessing.connection.wait(list(waitables), timeout=left)
            if not ready_list and deadline is not None and time.monotonic() >= deadline:
                self._die(f"worker(s) {sorted(pending)} gave no answer to a step within {timeout:g} s "
                          "(distributed_step_timeout): hung")
            for ready in ready_list:
                rank = waitables[ready]
                if rank not in pending:
                    continue
                if ready is self.procs[rank].sentinel and not self.conns[rank].poll():
                    self.procs[rank].join(0.1)
                    self._die(f"worker {rank} (pid {self.procs[rank].pid}) exited unexpectedly "
                              f"(exit code {self.procs[rank].exitcode})")
                try:
                    status, value = self.conns[rank].recv()
                except (EOFError, OSError):
                    self._die(f"worker {rank} (pid {self.procs[rank].pid}) closed its pipe")
                if status != "ok":
                    self._die(value)
                results[rank] = value
                pending.discard(rank)
        return results

    def _die(self, message: str) -> None:
        self.failed = message
        raise WorkerDiedError(message)

    def _send_all(self, method: str, args: tuple) -> None:
        if self.failed is not None:
            raise WorkerDiedError(self.failed)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((method, args))
            except (BrokenPipeError, OSError):
                self._die(f"worker {rank} (pid {self.procs[rank].pid}) is gone")

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every worker; their answers in rank order."""
        self._send_all(method, args)
        return self._gather()

    def submit_model(self, scheduler_output: SchedulerOutput) -> object:
        """Send a batch to every worker without waiting: each worker answers its calls in order, so the first
        stage starts the next batch while later stages still work on this one."""
        self._send_all("execute_model", (scheduler_output,))
        return None

    def collect_model(self, handle: object) -> ModelRunnerOutput:
        # the oldest batch's answers are first in every pipe
        return self._gather(self.config.parallel_config.step_timeout_s)[self.driver_rank]

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

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.closed:
            return
        self.closed = True
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(("shutdown", ()))
                except (BrokenPipeError, OSError):
                    pass
        if self.failed is not None:
            timeout = 0.5  # the survivors may be waiting on the dead rank in a collective
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():  # stuck in a collective with a dead peer
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
