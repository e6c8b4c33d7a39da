"""Requests that the API once accepted and the engine core then dropped while decoding them (its client waited
forever, and held its place in the queue): each now gets an answer, a 400 naming the field or a result."""

from __future__ import annotations

import httpx
import pytest
from tests.entrypoints.server_utils import RemoteServer
from tests.entrypoints.server_utils import tiny_args
from tests.entrypoints.test_server_lifecycle import PROMPT

from pagellm.sampling_params import MAX_SEED


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with RemoteServer(tiny_args(tiny_served_model, "--max-queued-requests", "4")) as s:
        yield s


def _post(server: RemoteServer, body: dict) -> httpx.Response:
    return httpx.post(server.url("/v1/completions"), json={"prompt": PROMPT, **body}, timeout=60)


def test_min_tokens_beyond_the_room_left_is_a_400(server):
    r = _post(server, {"min_tokens": 100_000, "max_tokens": None})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "min_tokens" and "do not fit" in r.json()["error"]["message"]


def test_largest_seed_with_n_sequences_is_answered(server):
    """The issue's case, seed 2**63 - 1 with n=2, is a 400 naming seed (seeds leave room for n sequences); the
    largest seed allowed, with n=2, runs."""
    r = _post(server, {"seed": 2**63 - 1, "n": 2, "max_tokens": 3, "temperature": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = _post(server, {"seed": MAX_SEED, "n": 2, "max_tokens": 3, "temperature": 1.0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2 and all(c["finish_reason"] == "length" for c in choices)


def test_refused_requests_hold_no_place_in_the_queue(server):
    """Many refused requests in a row, then a good one: none of them is left waiting (the queue holds 4)."""
    for _ in range(10):
        assert _post(server, {"min_tokens": 100_000, "max_tokens": None, "n": 8}).status_code == 400
    r = _post(server, {"max_tokens": 2, "n": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
