"""Several API processes behind one port (`pagellm serve --api-server-count 2`), on the tiny random model.

An engine core with two clients routes each request's outputs to the client that sent it and its stats to
both. Through a live server with two engine cores and two API processes: concurrent requests (streamed and
not) get a single engine's greedy tokens and are answered by both API processes (each names itself in the
`x-pagellm-api-server` header) and both cores, /metrics holds the totals whichever process answers it, and
SIGTERM drains both API processes and leaves no process behind. Two AsyncLLMs sharing one live engine core (as
two API processes do; one more server would double this file's time): killing the core fails the request each
has in flight, and each turns unhealthy and refuses new requests, which the server answers with 503 (as
test_server_lifecycle shows for one API process).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import tempfile
import threading
import time
from typing import Callable, Optional

import httpx
import msgspec
import pytest
import zmq
from tests.entrypoints.server_utils import RemoteServer, parse_metrics, tiny_args, wait_gone
from tests.entrypoints.test_core_proc import FakeCore

from pagellm import LLM, SamplingParams
from pagellm.engine.core_messages import (
    Abort,
    EngineCoreRequest,
    OutputMessage,
    Outputs,
    Ready,
    Shutdown,
    Utility,
    UtilityResult,
)
from pagellm.engine.core_proc import EngineCoreProc

HEADER = "x-pagellm-api-server"
NUM_REQUESTS = 48
MAX_TOKENS = 6


# ---------------------------------------------------------------------------------------------------------------
# One engine core, two clients (a fake core in a thread, real sockets)
# ---------------------------------------------------------------------------------------------------------------


class UniqueIdCore(FakeCore):
    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self.requests:  # as the scheduler does
            raise ValueError(f"request id {req.request_id!r} is already in use")
        super().add_request(req)


def test_core_answers_each_client_and_tells_all_its_stats():
    d = tempfile.mkdtemp()
    ctx = zmq.Context()
    ins, outs = [], []
    for i in range(2):
        push = ctx.socket(zmq.PUSH)
        push.bind(f"ipc://{d}/in{i}")
        pull = ctx.socket(zmq.PULL)
        pull.bind(f"ipc://{d}/out{i}")
        ins.append(push)
        outs.append(pull)
    control = ctx.socket(zmq.PULL)
    control.bind(f"ipc://{d}/control")
    core = UniqueIdCore()
    proc = EngineCoreProc(core, [f"ipc://{d}/in0", f"ipc://{d}/in1"], [f"ipc://{d}/out0", f"ipc://{d}/out1"],
                          os.getppid(), control_addr=f"ipc://{d}/control")
    decoder = msgspec.msgpack.Decoder(OutputMessage)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(proc.run_and_report()), daemon=True)

    def recv(sock):
        assert sock.poll(10_000), "no message from the core"
        return decoder.decode(sock.recv())

    def add(client: int, req_id: str, max_tokens: int) -> None:
        ins[client].send(msgspec.msgpack.encode(EngineCoreRequest(
            req_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens), [2], 2, 0.0, client_index=client)))

    def ping(client: int, call_id: int) -> None:
        """A round trip: everything the client sent before has been handled."""
        ins[client].send(msgspec.msgpack.encode(Utility(call_id, "ping", client_index=client)))
        while not isinstance(msg := recv(outs[client]), UtilityResult):
            pass
        assert msg == UtilityResult(call_id, result="pong")

    proc.broadcast(Ready(num_blocks=10, pid=1))
    assert [recv(s) for s in (*outs, control)] == [Ready(num_blocks=10, pid=1)] * 3
    thread.start()
    try:
        add(0, "a", 10_000)
        add(1, "b", 3)
        got: dict[int, dict[str, int]] = {0: {}, 1: {}}
        while "b" not in got[1] or got[1]["b"] < 3:
            for client in (0, 1):
                msg = recv(outs[client])
                assert isinstance(msg, Outputs) and msg.stats is not None  # stats reach both, every step
                for out in msg.outputs:
                    got[client][out.req_id] = got[client].get(out.req_id, 0) + len(out.new_token_ids)
        assert set(got[0]) <= {"a"} and set(got[1]) == {"b"}, got  # each client gets only its own outputs
        # Client 1 can neither reuse client 0's request id nor abort client 0's request.
        add(1, "a", 3)
        while not (msg := recv(outs[1])).outputs:
            pass
        assert msg.outputs[0].req_id == "a" and "already in use" in msg.outputs[0].error
        ins[1].send(msgspec.msgpack.encode(Abort(["a"], client_index=1)))
        ping(1, 1)
        assert "a" in core.requests
        ins[0].send(msgspec.msgpack.encode(Abort(["a"], client_index=0)))
        ping(0, 2)
        assert "a" not in core.requests
        ins[0].send(msgspec.msgpack.encode(Shutdown()))
        thread.join(10)
        assert codes == [0]
    finally:
        thread.join(10)
        proc.close()
        for sock in (*ins, *outs, control):
            sock.close(0)
        ctx.term()


# ---------------------------------------------------------------------------------------------------------------
# Live servers
# ---------------------------------------------------------------------------------------------------------------


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 4096) for _ in range(rng.randint(4, 40))] for _ in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def expected(tiny_served_model) -> list[list[int]]:
    """One engine's greedy tokens for each prompt (the engine a single-process server runs)."""
    llm = LLM(tiny_served_model, dtype="float32", max_model_len=512, skip_tokenizer_init=True,
              kv_cache_memory=16 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _pids(server: RemoteServer) -> tuple[list[int], list[int]]:
    """The engine core and API server pids the launcher printed."""
    deadline = time.monotonic() + 120  # printed once every API process has reached the cores
    while not (m := re.search(r"engine core pid ([\d, ]+); \d+ API server processes, pid ([\d, ]+);",
                              server.log_tail())):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    return [int(p) for p in m.group(1).split(",")], [int(p) for p in m.group(2).split(",")]


def _fresh() -> httpx.AsyncClient:
    """No kept-alive connections: each request is a new connection, accepted by whichever process takes it."""
    return httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0))


async def _complete(client: httpx.AsyncClient, url: str, prompt: list[int], stream: bool) -> tuple[str, list[int]]:
    """(the answering API process, the generated token ids) of one greedy completion."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1, "ignore_eos": True,
            "stream": stream}
    tokens: list[int] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        if stream:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        tokens += [int(t.split(":", 1)[1]) for t in (choice["logprobs"] or {}).get("tokens", [])]
        else:
            choice = json.loads(await r.aread())["choices"][0]
            tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
    return r.headers[HEADER], tokens


def _run_concurrent(server: RemoteServer, expected: list[list[int]]) -> dict[str, int]:
    """Every prompt once, all at once, half of them streamed; returns how many each API process answered."""

    async def run_all() -> list[tuple[str, list[int]]]:
        async with _fresh() as client:
            return await asyncio.gather(*(_complete(client, server.base_url, p, stream=i % 2 == 0)
                                          for i, p in enumerate(_prompts())))

    results = asyncio.run(run_all())
    assert [tokens for _, tokens in results] == expected
    counts: dict[str, int] = {}
    for index, _ in results:
        counts[index] = counts.get(index, 0) + 1
    return counts


_metrics = parse_metrics


def _from_each(server: RemoteServer, path: str, count: int = 2, method: str = "GET", body: dict | None = None,
               until: Optional[Callable[[httpx.Response], bool]] = None,
               timeout: float = 30) -> dict[str, httpx.Response]:
    """One response from each API process (new connections until each has answered, and, with `until`, answered
    one that satisfies it)."""
    got: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only API processes {sorted(got)} answered {path} as expected"
        try:
            with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                r = client.request(method, server.url(path), json=body)
        except httpx.TransportError:  # a process closing its listening socket resets what it had not accepted
            time.sleep(0.05)
            continue
        if until is None or until(r):
            got.setdefault(r.headers[HEADER], r)
        else:
            time.sleep(0.05)
    return got


@pytest.fixture(scope="module")
def two_api_servers(tiny_served_model):
    """Two engine cores behind two API processes."""
    args = tiny_args(tiny_served_model, "--data-parallel-size", "2", "--api-server-count", "2",
                     "--kv-cache-memory", str(8 * 2**20), "--shutdown-timeout", "120")
    with RemoteServer(args) as s:
        yield s


def test_two_api_processes_answer_concurrent_requests(two_api_servers, expected):
    cores, apis = _pids(two_api_servers)
    assert len(cores) == 2 and len(apis) == 2
    counts = _run_concurrent(two_api_servers, expected)
    assert set(counts) == {"0", "1"}, f"one API process answered every request: {counts}"
    # /metrics holds the whole server's numbers, whichever process answers it.
    for index, r in _from_each(two_api_servers, "/metrics").items():
        m = _metrics(r.text)
        assert m["pagellm:request_success_total{finished_reason=length}"] == NUM_REQUESTS, (index, r.text)
        assert m["pagellm:generation_tokens_total"] == NUM_REQUESTS * MAX_TOKENS
        assert m["pagellm:time_to_first_token_seconds_count"] == NUM_REQUESTS
        routed = [m[f"pagellm:engine_core_requests_total{{engine_core={c}}}"] for c in (0, 1)]
        assert sum(routed) == NUM_REQUESTS and min(routed) > 0, routed
        assert m["pagellm:kv_cache_num_blocks"] > 0 and m["pagellm:num_requests_running"] == 0


def test_responses_are_not_stored_behind_several_api_processes(two_api_servers):
    """Each API process has its own memory: previous_response_id is refused by every one, saying why."""
    body = {"input": "hi", "previous_response_id": "resp_1"}
    for index, r in _from_each(two_api_servers, "/v1/responses", method="POST", body=body).items():
        assert r.status_code == 400, (index, r.text)
        error = r.json()["error"]
        assert error["param"] == "previous_response_id" and "--api-server-count" in error["message"], error
        missing = httpx.get(two_api_servers.url("/v1/responses/resp_1"), timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"


def test_sigterm_drains_every_api_process(two_api_servers):
    """Streams in flight on both API processes finish whole after SIGTERM; meanwhile each process answers new
    requests with 503; then everything exits 0."""
    server = two_api_servers
    cores, apis = _pids(server)
    pids = server.all_pids()
    assert set(cores + apis) <= set(pids)
    num_tokens = 480  # long enough that no API process has drained before both answered the probe
    started: dict[int, str] = {}  # stream -> the API process serving it, once its first chunk came
    results: dict[int, object] = {}
    cond = threading.Condition()

    def stream(i: int) -> None:
        body = {"prompt": [10 + i, 11, 12], "max_tokens": num_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                with client.stream("POST", server.url("/v1/completions"), json=body) as r:
                    chunks = []
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunks.append(json.loads(line[6:]))
                            if len(chunks) == 1:
                                with cond:
                                    started[i] = r.headers[HEADER]
                                    cond.notify_all()
                    results[i] = chunks[-1]["usage"]["completion_tokens"]
        except BaseException as e:  # noqa: BLE001 - checked below
            results[i] = e
        finally:
            with cond:
                started.setdefault(i, "failed")
                cond.notify_all()

    threads: list[threading.Thread] = []
    while not {"0", "1"} <= set(started.values()):  # streams until each API process serves one
        assert len(threads) < 16, f"the streams all went to one API process: {started}"
        for _ in range(2):
            threads.append(threading.Thread(target=stream, args=(len(threads),), daemon=True))
            threads[-1].start()
        with cond:
            assert cond.wait_for(lambda: len(started) == len(threads), timeout=60), started
        assert "failed" not in started.values(), results
    server.proc.send_signal(signal.SIGTERM)
    for index, r in _from_each(server, "/v1/completions", method="POST",
                               body={"prompt": [5, 6], "max_tokens": 2},
                               until=lambda r: r.status_code == 503).items():
        assert r.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(threads))] == [num_tokens] * len(threads), results
    assert server.proc.wait(60) == 0
    assert not wait_gone(pids), "a process outlived the launcher"


def test_a_dead_core_fails_every_client(tiny_served_model):
    from pagellm.engine.async_llm import AsyncLLM, EngineDeadError
    from pagellm.engine.core_client import CoreProcClient, InheritedFd, SharedCores, wait_ready
    from pagellm.engine_args import EngineArgs

    args = EngineArgs(model=tiny_served_model, dtype="float32", max_model_len=512, skip_tokenizer_init=True,
                      kv_cache_memory=8 * 2**20)
    d = tempfile.mkdtemp()
    sockets = [(f"ipc://{d}/in{i}", f"ipc://{d}/out{i}") for i in range(2)]

    async def run() -> None:
        core = CoreProcClient(args, clients=sockets)  # as the launcher starts it
        try:
            pid = core.proc.pid
            pidfd = os.pidfd_open(pid)
            await wait_ready(core, "the engine core", 300)
            engines = [AsyncLLM(args, log_stats=False,
                                shared=SharedCores(i, [sockets[i]], [pid], [InheritedFd(os.dup(pidfd))]))
                       for i in range(2)]
            os.close(pidfd)
            for engine in engines:
                await engine.start(timeout=60)
            params = SamplingParams(max_tokens=400, ignore_eos=True)
            running = []
            for engine in engines:
                it = (await engine.add_request({"prompt_token_ids": [10, 11, 12]}, params)).__aiter__()
                await it.__anext__()  # a first token: it runs
                running.append(it)
            os.kill(pid, signal.SIGKILL)
            for engine, it in zip(engines, running):
                with pytest.raises(EngineDeadError, match="engine core process exited"):
                    async for _ in it:
                        pass
                assert not engine.is_healthy
                with pytest.raises(EngineDeadError):
                    engine.check_admission()
                await engine.shutdown()
        finally:
            core.close(5)

    asyncio.run(run())
