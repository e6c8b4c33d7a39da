"""EngineCore: the busy loop's body. schedule -> execute -> update, on token ids only (no text)."""

from __future__ import annotations

import logging
from typing import Iterable, Union

from pagellm.config import EngineConfig
from pagellm.core.request import Request, RequestStatus
from pagellm.core.scheduler import Scheduler
from pagellm.core.sched_output import EngineCoreOutput
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
        if not self.scheduler.has_unfinished_requests():
            return []
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def check_health(self) -> None:
        """Raise (WorkerDiedError) if a worker of the executor is gone, even while no step runs."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()
