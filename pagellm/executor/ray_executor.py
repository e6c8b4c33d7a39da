"""RayExecutor: one Ray actor per rank, placed by a placement group (one bundle per device), so an engine can
span the GPUs of several machines of a Ray cluster.

The actors form one torch.distributed group, as with the multiproc executor (NCCL on GPUs, gloo on CPUs);
rank 0's actor picks the rendezvous address (its node's IP and a free port) so it works across nodes. Each
step is encoded once (msgpack, executor/messages.py), put in Ray's object store once (`ray.put` of the bytes)
and every actor gets the reference: `submit` launches the step and returns at once; the driver rank's
`collect` then answers with the oldest launched step's tokens (as msgpack bytes). An actor runs its calls in
order, so the engine's submit(N+1), collect(N) overlaps step N+1's launch with step N's work (async
scheduling), and the first stage of a pipeline starts the next batch while later stages work on this one.

Uses the Ray cluster this process is connected to, or starts a local one (no dashboard, no usage stats).
A dead actor makes the step raise WorkerDiedError (ray.wait notices it even while the other ranks are blocked
in a collective with it).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from typing import Any, Optional

import msgspec

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.executor import messages as m
from pagellm.executor.base import Executor, WorkerDiedError, worker_threads

logger = logging.getLogger(__name__)


class RayWorkerWrapper:
    """The actor: holds a Worker once `init_worker` has run (all ranks at once, since they rendezvous)."""

    def __init__(self, config: EngineConfig, rank: int, num_threads: int) -> None:
        import torch

        torch.set_num_threads(num_threads)
        self.config = config
        self.rank = rank
        self.worker: Any = None
        self._pending: "collections.deque[Any]" = collections.deque()
        self._decoder = m.input_decoder()
        self._encoder = m.encoder()

    def rendezvous_address(self) -> str:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def init_worker(self, init_method: str, local_rank: Optional[int]) -> int:
        from pagellm.worker.worker import Worker

        self.worker = Worker(self.config, rank=self.rank, local_rank=local_rank, distributed_init_method=init_method)
        return os.getpid()

    def call(self, method: str, *args: Any) -> Any:
        if method not in m.WORKER_METHODS:
            raise ValueError(f"unknown worker method {method!r}")
        return getattr(self.worker, method)(*args)

    def submit(self, step: bytes) -> None:
        """Launch a step (every rank); the driver keeps it for `collect`."""
        msg = self._decoder.decode(step)
        pending = self.worker.execute_model_async(msg.step)
        if self.worker.is_driver:
            self._pending.append(pending)

    def collect(self) -> bytes:
        """The driver's answer to the oldest launched step, as msgpack bytes."""
        return self._encoder.encode(self._pending.popleft().result())


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._remove_pg = remove_placement_group
        self.config = config
        pc = config.parallel_config
        self.world_size = pc.world_size
        self.driver_rank = (pc.pipeline_parallel_size - 1) * pc.tensor_parallel_size
        self.failed: Optional[str] = None
        self.closed = False
        self._encoder = m.encoder()
        self._decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(include_dashboard=False, log_to_driver=False)
        on_cuda = config.device_config.device.startswith("cuda")
        bundle = {"GPU": 1, "CPU": 1} if on_cuda else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception as e:
            self._remove_pg(self.pg)
            raise RuntimeError(f"Ray could not place {self.world_size} workers ({bundle} each): {e}") from e
        actor_cls = ray.remote(RayWorkerWrapper)
        threads = worker_threads(self.world_size)
        self.actors = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if on_cuda else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(config, rank, threads)
            for rank in range(self.world_size)
        ]
        try:
            init_method = ray.get(self.actors[0].rendezvous_address.remote(), timeout=300)
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES: its device is cuda:0 there.
            local_rank = 0 if on_cuda else None
            self.pids = self._wait([a.init_worker.remote(init_method, local_rank) for a in self.actors])
            self.collective_rpc("load_model")
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, refs: list[Any], timeout: Optional[float] = None, ranks: Optional[list[int]] = None) -> list[Any]:
        """Results in order; the first failure (a dead actor, an exception) raises at once, and so does
        `timeout` seconds without all results (a hung actor). `ranks`: the worker of each ref (default: ref i is
        worker i's)."""
        ray = self._ray
        ranks = ranks or list(range(len(refs)))
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                hung = sorted({ranks[index[r]] for r in pending})
                self.failed = (f"worker(s) {hung} gave no answer to a step within {timeout:g} s "
                               "(distributed_step_timeout): hung")
                raise WorkerDiedError(self.failed)
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except Exception as e:
                    self.failed = f"worker {ranks[index[ref]]} failed: {type(e).__name__}: {e}"
                    raise WorkerDiedError(self.failed) from None
        return results

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        if self.failed is not None:
            raise WorkerDiedError(self.failed)
        return self._wait([a.call.remote(method, *args) for a in self.actors])

    def determine_num_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect_model(self.submit_model(scheduler_output))

    def submit_model(self, scheduler_output: SchedulerOutput) -> object:
        """One encoding and one ray.put of the step for every actor; returns the launches' refs."""
        if self.failed is not None:
            raise WorkerDiedError(self.failed)
        ref = self._ray.put(self._encoder.encode(m.ExecuteStep(scheduler_output)))
        return [a.submit.remote(ref) for a in self.actors]

    def collect_model(self, handle: object) -> ModelRunnerOutput:
        launches: list[Any] = handle  # type: ignore[assignment]
        answer = self.actors[self.driver_rank].collect.remote()
        results = self._wait(launches + [answer], self.config.parallel_config.step_timeout_s,
                             ranks=list(range(len(launches))) + [self.driver_rank])
        return self._decoder.decode(results[-1])

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for actor in getattr(self, "actors", []):
            try:
                self._ray.kill(actor)
            except Exception:
                pass
        try:
            self._remove_pg(self.pg)
        except Exception:
            pass
