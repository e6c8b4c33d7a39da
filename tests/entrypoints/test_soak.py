"""A bounded soak of the server on a tiny random model: 300 requests from 8 concurrent clients, streamed and not,
n up to 3, some abandoned mid-stream and some aborted before their answer (the client closes the connection).
The plan is drawn from a seeded RNG. Every request that was not abandoned must get a complete, well-formed
answer, nothing may answer 5xx, and afterwards the engine must hold no request and no KV block."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Optional

import httpx
import pytest
from tests.entrypoints.server_utils import RemoteServer, read_metrics, tiny_args, wait_until

NUM_REQUESTS = 300
NUM_CLIENTS = 8
SEED = 0


@dataclass
class Plan:
    index: int
    kind: str  # "plain" | "stream" | "disconnect" (after `chunks` chunks) | "abort" (before the answer)
    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float
    chunks: int = 0  # disconnect: chunks read first
    abort_after: float = 0.0  # abort: seconds before the client gives up


@dataclass
class Outcome:
    plan: Plan
    completed: bool = False  # a whole answer came (checked below)
    status: Optional[int] = None
    body: Optional[dict] = None  # plain: the response
    events: list = field(default_factory=list)  # stream: the decoded events, "[DONE]" last


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    for i in range(NUM_REQUESTS):
        kind = rng.choices(["plain", "stream", "disconnect", "abort"], weights=[4, 4, 1, 1])[0]
        prompt = [rng.randrange(3, 4096) for _ in range(rng.randint(1, 48))]
        temperature = rng.choice([0.0, 1.0])
        if kind in ("plain", "stream"):
            plans.append(Plan(i, kind, prompt, n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randint(1, 24),
                              temperature=temperature))
        else:  # long enough that the client leaves first
            plans.append(Plan(i, kind, prompt, n=rng.choice([1, 2]), max_tokens=400, temperature=temperature,
                              chunks=rng.randint(1, 4), abort_after=rng.uniform(0.02, 0.3)))
    return plans


async def run_one(client: httpx.AsyncClient, model: str, plan: Plan) -> Outcome:
    out = Outcome(plan)
    body = {"model": model, "prompt": plan.prompt, "n": plan.n, "max_tokens": plan.max_tokens,
            "temperature": plan.temperature, "seed": plan.index, "ignore_eos": True}
    if plan.kind in ("plain", "abort"):
        request = asyncio.ensure_future(client.post("/v1/completions", json=body))
        if plan.kind == "abort":
            await asyncio.wait({request}, timeout=plan.abort_after)
            if not request.done():
                request.cancel()  # httpx closes the connection: the server aborts the request
                try:
                    await request
                except asyncio.CancelledError:
                    pass
                return out
        r = await request
        out.status, out.body, out.completed = r.status_code, r.json(), True
        return out
    body.update(stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/completions", json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.body, out.completed = json.loads(await r.aread()), True  # an answer: checked (and refused) below
            return out
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            out.events.append(data if data == "[DONE]" else json.loads(data))
            if plan.kind == "disconnect" and len(out.events) >= plan.chunks:
                return out  # leaving the block closes the connection mid-stream
    out.completed = True
    return out


def check_complete(out: Outcome) -> None:
    plan = out.plan
    assert out.status == 200, (plan, out.status, out.body)
    if out.body is not None:  # not streamed
        choices = out.body["choices"]
        assert sorted(c["index"] for c in choices) == list(range(plan.n)), (plan, out.body)
        assert all(c["finish_reason"] == "length" for c in choices), (plan, out.body)
        usage = out.body["usage"]
        assert usage["prompt_tokens"] == len(plan.prompt), (plan, usage)
        assert usage["completion_tokens"] == plan.n * plan.max_tokens, (plan, usage)
        return
    assert out.events and out.events[-1] == "[DONE]", (plan, out.events[-3:])
    events = out.events[:-1]
    assert all("error" not in e for e in events), (plan, events)
    finish: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            assert c["index"] not in finish, (plan, "a chunk after the choice's finish_reason", e)
            if c["finish_reason"] is not None:
                finish[c["index"]] = c["finish_reason"]
    assert finish == {i: "length" for i in range(plan.n)}, (plan, finish)
    usage = events[-1]["usage"]
    assert not events[-1]["choices"] and usage is not None, (plan, events[-1])
    assert usage["prompt_tokens"] == len(plan.prompt), (plan, usage)
    assert usage["completion_tokens"] == plan.n * plan.max_tokens, (plan, usage)


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with RemoteServer(tiny_args(tiny_served_model, "--max-num-seqs", "16")) as srv:
        yield srv


def test_soak(server):
    plans = make_plans(random.Random(SEED))

    async def run() -> list[Outcome]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            queue: asyncio.Queue = asyncio.Queue()
            for plan in plans:
                queue.put_nowait(plan)
            outcomes: list[Outcome] = []

            async def client_loop() -> None:
                while not queue.empty():
                    outcomes.append(await run_one(client, model, queue.get_nowait()))

            await asyncio.gather(*(client_loop() for _ in range(NUM_CLIENTS)))
            return outcomes

    outcomes = asyncio.run(run())
    assert len(outcomes) == NUM_REQUESTS
    assert not [o for o in outcomes if o.status is not None and o.status >= 500], "5xx answers"
    complete = [o for o in outcomes if o.completed]
    for out in complete:
        check_complete(out)
    assert all(o.completed for o in outcomes if o.plan.kind in ("plain", "stream"))
    # A disconnect reads at most 4 chunks of a 400-token stream: it always leaves mid-stream. An abort may come
    # after its answer on a fast machine; then it was checked above like any other answer.
    disconnects = [o for o in outcomes if o.plan.kind == "disconnect"]
    assert disconnects and not any(o.completed for o in disconnects)
    for out in disconnects:  # what came before the client left is well-formed too
        assert all(e != "[DONE]" and "error" not in e for e in out.events), (out.plan, out.events)

    def idle() -> bool:
        m = read_metrics(server)
        return (m["pagellm:kv_cache_usage_perc"] == 0 and m["pagellm:num_requests_running"] == 0
                and m["pagellm:num_requests_waiting"] == 0)

    wait_until(idle, 60, "the engine to free every request and KV block")
    assert httpx.get(server.url("/health"), timeout=30).status_code == 200
    assert "Traceback" not in server.log_tail(1 << 20), server.log_tail()
