"""The engine core's busy loop (EngineCoreProc) over its real ZMQ sockets, with a fake core in a thread: input
drained between steps, outputs and stats out, utility calls, and a core that raises."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import types

import msgspec
import pytest
import zmq

from pagellm.core.request import Request
from pagellm.core.sched_output import EngineCoreOutput
from pagellm.engine.core_proc import (
    Abort,
    CoreError,
    EngineCoreProc,
    OutputMessage,
    Outputs,
    Shutdown,
    Utility,
    UtilityResult,
    make_add_request,
)
from pagellm.sampling_params import SamplingParams


class FakeCore:
    """One token per step per request; a request finishes after max_tokens."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.requests: dict[str, Request] = {}
        self.steps = 0
        self.batch_sizes: list[int] = []
        self.fail_at_step = fail_at_step
        kv = types.SimpleNamespace(usage=0.0, num_blocks=10,
                                   prefix_cache_stats=types.SimpleNamespace(queries=0, hits=0))
        self.scheduler = types.SimpleNamespace(kv_cache_manager=kv, requests=self.requests, num_waiting=0, num_running=0,
                                               num_preemptions_total=0, reset_prefix_cache=lambda: True)

    @property
    def _running(self) -> int:
        return len(self.requests)

    def add_request(self, request: Request) -> None:
        request.num_computed_tokens = 0
        self.requests[request.request_id] = request
        self.scheduler.kv_cache_manager.usage = len(self.requests) / 10
        self.scheduler.num_running = len(self.requests)

    def abort_requests(self, ids) -> None:
        for i in ids:
            self.requests.pop(i, None)
        self.scheduler.kv_cache_manager.usage = len(self.requests) / 10
        self.scheduler.num_running = len(self.requests)

    stop_requests = abort_requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[EngineCoreOutput]:
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("boom")
        self.batch_sizes.append(len(self.requests))
        outputs = []
        for req_id, r in list(self.requests.items()):
            r.num_computed_tokens += 1
            r.output_token_ids.append(7)
            done = len(r.output_token_ids) >= r.sampling_params.max_tokens
            outputs.append(EngineCoreOutput(req_id, [7], finish_reason="length" if done else None))
            if done:
                del self.requests[req_id]
        self.scheduler.kv_cache_manager.usage = len(self.requests) / 10
        self.scheduler.num_running = len(self.requests)
        return outputs


class Harness:
    def __init__(self, core: FakeCore) -> None:
        self.dir = tempfile.mkdtemp()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.bind(f"ipc://{self.dir}/in")
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(f"ipc://{self.dir}/out")
        self.proc = EngineCoreProc(core, f"ipc://{self.dir}/in", f"ipc://{self.dir}/out", os.getppid())
        self.code = None
        self.decoder = msgspec.msgpack.Decoder(OutputMessage)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.proc.run_and_report()

    def send(self, msg) -> None:
        self.push.send(msgspec.msgpack.encode(msg))

    def recv(self, timeout_ms: int = 10_000):
        assert self.pull.poll(timeout_ms), "no message from the core loop"
        return self.decoder.decode(self.pull.recv())

    def close(self) -> None:
        self.thread.join(10)
        self.proc.close()
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()


def add(h: Harness, req_id: str, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens)
    h.send(make_add_request(Request(req_id, [1, 2, 3], params, eos_token_id=2)))


def test_loop_drains_inputs_and_reports():
    core = FakeCore()
    h = Harness(core)
    for i in range(3):  # queued before the loop runs: all three join the first step
        add(h, f"r{i}", max_tokens=3)
    deadline = time.monotonic() + 30
    while len(core.requests) < 3:  # handed to the core as ZMQ delivers them (however long a busy machine takes)
        assert time.monotonic() < deadline, "ZMQ did not deliver the three requests"
        h.proc.drain_input(100)
    h.thread.start()
    tokens: dict[str, int] = {}
    finished = set()
    while len(finished) < 3:
        msg = h.recv()
        assert isinstance(msg, Outputs) and msg.stats is not None
        for out in msg.outputs:
            tokens[out.req_id] = tokens.get(out.req_id, 0) + len(out.new_token_ids)
            if out.finished:
                finished.add(out.req_id)
    assert tokens == {"r0": 3, "r1": 3, "r2": 3}
    assert core.batch_sizes == [3, 3, 3]
    assert msg.stats.num_running == 0 and msg.stats.kv_cache_usage == 0.0
    assert len([t for t in msg.stats.queue_times]) <= 3
    # idle now: the loop waits for input instead of stepping
    steps = core.steps
    h.send(Utility(5, "ping"))
    assert h.recv() == UtilityResult(5, result="pong")
    h.send(Utility(6, "get_stats"))
    stats = h.recv()
    assert stats.call_id == 6 and stats.result["num_blocks"] == 10
    h.send(Utility(7, "no_such_method"))
    assert "unknown" in h.recv().error
    assert core.steps == steps
    # an abort empties the engine: a stats message publishes the freed blocks
    add(h, "long", max_tokens=10_000)
    h.recv()
    h.send(Abort(["long"]))
    while True:
        msg = h.recv()
        if isinstance(msg, Outputs) and msg.stats.num_running == 0:
            break
    assert msg.stats.kv_cache_usage == 0.0
    h.send(Shutdown())
    h.close()
    assert h.code == 0


def test_core_error_is_reported():
    h = Harness(FakeCore(fail_at_step=2))
    h.thread.start()
    add(h, "r", max_tokens=5)
    first = h.recv()
    assert isinstance(first, Outputs) and first.outputs[0].new_token_ids == [7]
    err = h.recv()
    assert isinstance(err, CoreError) and "boom" in err.message
    h.close()
    assert h.code == 1


def test_loop_exits_when_parent_is_gone():
    h = Harness(FakeCore())
    h.proc.parent_pid = -1
    h.thread.start()
    h.thread.join(5)
    assert not h.thread.is_alive() and h.code == 0
    h.close()


@pytest.mark.parametrize("garbage", [b"\x00\x01", msgspec.msgpack.encode({"type": "exec", "code": "x"})])
def test_undecodable_input_is_dropped(garbage):
    h = Harness(FakeCore())
    h.thread.start()
    h.push.send(garbage)
    h.send(Utility(1, "ping"))
    assert h.recv().result == "pong"
    h.send(Shutdown())
    h.close()
    assert h.code == 0
