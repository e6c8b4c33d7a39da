"""Issue 13 item 2 behind the server, the issue's shapes scaled to a tiny model: prompt_logprobs come back in
vLLM's shape and match the offline LLM's, the caps on one request's work are 400s naming the field, and a
small request sent after a big one finishes first (ordering, never time)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from pagellm import LLM, SamplingParams
from tests.entrypoints.server_utils import RemoteServer, read_metrics, tiny_args, wait_until

# A step of 64 tokens computes at most 8 prompt-logprob positions; 8 seats.
ENGINE = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64"]
CAPS = ["--max-tokens-per-request", "4096", "--max-prompt-logprobs-per-request", "1000"]


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with RemoteServer(tiny_args(tiny_served_model, *ENGINE, *CAPS)) as srv:
        yield srv


def _ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(length)]


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url("/v1/completions"), json=body, timeout=600)


def test_prompt_logprobs_in_vllm_shape_match_the_offline_llm(server, tiny_served_model):
    prompt = _ids(1, 200)
    r = _post(server, {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    llm = LLM(tiny_served_model, dtype="float32", skip_tokenizer_init=True, max_model_len=512,
              kv_cache_memory=16 * 2**20, max_num_batched_tokens=64)
    offline = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=3),
                           use_tqdm=False)[0].prompt_logprobs
    for pos in range(1, len(prompt)):
        served, ref = plp[pos], offline[pos]
        assert list(served) == [str(t) for t in ref]  # the prompt token first, then the top 3 by rank
        assert 4 >= len(served) >= 3 and str(prompt[pos]) in served
        for tok, entry in ref.items():
            got = served[str(tok)]
            assert set(got) == {"logprob", "rank", "decoded_token"}
            assert got["rank"] == entry.rank and abs(got["logprob"] - entry.logprob) < 1e-4
            assert got["decoded_token"] is None  # the server runs without a tokenizer


def test_prompt_logprobs_trimmed_to_what_was_asked_and_echo_alone(server):
    """echo with logprobs 5 and prompt_logprobs 1: the engine computes 5, each position returns the prompt token
    and the top 1; echo and logprobs alone return them too (vLLM: logprobs stands in)."""
    prompt = _ids(2, 20)
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5, "prompt_logprobs": 1}
    choice = _post(server, body).json()["choices"][0]
    assert all(len(p) <= 2 and str(tok) in p for p, tok in zip(choice["prompt_logprobs"][1:], prompt[1:]))
    assert all(len(top) >= 5 for top in choice["logprobs"]["top_logprobs"][1:])
    del body["prompt_logprobs"]
    choice = _post(server, body).json()["choices"][0]
    assert all(len(p) >= 5 for p in choice["prompt_logprobs"][1:])
    plain = _post(server, {"prompt": prompt, "max_tokens": 2}).json()["choices"][0]
    assert plain["prompt_logprobs"] is None


def _assert_400(response: httpx.Response, param: str, flag: str = "") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}:"), error
    assert flag in error["message"]


def test_work_caps_are_400s_naming_the_field(server):
    # 8 prompts x n=128 x 16 tokens (the shape) is 16,384 tokens, over this server's 4,096.
    many = {"prompt": [_ids(i, 5) for i in range(8)], "n": 128, "max_tokens": 16}
    _assert_400(_post(server, many), "max_tokens", "--max-tokens-per-request")
    # max_tokens left out counts as the room each prompt leaves (512 - 5 here).
    _assert_400(_post(server, {"prompt": _ids(3, 5), "n": 9, "max_tokens": None}), "max_tokens")
    # 299 positions x (3 + 1) = 1,196 prompt logprobs, over 1,000.
    _assert_400(_post(server, {"prompt": _ids(4, 300), "max_tokens": 1, "prompt_logprobs": 3}), "prompt_logprobs",
                "--max-prompt-logprobs-per-request")
    _assert_400(_post(server, {"prompt": _ids(5, 10), "prompt_logprobs": 1, "stream": True}), "prompt_logprobs")
    # Inside the caps: accepted.
    ok = _post(server, {"prompt": [_ids(i, 5) for i in range(2)], "n": 4, "max_tokens": 8})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 8


def test_small_request_finishes_before_a_big_one_sent_earlier(server):
    """4 prompts x n=16 (64 sequences for 8 seats, 48 tokens each) and then a 4-token request: the small one is
    answered while the big one still runs."""
    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            big = asyncio.ensure_future(client.post(server.url("/v1/completions"), json={
                "prompt": [_ids(10 + i, 6) for i in range(4)], "n": 16, "max_tokens": 48, "ignore_eos": True,
                "temperature": 1.0, "seed": 0}))
            await asyncio.to_thread(wait_until, lambda: read_metrics(server).get(
                "pagellm:num_requests_running", 0) >= 8, 120, "the big request running")
            small = await client.post(server.url("/v1/completions"), json={
                "prompt": _ids(20, 6), "max_tokens": 4, "ignore_eos": True, "temperature": 0})
            assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 4
            assert not big.done()  # the big one was sent first and is still running
            response = await big
            assert response.status_code == 200 and len(response.json()["choices"]) == 64

    asyncio.run(run())
