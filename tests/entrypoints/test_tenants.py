"""Several API keys kept apart (entrypoints/openai/tenants.py).

Units: the key file, $PAGELLM_API_KEY, authentication against every key, the token bucket on an injected
clock, refunds, the guard middleware's max_in_flight (a fake app that holds a request until told), cache salts,
and the data-parallel router keeping salts apart. Two live servers on the tiny random model: one process (the
prefix cache kept apart per key, tokens_per_minute: 429 with Retry-After before the engine, other keys
unaffected, per-key metrics), and two API processes with --shared-prefix-cache (keys share the cache, per-key
counters add up over the processes, and both processes draw on the one token budget).
"""

from __future__ import annotations

import asyncio
import hmac
import random
import time
from types import SimpleNamespace
from typing import Optional

import httpx
import pytest
from tests.entrypoints.server_utils import RemoteServer, read_metrics, tiny_args, wait_until

from pagellm.engine.dp_router import DPRouter
from pagellm.entrypoints.openai import tenants
from pagellm.entrypoints.openai.api_server import TICKET, GuardMiddleware, ServerState
from pagellm.entrypoints.openai.tenants import (
    KeyRing,
    RateLimited,
    load_keys,
    parse_key_file,
    reserved_tokens,
)

KEY_FILE = """\
# name key [limits]
alice sk-alice-0123
bob   sk-bob-4567
carol sk-carol-89ab tokens_per_minute=100

dave  sk-dave-cdef  max_in_flight=1 tokens_per_minute=5000
"""
KEYS = {"alice": "sk-alice-0123", "bob": "sk-bob-4567", "carol": "sk-carol-89ab", "dave": "sk-dave-cdef"}


def bearer(key: str) -> bytes:
    return f"Bearer {key}".encode()


# ---------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------


def test_key_file_names_and_limits():
    keys = parse_key_file(KEY_FILE)
    assert [(k.name, k.max_in_flight, k.tokens_per_minute) for k in keys] == [
        ("alice", None, None), ("bob", None, None), ("carol", None, 100), ("dave", 1, 5000)]
    assert "sk-" not in repr(keys)  # only digests are kept, and they are not shown


@pytest.mark.parametrize("line, error", [
    ("alice", "expected `name key"),
    ("al/ice sk-secret-1", "a key name is"),
    ("alice sk-secret-1 max_in_flight=0", "max_in_flight must be a positive integer"),
    ("alice sk-secret-1 tokens_per_minute=ten", "tokens_per_minute must be a positive integer"),
    ("alice sk-secret-1 burst=3", "unknown option 'burst'"),
    ("alice sk-secret-1 max_in_flight=1 max_in_flight=2", "max_in_flight given twice"),
    ("alice sk-sécret-1", "must be ASCII"),
])
def test_key_file_errors_name_the_line_never_the_key(line, error):
    with pytest.raises(ValueError) as info:
        parse_key_file(f"# keys\n{line}\n", "keys.txt")
    assert str(info.value).startswith("keys.txt: line 2: ") and error in str(info.value)
    assert "secret" not in str(info.value) and "sécret" not in str(info.value)


def test_plain_keys_file_keys_and_the_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text("alice sk-secret-a\n")
    assert [k.name for k in load_keys(["sk-one", "sk-two"], str(path), env={})] == ["key-0", "key-1", "alice"]
    env = {"PAGELLM_API_KEY": "sk-env"}
    (key,) = load_keys(None, None, env)
    assert key.name == "key-0" and KeyRing([key]).authenticate(bearer("sk-env")) == 0
    assert [k.name for k in load_keys(["sk-flag"], None, env)] == ["key-0"]  # a flag overrides the variable
    assert [k.name for k in load_keys(None, str(path), env)] == ["alice"]
    assert load_keys(None, None, {}) == []  # an open server
    with pytest.raises(ValueError, match="the key named 'alice' is also another key's") as info:
        load_keys(["sk-secret-a"], str(path), env={})
    assert "sk-secret" not in str(info.value)
    path.write_text("key-0 sk-secret-b\n")
    with pytest.raises(ValueError, match="the key name 'key-0' is used twice"):
        load_keys(["sk-one"], str(path), env={})
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_keys(None, str(path), env={})


def test_authentication_compares_every_key(monkeypatch):
    ring = KeyRing(parse_key_file(KEY_FILE))
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", counting)
    for header, expected in [*((bearer(k), i) for i, k in enumerate(KEYS.values())),
                             (bearer("sk-nobody"), None), (b"", None), (b"sk-alice-0123", None),
                             (bearer("sk-alice-0123") + b" ", None), ("Bearer ключ".encode(), None)]:
        calls.clear()
        assert ring.authenticate(header) == expected
        # Every key, whichever matched, on digests of one length: no early exit, no length to time.
        assert calls == [(32, 32)] * len(KEYS)


def test_cache_salts_per_key_name_under_a_secret():
    keys = parse_key_file(KEY_FILE)
    ring = KeyRing(keys, secret=b"s" * 32)
    assert len(set(ring.salts)) == len(keys)
    assert all(s and k.name not in s and "sk-" not in s for s, k in zip(ring.salts, keys))
    assert KeyRing(keys, secret=b"s" * 32).salts == ring.salts  # the same secret: the same salts
    assert KeyRing(keys, secret=b"t" * 32).salts != ring.salts
    assert KeyRing(keys).salts != ring.salts  # a fresh secret per server
    assert KeyRing(keys, shared_prefix_cache=True).salts == [None] * len(keys)


def test_dp_router_keeps_salts_apart():
    router = DPRouter(2, SimpleNamespace(enable_prefix_caching=True, block_size=16), max_num_seqs=8)
    prompt = list(range(100, 164))  # 4 full blocks
    assert router.route(prompt, "salt-a") == 0
    router.add(0, 1)
    assert router.route(prompt, "salt-a") == 0  # affinity: core 0 holds this prompt's blocks
    assert router.route(prompt, "salt-b") == 1  # another tenant's same prompt: least loaded, no affinity
    router.add(1, 3)
    assert router.route(prompt, "salt-b") == 1
    assert router.route(prompt, None) == 0  # the least loaded again: no salt is a tenant of its own


# ---------------------------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStream:
    def __init__(self, prompt_len: int, generated: int) -> None:
        self.prompt = SimpleNamespace(prompt_token_ids=[7] * prompt_len)
        self.num_generation_tokens = generated


def test_reserved_tokens():
    assert reserved_tokens([10], 1, 20, 512) == 30
    assert reserved_tokens([10, 30], 2, 20, 512) == 10 + 40 + 30 + 40
    assert reserved_tokens([500], 1, None, 512) == 512  # no max_tokens: the room left to max_model_len
    assert reserved_tokens([500], 3, 100, 512) == 500 + 3 * 12


def test_token_bucket_refills_over_a_minute_and_says_when():
    clock = Clock()
    ring = KeyRing(parse_key_file(KEY_FILE), clock=clock)
    carol = 2
    ticket = ring.admit(carol)
    ticket.reserve(100)  # the whole bucket
    with pytest.raises(RateLimited) as info:
        ring.admit(carol).reserve(10)
    e = info.value
    assert (e.status, e.type, e.code, e.retry_after) == (429, "rate_limit_error", "tokens_per_minute", 6)
    assert e.headers() == [(b"retry-after", b"6")]
    assert e.response().headers["retry-after"] == "6" and e.response().status_code == 429
    clock.now += 5.9
    with pytest.raises(RateLimited) as info:
        ring.admit(carol).reserve(10)
    assert info.value.retry_after == 1  # never 0: rounded up
    clock.now += 0.1
    ring.admit(carol).reserve(10)  # 100 tokens a minute: 10 in 6 s
    clock.now += 600
    assert ring.ledger.level(carol) == 100  # never more than the bucket holds
    with pytest.raises(RateLimited) as info:
        ring.admit(carol).reserve(101)
    assert info.value.retry_after is None and info.value.headers() == []  # it would never pass
    assert "more than this API key's 100 tokens per minute" in info.value.message
    ring.admit(0).reserve(10**9)  # alice has no budget
    assert ring.ledger.level(carol) == 100  # others' requests take nothing from carol's bucket


def test_a_request_is_charged_what_it_used():
    clock = Clock()
    ring = KeyRing(parse_key_file(KEY_FILE), clock=clock)
    carol = 2
    ticket = ring.admit(carol)
    ticket.reserve(90)
    ticket.track([FakeStream(10, 15)])  # stopped early: 25 of 90 used
    ticket.close()
    assert ring.ledger.level(carol) == 75
    ticket.close()  # once
    assert ring.ledger.level(carol) == 75
    failed = ring.admit(carol)
    failed.reserve(70)
    failed.close()  # never reached the engine (e.g. a 400 from the engine's checks): all back
    assert ring.ledger.level(carol) == 75


def test_in_flight_counts_per_key():
    ring = KeyRing(parse_key_file(KEY_FILE))
    dave = 3
    first = ring.admit(dave)
    with pytest.raises(RateLimited) as info:
        ring.admit(dave)
    assert (info.value.code, info.value.retry_after) == ("max_in_flight", 1)
    others = [ring.admit(0) for _ in range(5)]  # alice: no limit
    first.close()
    ring.admit(dave).close()
    for t in others:
        t.close()
    assert [ring.ledger.in_flight(i) for i in range(4)] == [0, 0, 0, 0]


class HoldingApp:
    """An ASGI app that answers 200 once `release` is set, noting each request's key name."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[Optional[str]] = []

    async def __call__(self, scope, receive, send) -> None:
        ticket = scope.get(TICKET)
        self.seen.append(ticket.name if ticket is not None else None)
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(app, key: Optional[str], path: str = "/v1/completions") -> tuple[int, dict, bytes]:
    headers = [(b"authorization", bearer(key))] if key is not None else []
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_guard_answers_429_over_max_in_flight_before_the_app():
    async def run() -> None:
        ring = KeyRing(parse_key_file(KEY_FILE))
        app = HoldingApp()
        guard = GuardMiddleware(app, ServerState(ring, 10_000))
        held = asyncio.ensure_future(_call(guard, KEYS["dave"]))
        deadline = time.monotonic() + 30
        while app.seen != ["dave"]:
            assert time.monotonic() < deadline, "the first request never reached the app"
            await asyncio.sleep(0.01)
        status, headers, body = await _call(guard, KEYS["dave"])
        assert status == 429 and headers[b"retry-after"] == b"1"
        assert b'"type": "rate_limit_error"' in body and b'"code": "max_in_flight"' in body
        assert app.seen == ["dave"]  # the refused request never reached the app
        assert (await _call(guard, "sk-wrong"))[0] == 401
        assert (await _call(guard, None))[0] == 401
        app.release.set()  # alice is not held back by dave's limit
        assert (await _call(guard, KEYS["alice"]))[0] == 200
        assert (await held)[0] == 200
        assert (await _call(guard, KEYS["dave"]))[0] == 200  # out of flight again
        assert (await _call(guard, None, "/health"))[0] == 200  # open paths: no key, no ticket
        assert app.seen == ["dave", "alice", "dave", None]
        assert ring.ledger.in_flight(3) == 0

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------------
# Live servers
# ---------------------------------------------------------------------------------------------------------------

PLAIN_KEY = "sk-plain-key-0"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(KEY_FILE)
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_served_model, key_file):
    with RemoteServer(tiny_args(tiny_served_model, "--api-key-file", key_file, "--api-key", PLAIN_KEY)) as srv:
        yield srv


def _prompt(n: int) -> list[int]:
    """Token ids no other test sends (so no earlier request cached them)."""
    return [random.randrange(3, 4096) for _ in range(n)]


def _complete(server: RemoteServer, key: str, prompt: list[int], max_tokens: int = 4,
              client: Optional[httpx.Client] = None) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    post = (client or httpx).post
    return post(server.url("/v1/completions"), json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _hits(server: RemoteServer) -> float:
    return read_metrics(server).get("pagellm:prefix_cache_hits_total", 0.0)


def _key_metric(metrics: dict[str, float], name: str, key: str, limit: Optional[str] = None) -> float:
    labels = f"key_name={key}" + (f",limit={limit}" if limit else "")
    return metrics[f"pagellm:api_key_{name}_total{{{labels}}}"]


def test_every_key_is_served_and_only_keys(server):
    for key in (KEYS["alice"], KEYS["bob"], KEYS["dave"], PLAIN_KEY):  # carol's budget is the next test's
        assert _complete(server, key, _prompt(5)).status_code == 200
    for key in ("sk-nobody", "Bearer sk-alice-0123", PLAIN_KEY + "x"):
        r = _complete(server, key, _prompt(5))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    text = httpx.get(server.url("/metrics"), timeout=30).text
    assert 'key_name="key-0"' in text and 'key_name="carol"' in text
    assert not any(k in text for k in (*KEYS.values(), PLAIN_KEY))  # names, never keys
    assert not any(k in server.log_tail(100_000) for k in (*KEYS.values(), PLAIN_KEY))


def test_keys_do_not_share_the_prefix_cache(server):
    prompt = _prompt(64)  # 4 full blocks of 16
    before = _hits(server)
    assert _complete(server, KEYS["alice"], prompt).status_code == 200
    assert _complete(server, KEYS["bob"], prompt).status_code == 200
    assert _hits(server) == before, "bob's request hit alice's cached blocks"
    assert _complete(server, KEYS["alice"], prompt).status_code == 200
    after_alice = _hits(server)
    assert after_alice >= before + 48, "alice's second request did not hit her own cached blocks"
    assert _complete(server, KEYS["bob"], prompt).status_code == 200
    assert _hits(server) >= after_alice + 48  # and bob his


def test_tokens_per_minute_429_before_the_engine(server):
    m0 = read_metrics(server)
    r = _complete(server, KEYS["carol"], _prompt(20), max_tokens=80)  # 100 tokens: carol's whole minute
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 100
    routed = read_metrics(server)["pagellm:engine_core_requests_total{engine_core=0}"]
    r = _complete(server, KEYS["carol"], _prompt(20), max_tokens=80)
    assert r.status_code == 429
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "tokens_per_minute")
    # The bucket refills at 100 tokens a minute from about empty: a full minute less the time since the first.
    assert 1 <= int(r.headers["retry-after"]) <= 60
    r = _complete(server, KEYS["carol"], _prompt(20), max_tokens=200)  # more than a whole minute's budget
    assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_per_minute"
    assert "retry-after" not in r.headers and "lower max_tokens" in r.json()["error"]["message"]
    m1 = read_metrics(server)
    assert m1["pagellm:engine_core_requests_total{engine_core=0}"] == routed  # nothing reached the engine
    assert _complete(server, KEYS["alice"], _prompt(20), max_tokens=80).status_code == 200  # unaffected
    m2 = read_metrics(server)

    def delta(name: str, key: str, limit: Optional[str] = None) -> float:
        return _key_metric(m2, name, key, limit) - _key_metric(m0, name, key, limit)

    assert delta("requests", "carol") == 3
    assert delta("rate_limited", "carol", "tokens_per_minute") == 2
    assert (delta("prompt_tokens", "carol"), delta("generation_tokens", "carol")) == (20, 80)
    assert (delta("prompt_tokens", "alice"), delta("generation_tokens", "alice")) == (20, 80)
    assert "pagellm:api_key_rate_limited_total{key_name=alice,limit=tokens_per_minute}" not in m2


# With two API processes: limits and cache salts shared, counters summed.


@pytest.fixture(scope="module")
def two_process_server(tiny_served_model, key_file):
    with RemoteServer(tiny_args(tiny_served_model, "--api-key-file", key_file, "--api-server-count", "2",
                                "--shared-prefix-cache")) as srv:
        yield srv


def _fresh() -> httpx.Client:
    """No kept-alive connections: each request is a new connection, accepted by whichever process takes it."""
    return httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0))


def test_shared_prefix_cache_flag(two_process_server):
    server = two_process_server
    prompt = _prompt(64)
    before = _hits(server)
    assert _complete(server, KEYS["alice"], prompt).status_code == 200
    assert _complete(server, KEYS["bob"], prompt).status_code == 200
    # The first API process counts the core's counters from the stats every step sends it.
    wait_until(lambda: _hits(server) >= before + 48, 60, "bob's request to hit alice's cached blocks")


def test_per_key_counters_add_up_over_api_processes(two_process_server):
    server = two_process_server
    m0 = read_metrics(server)
    answered: dict[str, int] = {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    deadline = time.monotonic() + 120
    with _fresh() as client:
        while len(answered) < 2 or sum(answered.values()) < 6:
            assert time.monotonic() < deadline, f"only API processes {sorted(answered)} answered"
            r = _complete(server, KEYS["alice"], _prompt(random.randint(3, 30)), max_tokens=3, client=client)
            assert r.status_code == 200
            index = r.headers["x-pagellm-api-server"]
            answered[index] = answered.get(index, 0) + 1
            for name in usage:
                usage[name] += r.json()["usage"][name]
    m1 = read_metrics(server)

    def delta(name: str) -> float:
        return _key_metric(m1, name, "alice") - _key_metric(m0, name, "alice")

    assert delta("requests") == sum(answered.values())
    assert delta("prompt_tokens") == usage["prompt_tokens"]
    assert delta("generation_tokens") == usage["completion_tokens"]


def test_api_processes_share_a_keys_token_budget(two_process_server):
    server = two_process_server
    m0 = read_metrics(server)
    assert _complete(server, KEYS["carol"], _prompt(20), max_tokens=80).status_code == 200  # the whole minute
    refused: dict[str, int] = {}
    deadline = time.monotonic() + 40  # well inside the minute the bucket takes to refill
    with _fresh() as client:
        while len(refused) < 2:
            assert time.monotonic() < deadline, f"only API processes {sorted(refused)} answered"
            r = _complete(server, KEYS["carol"], _prompt(20), max_tokens=80, client=client)
            assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_per_minute", r.text
            index = r.headers["x-pagellm-api-server"]
            refused[index] = refused.get(index, 0) + 1
        assert _complete(server, KEYS["alice"], _prompt(5), client=client).status_code == 200
    m1 = read_metrics(server)
    limited = [_key_metric(m, "rate_limited", "carol", "tokens_per_minute") for m in (m0, m1)]
    assert limited[1] - limited[0] == sum(refused.values())
