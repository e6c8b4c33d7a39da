"""What the engine and its worker processes (or Ray actors) say to each other: msgpack (msgspec) structs.

A step is encoded once and the same bytes go to every worker; only the driver (TP rank 0 of the last pipeline
stage) answers a step. Method calls (load the model, size the KV cache, ...) are answered by every worker.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput


class ExecuteStep(msgspec.Struct, tag="step", array_like=True):
    step: SchedulerOutput


class Call(msgspec.Struct, tag="call", array_like=True):
    method: str
    args: list[Any] = []


class StopWorker(msgspec.Struct, tag="stop", array_like=True):
    pass


WorkerInput = Union[ExecuteStep, Call, StopWorker]


class StepResult(msgspec.Struct, tag="result", array_like=True):
    output: ModelRunnerOutput


class CallResult(msgspec.Struct, tag="call_result", array_like=True):
    rank: int
    value: Any = None


class WorkerFailed(msgspec.Struct, tag="failed", array_like=True):
    rank: int
    message: str


WorkerReply = Union[StepResult, CallResult, WorkerFailed]

# Callable on a worker by name (Call.method): nothing else is reachable from a message.
WORKER_METHODS = frozenset({"load_model", "determine_num_blocks", "initialize_kv_cache", "shutdown"})


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(WorkerInput)


def reply_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(WorkerReply)
