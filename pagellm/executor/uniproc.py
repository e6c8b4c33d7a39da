"""UniprocExecutor: a single worker in the engine's own process."""

from __future__ import annotations

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.executor.base import Executor
from pagellm.worker.model_runner import PendingOutput
from pagellm.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = Worker(config)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    # Async scheduling: the step is launched at submit and read at collect, so the engine core schedules the
    # next step while this one runs on the device.
    def submit_model(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        return self.worker.execute_model_async(scheduler_output)

    def collect_model(self, handle: object) -> ModelRunnerOutput:
        assert isinstance(handle, PendingOutput)
        return self.worker.collect(handle)

    def shutdown(self) -> None:
        self.worker.shutdown()
