"""A tensor-parallel server whose worker process dies: the stream in flight fails with an error naming the
worker, /health answers 503, new requests get 503, and SIGTERM still exits leaving no process behind."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from tests.entrypoints.server_utils import RemoteServer, child_pids, cmdline, wait_gone

PROMPT = list(range(10, 30))


def test_tp2_server_worker_death_is_reported(tiny_served_model):
    args = [tiny_served_model, "--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init",
            "--kv-cache-memory", str(8 * 2**20), "--tensor-parallel-size", "2"]
    with RemoteServer(args) as server:
        spawned = [p for p in child_pids(server.proc.pid) if "spawn_main" in cmdline(p)]
        direct = set(int(x) for x in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split())
        cores = [p for p in spawned if p in direct]
        assert len(cores) == 1
        core = cores[0]
        workers = [p for p in child_pids(core) if "spawn_main" in cmdline(p)]
        assert len(workers) == 2, "one worker process per rank"

        client = server.client()
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=480, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        os.kill(workers[1], signal.SIGKILL)
        with pytest.raises(openai.APIError) as info:
            for _ in it:
                pass
        assert "worker" in str(info.value.message)
        deadline = time.monotonic() + 15
        while httpx.get(server.url("/health"), timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503
        pids = server.all_pids()
        assert server.terminate(timeout=30) == 0
        assert not wait_gone(pids), "a child process outlived the server"
