"""SIGTERM with requests that cannot finish within --shutdown-timeout, on a tensor-parallel server (so there are
worker processes too): the requests cut at the timeout get 503 `shutting_down` (a JSON error envelope, or an
SSE error event then [DONE] in a stream), and every process is gone within the timeout plus EXIT_MARGIN_S."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from tests.entrypoints.conftest import save_tiny_llama
from tests.entrypoints.server_utils import RemoteServer, child_pids, cmdline, read_metrics, wait_gone, wait_until

PROMPT = list(range(10, 30))
SHUTDOWN_TIMEOUT = 2.0
# The server's own bound is 2 s after the timeout (pagellm.entrypoints.openai.api_server.EXIT_GRACE_S); one
# more second for process exit on a busy machine.
EXIT_MARGIN_S = 3.0
# 8,000 tokens take well over SHUTDOWN_TIMEOUT however fast the machine (a TP=2 step costs more than 0.25 ms).
MAX_TOKENS = 8000


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> str:
    """The tiny random Llama of tiny_served_model, with room for 8,192 positions."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-long")), max_position_embeddings=8192)


def test_shutdown_timeout_cuts_requests_and_exits(long_context_model):
    args = [long_context_model, "--dtype", "float32", "--max-model-len", "8192", "--skip-tokenizer-init",
            "--kv-cache-memory", str(16 * 2**20), "--tensor-parallel-size", "2",
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    with RemoteServer(args) as srv:
        pids = srv.all_pids()
        core = srv.engine_core_pid()
        workers = [p for p in child_pids(core) if "spawn_main" in cmdline(p)]
        assert len(workers) == 2, "one worker process per rank"
        model = httpx.get(srv.url("/v1/models"), timeout=30).json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        results: dict = {}
        first_chunk = threading.Event()

        def plain() -> None:
            try:
                r = httpx.post(srv.url("/v1/completions"), json=body, timeout=300)
                results["plain"] = (r.status_code, r.headers.get("content-type", ""), r.text)
            except BaseException as e:  # noqa: BLE001 - checked below
                results["plain"] = e

        def streamed() -> None:
            try:
                lines = []
                with httpx.stream("POST", srv.url("/v1/completions"), json={**body, "stream": True},
                                  timeout=300) as r:
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first_chunk.set()
                results["stream"] = (r.status_code, lines)
            except BaseException as e:  # noqa: BLE001 - checked below
                results["stream"] = e

        threads = [threading.Thread(target=f, daemon=True) for f in (plain, streamed)]
        for t in threads:
            t.start()
        try:
            assert first_chunk.wait(120), "the stream sent nothing"
            wait_until(lambda: read_metrics(srv)["pagellm:num_requests_running"] == 2, 120,
                       "both requests running")
            sigterm = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(SHUTDOWN_TIMEOUT + 60)
            answered = time.monotonic()
            survivors = wait_gone(pids, max(0.0, sigterm + SHUTDOWN_TIMEOUT + EXIT_MARGIN_S - time.monotonic()))
            gone = time.monotonic()
            code = srv.proc.poll()
        finally:
            srv.kill()
        assert not survivors, f"alive {gone - sigterm:.1f} s after SIGTERM: {survivors}"
        assert code == 0
        # Neither could have finished: both ran until the timeout cut them.
        assert answered - sigterm >= SHUTDOWN_TIMEOUT

        assert not any(isinstance(r, BaseException) for r in results.values()), results
        status, content_type, text = results["plain"]
        assert status == 503 and content_type.startswith("application/json"), (status, text)
        error = json.loads(text)["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "shutting_down"
        assert error["message"] and "param" in error

        status, lines = results["stream"]
        assert status == 200
        assert all(line.startswith("data: ") for line in lines), lines
        *chunks, last_event, done = [line[len("data: "):] for line in lines]
        assert done == "[DONE]"
        error = json.loads(last_event)["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "shutting_down"
        assert 0 < len(chunks) < MAX_TOKENS
        for chunk in chunks:
            choice = json.loads(chunk)["choices"][0]
            assert choice["finish_reason"] is None
