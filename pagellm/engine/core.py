"""EngineCore: the busy loop's body. schedule -> execute -> update, on token ids only (no text)."""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Union

from pagellm.config import EngineConfig
from pagellm.core.request import Request, RequestStatus
from pagellm.core.scheduler import Scheduler
from pagellm.core.sched_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from pagellm.executor import make_executor

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = make_executor(config)  # uni, or mp/ray for tensor/pipeline parallelism
        try:
            num_blocks = self.executor.determine_num_blocks()
            config.cache_config.num_blocks = num_blocks
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()  # no worker processes left behind
            raise
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config)
        # Pipeline parallelism: up to one batch per stage in flight, so that no stage idles (micro-batches).
        pp = config.parallel_config.pipeline_parallel_size
        self.max_batches_in_flight = pp
        self.batch_queue: "collections.deque[tuple[Any, Any]] | None" = collections.deque() if pp > 1 else None
        self.peak_batches_in_flight = 0

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Union[str, Iterable[str]]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Finish requests that met a stop string (found by the detokenizer, outside the core)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        if self.batch_queue is not None:
            return self._step_pipelined()
        if not self.scheduler.has_unfinished_requests():
            return []
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Pipeline parallelism: schedule and submit a new batch while fewer than pp are in flight and there is
        something to schedule (requests whose tokens are in flight are not schedulable); otherwise wait for the
        oldest batch and update from it. Every stage runs batches in submission order, so a batch always sees
        the KV written by the batches before it."""
        queue = self.batch_queue
        sched = self.scheduler
        if len(queue) < self.max_batches_in_flight and sched.has_unfinished_requests():
            scheduler_output = sched.schedule()
            if scheduler_output.scheduled:
                queue.append((scheduler_output, self.executor.submit_model(scheduler_output)))
                self.peak_batches_in_flight = max(self.peak_batches_in_flight, len(queue))
                if len(queue) < self.max_batches_in_flight:
                    return []  # try to fill the pipeline further first
            else:  # nothing schedulable now: keep the ids for the next batch that goes out
                sched.finished_req_ids |= scheduler_output.finished_req_ids
        if not queue:
            return sched.update_from_output(SchedulerOutput(), ModelRunnerOutput())
        scheduler_output, handle = queue.popleft()
        return sched.update_from_output(scheduler_output, self.executor.collect_model(handle))

    def check_health(self) -> None:
        """Raise (WorkerDiedError) if a worker of the executor is gone, even while no step runs."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()
