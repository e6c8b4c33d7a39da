"""What every executor offers the engine core, and the errors it raises when a worker is lost."""

from __future__ import annotations

from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput


class WorkerDiedError(RuntimeError):
    """A worker process or actor exited or failed: the engine cannot step any more."""


class Executor:
    """determine_num_blocks -> initialize_kv_cache -> execute_model per step -> shutdown.

    Multi-worker executors encode each step's SchedulerOutput once, send the same bytes to every worker and
    return only the driver's (TP rank 0 of the last pipeline stage) ModelRunnerOutput; the others answer nothing.
    """

    def determine_num_blocks(self) -> int:
        raise NotImplementedError

    def initialize_kv_cache(self, num_blocks: int) -> None:
        raise NotImplementedError

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    # Async scheduling and pipeline parallelism keep steps in flight: submit launches a step and returns at
    # once, collect waits for its answer (handles are collected in submission order). By default: run at submit.
    def submit_model(self, scheduler_output: SchedulerOutput) -> object:
        return self.execute_model(scheduler_output)

    def collect_model(self, handle: object) -> ModelRunnerOutput:
        return handle  # type: ignore[return-value]

    def check_health(self) -> None:
        """Raise WorkerDiedError if a worker is gone."""

    def shutdown(self) -> None:
        pass


def worker_threads(world_size: int) -> int:
    """CPU threads per worker process: the machine's cores shared out between the ranks."""
    import os

    return max(1, (os.cpu_count() or 1) // world_size)
