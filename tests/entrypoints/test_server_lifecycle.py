"""Server lifecycle on a tiny random model (fast steps): the waiting-queue cap (429), SIGTERM draining, and an
engine core that dies. Prompts are token ids (--skip-tokenizer-init: the tiny model has no tokenizer)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest
from tests.entrypoints.server_utils import (
    RemoteServer,
    check_death_mid_stream,
    read_metrics,
    tiny_args,
    wait_gone,
    wait_until,
)

PROMPT = list(range(10, 30))


@pytest.fixture(scope="module")
def tiny_server(tiny_served_model):
    with RemoteServer(tiny_args(tiny_served_model, "--max-num-seqs", "1", "--max-queued-requests", "1")) as s:
        yield s


def test_queue_full_is_429(tiny_server):
    client = tiny_server.client()
    model = client.models.list().data[0].id
    long = dict(model=model, prompt=PROMPT, max_tokens=480, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    first = client.completions.create(**long)  # runs
    second = client.completions.create(**long)  # waits: the queue holds one
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert info.value.body["code"] == "queue_full"
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 60
    while True:  # the disconnects abort both; then there is room again
        try:
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "aborted requests still hold the queue"
            time.sleep(0.2)
    assert out.usage.completion_tokens == 2 and out.choices[0].text == ""  # no tokenizer: no text


def test_serve_bench_against_server(tiny_server, tmp_path):
    """`pagellm bench serve` on a few requests of a workload, against a live server (at most 2 in flight: this
    server runs one sequence and queues one)."""
    import json

    from pagellm.entrypoints.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "serve", "--base-url", tiny_server.base_url, "--workload", "smollm-cpu", "--num-prompts",
                 "4", "--vocab-size", "4096", "--request-rate", "50", "--max-concurrency", "2",
                 "--output-json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 4 and report["failed"] == 0
    assert report["output_tokens"] == report["expected_output_tokens"]
    assert report["output_throughput"] > 0 and report["ttft"]["mean_ms"] > 0 and report["itl"]["p99_ms"] > 0


def test_engine_death_is_reported(tiny_server):
    """The core process dies mid-request: the stream fails with an error, /health says 503, new requests get
    503, and SIGTERM still exits cleanly."""
    check_death_mid_stream(tiny_server, PROMPT, tiny_server.engine_core_pid(), "engine", health_timeout=60)


def test_sigterm_drains(tiny_served_model):
    """SIGTERM with requests in flight (one running, two waiting): while they run, new requests get 503 and
    /health 503; the three finish completely, the server exits 0 and leaves no process behind."""
    with RemoteServer(tiny_args(tiny_served_model, "--max-num-seqs", "1", "--shutdown-timeout", "600")) as srv:
        model = httpx.get(srv.url("/v1/models"), timeout=30).json()["data"][0]["id"]
        # One after another (--max-num-seqs 1): 480 steps, far longer than the probes below take on any machine.
        num_tokens = 160
        started = threading.Barrier(4, timeout=120)
        results: list = [None] * 3

        def worker(i: int) -> None:
            try:
                client = srv.client(timeout=600)
                stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=num_tokens,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
                started.wait()
                chunks = list(stream)
                results[i] = (chunks[-1].usage.completion_tokens,
                              [c.choices[0].finish_reason for c in chunks if c.choices][-1])
            except BaseException as e:  # noqa: BLE001 - checked below
                results[i] = e

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        started.wait()  # all three are in the engine (the response headers come after add_request)
        pids = srv.all_pids()
        assert len(pids) >= 2  # the server and its engine core
        srv.proc.send_signal(signal.SIGTERM)
        # /health never enters the engine: poll it until the drain shows, then a new request must be refused.
        wait_until(lambda: httpx.get(srv.url("/health"), timeout=30).status_code == 503, 60, "the drain to begin",
                   interval=0.02)
        r = httpx.post(srv.url("/v1/completions"), json={"model": model, "prompt": PROMPT, "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        m = read_metrics(srv)  # /metrics is still served while draining
        assert m["pagellm:num_requests_running"] + m["pagellm:num_requests_waiting"] > 0, \
            "the requests finished before the drain began: nothing was drained"
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads)
        assert results == [(num_tokens, "length")] * 3, results
        assert srv.proc.wait(60) == 0
        assert not wait_gone(pids, timeout=60), "a child process outlived the server"
