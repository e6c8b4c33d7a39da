"""Executors run the workers: in this process (uniproc) now; multiprocess and Ray for parallelism later."""

from pagellm.executor.uniproc import UniprocExecutor

__all__ = ["UniprocExecutor"]
