"""Executors run the workers: uniproc (one worker in the engine's process), multiproc (one process per rank on
this machine) and ray (one Ray actor per rank, placed with a placement group)."""

from pagellm.executor.base import Executor, WorkerDiedError
from pagellm.executor.uniproc import UniprocExecutor


def make_executor(config) -> Executor:
    """The executor ParallelConfig asks for (uni at world size 1 unless another is named)."""
    backend = config.parallel_config.executor_backend
    if backend == "uni":
        return UniprocExecutor(config)
    if backend == "mp":
        from pagellm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    if backend == "ray":
        from pagellm.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"distributed_executor_backend must be uni, mp or ray, got {backend!r}")


__all__ = ["Executor", "UniprocExecutor", "WorkerDiedError", "make_executor"]
